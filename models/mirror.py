"""Apply a batch of Clerk events to the mirror tables: newer-only bulk upserts, then cascades.

The final mirror is a function of the SET of events applied, whatever their order, their
multiplicity or how they were split into batches:

* every row's data is the data of its maximum-version write (``models.events``), so a batch
  is first reduced in Python to one write per key, then upserted per table in a few
  statements guarded by ``WHERE table.version < excluded.version``;
* organization, role, permission, user and domain deletions are sticky (Clerk never reuses
  those ids): ``deleted`` is the OR of every write seen, applied even when the deletion's
  version is older than the row's. A user's or permission's deletion moreover never replaces
  its data (the row keeps its newest data write, or is a stub versioned ``STUB_VERSION``
  until one arrives): the copies in a deleted user's tombstoned memberships, and the grants a
  deleted permission's key leaves, then derive from the same data in every order;
* membership and invitation tombstones cascade from deleted organizations and users, domain
  tombstones from deleted organizations. The
  cascade runs set-based at the end of the batch for every organization and user the batch
  touched, so a membership arriving after its organization's deletion is tombstoned too;
* the user and role data memberships embed are copies, derived at the end of the batch from
  the live ``users`` and ``roles`` rows (``refresh_copies``): a membership's
  ``public_user_data`` and ``identifier`` follow its user row's data, its ``permissions`` and
  ``role_name`` (and an invitation's ``role_name``) the live role with its key, minus deleted
  permissions. The copy overwrites the same fields whatever the row held, so it is a function
  of the winning user/role write alone: a membership event carrying stale embedded user data,
  in any order with ``user.updated``, ends showing the newer user row's data. Without user data or
  a live role a copy keeps what its own event embedded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models import notifications, tables
from models.db import lock_mirror_writes
from models.events import (
    DOMAINS,
    INVITATIONS,
    MEMBERSHIPS,
    ORGANIZATIONS,
    PERMISSIONS,
    ROLE_SETS,
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
    DOMAINS: tables.OrganizationDomain.__table__,  # type: ignore[dict-item]
    ROLE_SETS: tables.RoleSet.__table__,  # type: ignore[dict-item]
}
# Objects whose ids Clerk never reuses: once deleted, deleted for good.
STICKY = frozenset({ORGANIZATIONS, ROLES, PERMISSIONS, USERS, DOMAINS})
# Upsert order is irrelevant to the result; organizations first keeps lock order stable.
ORDER = (ORGANIZATIONS, USERS, ROLES, PERMISSIONS, MEMBERSHIPS, INVITATIONS, DOMAINS)
# Deletions that never replace the data: copies derive from users, live grants from permission
# keys, and a domain's tombstone keeps its organization.
KEEP_DATA = frozenset({USERS, PERMISSIONS, DOMAINS})
# The version of a row known only from its deletion: every write of its data outranks it.
STUB_VERSION = ""
# The fields of ``public_user_data`` the user row decides; other keys stay as embedded.
USER_COPY_FIELDS = ("identifier", "username", "first_name", "last_name", "image_url", "has_image", "banned")
# Keeps every statement far below SQLite's and PostgreSQL's bound-parameter limits.
MAX_PARAMS = 30_000
MAX_IN = 500


def apply_events(session: Session, events: Sequence[Event], *, now_ms: int) -> None:
    """Apply ``events`` (any order, duplicates allowed); executes statements, never commits."""
    lock_mirror_writes(session)
    best: dict[str, dict[tuple[str, ...], Write]] = {name: {} for name in TABLES}
    sticky_deleted: dict[str, set[str]] = {name: set() for name in STICKY}
    stubs: dict[tuple[str, ...], Write] = {}  # keys of different tables never collide
    for event in events:
        for write in event_writes(event):
            if write.table in KEEP_DATA and write.deleted:
                # The deletion keeps the last data, the source of copies (a stub has none).
                sticky_deleted[write.table].add(write.key[0])
                stubs.setdefault(write.key, write)
                continue
            rows = best[write.table]
            current = rows.get(write.key)
            if current is None or current.version < write.version:
                rows[write.key] = write
            if write.table in STICKY and write.deleted:
                sticky_deleted[write.table].add(write.key[0])

    for key, stub in stubs.items():
        if key not in best[stub.table]:
            # Versioned below every write: it holds the row until the object's data arrives.
            best[stub.table][key] = Write(
                stub.table, key, STUB_VERSION, dict(stub.values, version=STUB_VERSION)
            )
    # Change notifications: the rows this batch may change, read before it writes (None when off).
    watched = notifications.capture(
        session,
        best,
        cascade_orgs=sticky_deleted[ORGANIZATIONS],
        cascade_users=sticky_deleted[USERS],
        now_ms=now_ms,
    )
    touched_orgs: set[str] = set()
    touched_users: set[str] = set()
    copies = Touched()
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
            copies.users.update(key[0] for key in rows)
        elif name == ROLES:
            copies.role_keys.update(w.values["key"] for w in rows.values() if w.values["key"])
        elif name == PERMISSIONS:
            copies.all_roles = True
        elif name in (MEMBERSHIPS, INVITATIONS):
            for write in rows.values():
                touched_orgs.add(write.values["organization_id"])
                if write.values["user_id"]:
                    touched_users.add(write.values["user_id"])
                if write.values["role"]:
                    copies.written_roles.add(write.values["role"])
                if name == MEMBERSHIPS:
                    copies.members.add(write.values["user_id"])
                elif write.values["role"]:
                    copies.invitations.add(write.key[0])
    _cascade(session, touched_orgs, touched_users, now_ms)
    refresh_copies(session, copies)
    # The net change of each row the batch wrote or cascaded, recorded in this transaction.
    notifications.emit(session, watched)


@dataclass
class Touched:
    """What a batch wrote that embedded copies depend on."""

    users: set[str] = field(default_factory=set)  # user rows written: all their memberships
    role_keys: set[str] = field(default_factory=set)  # role rows written: all holders of the key
    all_roles: bool = False  # a permission changed: every role's holders
    members: set[str] = field(default_factory=set)  # users whose memberships were written
    invitations: set[str] = field(default_factory=set)  # invitation ids written
    written_roles: set[str] = field(default_factory=set)  # role keys the written rows name


def refresh_copies(session: Session, touched: Touched) -> int:
    """Rewrite the user and role data memberships and invitations embed from the live rows;
    returns how many memberships changed.

    ``synced_at`` stays: it says when Clerk last showed the row, which reconciliation's
    missed-delete check relies on, and a derived copy is no such evidence.
    """
    changed = _refresh_user_copies(session, touched.users | touched.members)
    changed |= _refresh_role_copies(session, touched)
    return len(changed)


def _refresh_user_copies(session: Session, user_ids: set[str]) -> set[tuple[str, str]]:
    users = TABLES[USERS]
    members = TABLES[MEMBERSHIPS]
    changed: set[tuple[str, str]] = set()
    for chunk in _chunks(user_ids):
        live = {
            row.id: row
            for row in session.execute(
                select(users.c.id, *(users.c[name] for name in USER_COPY_FIELDS)).where(
                    users.c.id.in_(chunk), users.c.version != STUB_VERSION
                )
            )
        }
        if not live:
            continue
        changes: list[dict[str, Any]] = []
        rows = session.execute(
            select(
                members.c.organization_id, members.c.user_id, members.c.identifier, members.c.public_user_data
            ).where(members.c.user_id.in_(sorted(live)))
        )
        for row in rows:
            user = live[row.user_id]
            data = dict(row.public_user_data or {})
            data["user_id"] = row.user_id
            for name in USER_COPY_FIELDS:
                data[name] = user._mapping[name]
            if "profile_image_url" in data:
                data["profile_image_url"] = user.image_url
            if data != row.public_user_data or user.identifier != row.identifier:
                changes.append(
                    {
                        "k_org": row.organization_id,
                        "k_user": row.user_id,
                        "identifier": user.identifier,
                        "public_user_data": data,
                    }
                )
        if changes:
            session.execute(
                update(members)
                .where(
                    members.c.organization_id == bindparam("k_org"), members.c.user_id == bindparam("k_user")
                )
                .values(
                    identifier=bindparam("identifier"),
                    public_user_data=bindparam("public_user_data"),
                ),
                changes,
                execution_options={"synchronize_session": False},
            )
            changed.update((change["k_org"], change["k_user"]) for change in changes)
    return changed


def _live_roles(session: Session, keys: set[str] | None) -> dict[str, tuple[str | None, list[str] | None]]:
    """Live roles by key (the newest when a key is live twice): name and permissions still live."""
    roles = TABLES[ROLES]
    permissions = TABLES[PERMISSIONS]
    query = select(roles.c.key, roles.c.name, roles.c.permissions, roles.c.version).where(
        roles.c.deleted.is_(False), roles.c.key.is_not(None)
    )
    found: dict[str, tuple[str, str | None, list[str] | None]] = {}
    batches = [None] if keys is None else list(_chunks(keys))
    for chunk in batches:
        scoped = query if chunk is None else query.where(roles.c.key.in_(chunk))
        for row in session.execute(scoped):
            current = found.get(row.key)
            if current is None or current[0] < row.version:
                found[row.key] = (row.version, row.name, row.permissions)
    if not found:
        return {}
    # A key is dead when only deleted permissions hold it (a key may come back under a new id).
    dead_keys = set(
        session.scalars(
            select(permissions.c.key).where(permissions.c.deleted, permissions.c.key.is_not(None)).distinct()
        )
    )
    if dead_keys:
        dead_keys -= set(
            session.scalars(
                select(permissions.c.key).where(
                    permissions.c.deleted.is_(False), permissions.c.key.in_(dead_keys)
                )
            )
        )
    return {
        key: (name, None if granted is None else [p for p in granted if p not in dead_keys])
        for key, (_, name, granted) in found.items()
    }


def _refresh_role_copies(session: Session, touched: Touched) -> set[tuple[str, str]]:
    members = TABLES[MEMBERSHIPS]
    if touched.all_roles:
        roles = _live_roles(session, None)
        scopes: list[Any] = [members.c.role.in_(chunk) for chunk in _chunks(roles)]
    else:
        # The roles the written rows name: a row whose write lost keeps a copy derived when
        # its winning write (or, since, its role) was applied.
        roles = _live_roles(session, touched.role_keys | touched.written_roles)
        scopes = [members.c.role.in_(chunk) for chunk in _chunks(touched.role_keys & set(roles))]
        # Membership writes: only those users' rows; a superset of the written rows is harmless.
        scopes += [members.c.user_id.in_(chunk) for chunk in _chunks(touched.members)]
    if not roles:
        return set()
    changes: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for scope in scopes:
        rows = session.execute(
            select(
                members.c.organization_id,
                members.c.user_id,
                members.c.role,
                members.c.role_name,
                members.c.permissions,
            ).where(scope)
        )
        for row in rows:
            key = (row.organization_id, row.user_id)
            if key in seen or row.role not in roles:
                continue
            seen.add(key)
            name, granted = roles[row.role]
            if name != row.role_name or granted != row.permissions:
                changes.append(
                    {
                        "k_org": key[0],
                        "k_user": key[1],
                        "role_name": name,
                        "permissions": granted,
                    }
                )
    if changes:
        session.execute(
            update(members)
            .where(members.c.organization_id == bindparam("k_org"), members.c.user_id == bindparam("k_user"))
            .values(
                role_name=bindparam("role_name"),
                permissions=bindparam("permissions"),
            ),
            changes,
            execution_options={"synchronize_session": False},
        )
    _refresh_invitation_roles(session, touched, roles)
    return {(change["k_org"], change["k_user"]) for change in changes}


def _refresh_invitation_roles(
    session: Session, touched: Touched, roles: dict[str, tuple[str | None, list[str] | None]]
) -> None:
    invitations = TABLES[INVITATIONS]
    if touched.all_roles or touched.role_keys:
        keys = set(roles) if touched.all_roles else touched.role_keys & set(roles)
        scopes: list[Any] = [invitations.c.role.in_(chunk) for chunk in _chunks(keys)]
    else:
        scopes = []
    scopes += [invitations.c.id.in_(chunk) for chunk in _chunks(touched.invitations)]
    changes: list[dict[str, Any]] = []
    seen: set[str] = set()
    for scope in scopes:
        for row in session.execute(
            select(invitations.c.id, invitations.c.role, invitations.c.role_name).where(scope)
        ):
            if row.id in seen or row.role not in roles:
                continue
            seen.add(row.id)
            name = roles[row.role][0]
            if name != row.role_name:
                changes.append({"k_id": row.id, "role_name": name})
    if changes:
        session.execute(
            update(invitations)
            .where(invitations.c.id == bindparam("k_id"))
            .values(role_name=bindparam("role_name")),
            changes,
            execution_options={"synchronize_session": False},
        )


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
    for name in (MEMBERSHIPS, INVITATIONS, DOMAINS):
        table = TABLES[name]
        for chunk in _chunks(dead_orgs):
            session.execute(
                update(table)
                .where(table.c.organization_id.in_(chunk), table.c.deleted.is_(False))
                .values(deleted=True, synced_at=now_ms)
            )
        for chunk in _chunks(dead_users if name != DOMAINS else ()):
            session.execute(
                update(table)
                .where(table.c.user_id.in_(chunk), table.c.deleted.is_(False))
                .values(deleted=True, synced_at=now_ms)
            )
