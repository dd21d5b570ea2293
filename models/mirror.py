"""Apply a batch of Clerk events to the mirror tables: newer-only bulk upserts, then cascades.

The final mirror is a function of the SET of events applied, whatever their order, their
multiplicity or how they were split into batches:

* every row's data is the data of its maximum-version write (``models.events``), so a batch
  is first reduced in Python to one write per key, then upserted per table in a few
  statements guarded by ``WHERE table.version < excluded.version``;
* organization, role, permission and user deletions are sticky (Clerk never reuses those
  ids): ``deleted`` is the OR of every write seen, applied even when the deletion's version
  is older than the row's;
* membership and invitation tombstones cascade from deleted organizations and users. The
  cascade runs set-based at the end of the batch for every organization and user the batch
  touched, so a membership arriving after its organization's deletion is tombstoned too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Table, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models import tables
from models.db import lock_mirror_writes
from models.events import (
    INVITATIONS,
    MEMBERSHIPS,
    ORGANIZATIONS,
    PERMISSIONS,
    ROLES,
    USERS,
    Event,
    Write,
    event_writes,
)

TABLES: dict[str, Table] = {
    ORGANIZATIONS: tables.Organization.__table__,  # type: ignore[dict-item]
    MEMBERSHIPS: tables.Membership.__table__,  # type: ignore[dict-item]
    INVITATIONS: tables.Invitation.__table__,  # type: ignore[dict-item]
    ROLES: tables.Role.__table__,  # type: ignore[dict-item]
    PERMISSIONS: tables.Permission.__table__,  # type: ignore[dict-item]
    USERS: tables.User.__table__,  # type: ignore[dict-item]
}
# Objects whose ids Clerk never reuses: once deleted, deleted for good.
STICKY = frozenset({ORGANIZATIONS, ROLES, PERMISSIONS, USERS})
# Upsert order is irrelevant to the result; organizations first keeps lock order stable.
ORDER = (ORGANIZATIONS, USERS, ROLES, PERMISSIONS, MEMBERSHIPS, INVITATIONS)
# Keeps every statement far below SQLite's and PostgreSQL's bound-parameter limits.
MAX_PARAMS = 30_000
MAX_IN = 500


def apply_events(session: Session, events: Sequence[Event], *, now_ms: int) -> None:
    """Apply ``events`` (any order, duplicates allowed); executes statements, never commits."""
    lock_mirror_writes(session)
    best: dict[str, dict[tuple[str, ...], Write]] = {name: {} for name in TABLES}
    sticky_deleted: dict[str, set[str]] = {name: set() for name in STICKY}
    for event in events:
        for write in event_writes(event):
            rows = best[write.table]
            current = rows.get(write.key)
            if current is None or current.version < write.version:
                rows[write.key] = write
            if write.table in STICKY and write.deleted:
                sticky_deleted[write.table].add(write.key[0])

    touched_orgs: set[str] = set()
    touched_users: set[str] = set()
    for name in ORDER:
        rows = best[name]
        if not rows:
            continue
        values = []
        for key, write in rows.items():
            row = dict(write.values, synced_at=now_ms)
            if name in STICKY and key[0] in sticky_deleted[name]:
                row["deleted"] = True
            values.append(row)
        _upsert(session, TABLES[name], values, sticky=name in STICKY)
        if name in STICKY and sticky_deleted[name]:
            # The upsert skipped rows already holding a newer version; the deletion still counts.
            _mark_deleted(session, TABLES[name], sticky_deleted[name], now_ms)
        if name == ORGANIZATIONS:
            touched_orgs.update(key[0] for key in rows)
        elif name == USERS:
            touched_users.update(key[0] for key in rows)
        elif name in (MEMBERSHIPS, INVITATIONS):
            for write in rows.values():
                touched_orgs.add(write.values["organization_id"])
                if write.values["user_id"]:
                    touched_users.add(write.values["user_id"])
    _cascade(session, touched_orgs, touched_users, now_ms)


def _insert(session: Session, table: Table) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _upsert(session: Session, table: Table, rows: list[dict[str, Any]], *, sticky: bool) -> None:
    keys = [column.name for column in table.primary_key.columns]
    insert = _insert(session, table)
    excluded = insert.excluded
    assignments: dict[str, Any] = {
        column.name: excluded[column.name] for column in table.columns if column.name not in keys
    }
    if sticky:
        assignments["deleted"] = or_(table.c.deleted, excluded.deleted)
    statement = insert.on_conflict_do_update(
        index_elements=keys, set_=assignments, where=table.c.version < excluded.version
    )
    chunk = max(1, MAX_PARAMS // len(table.columns))
    for start in range(0, len(rows), chunk):
        session.execute(statement, rows[start : start + chunk])


def _chunks(ids: Iterable[str]) -> Iterable[list[str]]:
    ordered = sorted(ids)
    for start in range(0, len(ordered), MAX_IN):
        yield ordered[start : start + MAX_IN]


def _mark_deleted(session: Session, table: Table, ids: set[str], now_ms: int) -> None:
    for chunk in _chunks(ids):
        session.execute(
            update(table)
            .where(table.c.id.in_(chunk), table.c.deleted.is_(False))
            .values(deleted=True, synced_at=now_ms)
        )


def _deleted_ids(session: Session, table: Table, ids: set[str]) -> set[str]:
    found: set[str] = set()
    for chunk in _chunks(ids):
        found.update(session.scalars(select(table.c.id).where(table.c.id.in_(chunk), table.c.deleted)))
    return found


def _cascade(session: Session, org_ids: set[str], user_ids: set[str], now_ms: int) -> None:
    """Tombstone live memberships and invitations of the deleted organizations and users touched."""
    dead_orgs = _deleted_ids(session, TABLES[ORGANIZATIONS], org_ids)
    dead_users = _deleted_ids(session, TABLES[USERS], user_ids)
    for name in (MEMBERSHIPS, INVITATIONS):
        table = TABLES[name]
        for chunk in _chunks(dead_orgs):
            session.execute(
                update(table)
                .where(table.c.organization_id.in_(chunk), table.c.deleted.is_(False))
                .values(deleted=True, synced_at=now_ms)
            )
        for chunk in _chunks(dead_users):
            session.execute(
                update(table)
                .where(table.c.user_id.in_(chunk), table.c.deleted.is_(False))
                .values(deleted=True, synced_at=now_ms)
            )
