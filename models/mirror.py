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

Concurrency. Writers lock what they write (``models.db``): a batch whose every row belongs to
some organizations (organizations, memberships, invitations, domains: the bulk of the
traffic) locks just those organizations, and batches of different organizations run in
parallel; such a batch reads users, roles and permissions but writes none, and its cascades
and copy refreshes touch only rows of its own organizations (``within``). Writes that reach
across organizations (users, roles, permissions, role sets) lock the whole mirror. So every
read-then-write above (a cascade reading a deletion, a copy reading its user or role) is
done by the only writer of the rows involved, as if transactions ran one after the other.

Stale events. ``apply_events`` returns how many of its events were stale: applied, but their
primary write changed nothing because the mirror, or another event of the same batch, held an
equal or newer version of its row. An event's primary write is its first one, the row of the
object it is about (a membership event's membership, not the organization data it embeds, whose
fate says nothing about the event). Of the events whose primary writes name one row, at most one
changed it: the others were superseded inside the batch. Whether the winning write changed its
row is read from the upsert's row count (rows inserted or updated, those the version guard
skipped not included), so nothing is read back: the stale events of a table are its counted
events minus the rows its upsert of their winning writes changed. Deletions of organizations,
roles, permissions, users and domains are not counted: sticky, they apply whatever their version.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import (
    JSON,
    ColumnElement,
    CursorResult,
    String,
    Table,
    TextClause,
    any_,
    bindparam,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models import notifications, tables
from models.db import MirrorLock, held_mirror_lock, lock_mirror_writes, lock_organizations
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
from models.userdata import served_as_stored

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
# Rows per upsert statement on PostgreSQL (one JSON parameter each).
PG_UPSERT_ROWS = 1_000


def event_organizations(event: Event) -> frozenset[str] | None:
    """The organizations whose rows ``event`` writes, or None when it writes rows outside any
    organization (users, roles, permissions, role sets, a domain of no known organization)."""
    found: set[str] = set()
    for write in event_writes(event):
        if write.table == ORGANIZATIONS:
            found.add(write.key[0])
        elif write.table in (MEMBERSHIPS, INVITATIONS, DOMAINS) and write.values.get("organization_id"):
            found.add(write.values["organization_id"])
        else:
            return None
    return frozenset(found)


def lock_for_events(
    session: Session, events: Sequence[Event], *, wait: bool = True
) -> tuple[MirrorLock, list[int]]:
    """Lock what applying ``events`` needs; returns the lock and the positions of the events it covers.

    With ``wait`` every event is covered: its organizations are locked, or the whole mirror
    if any event writes outside organizations. Without it nothing is waited for, except the
    whole mirror when every event needs it: the organizations another writer holds are
    skipped, and so are the events that need the whole mirror; the caller applies the
    covered events now and the others in a later transaction (the result does not depend
    on how events are grouped into batches).
    """
    scopes = [event_organizations(event) for event in events]
    wanted: set[str] = set()
    for scope in scopes:
        if scope is not None:
            wanted |= scope
    if all(scope is None for scope in scopes) or (wait and any(scope is None for scope in scopes)):
        return lock_mirror_writes(session), list(range(len(events)))
    lock = lock_organizations(session, wanted, wait=wait)
    return lock, [n for n, scope in enumerate(scopes) if scope is not None and lock.covers(MirrorLock(scope))]


def apply_events(session: Session, events: Sequence[Event], *, now_ms: int) -> int:
    """Apply ``events`` (any order, duplicates allowed); executes statements, never commits.

    Returns how many of the events were stale (see the module's docstring): their primary
    write lost to an equal or newer version, in the mirror or in the batch.

    Locks what the events need unless the transaction holds a lock already (``lock_for_events``),
    which must then cover them.
    """
    lock = held_mirror_lock(session)
    if lock is None:
        lock = lock_for_events(session, events)[0]
    within = lock.organizations
    best: dict[str, dict[tuple[str, ...], Write]] = {name: {} for name in TABLES}
    sticky_deleted: dict[str, set[str]] = {name: set() for name in STICKY}
    stubs: dict[tuple[str, ...], Write] = {}  # keys of different tables never collide
    # The events that may be stale, by the table of their primary write, and those writes by
    # identity (held here, so no id is reused while the batch is applied).
    counted_events: dict[str, int] = dict.fromkeys(TABLES, 0)
    primaries: dict[int, Write] = {}
    for event in events:
        writes = event_writes(event)
        first = writes[0]
        if not (first.table in STICKY and first.deleted):
            counted_events[first.table] += 1
            primaries[id(first)] = first
        for write in writes:
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
    stale = 0
    for name in ORDER:
        rows = best[name]
        if not rows:
            continue
        if within is not None and name not in (ORGANIZATIONS, MEMBERSHIPS, INVITATIONS, DOMAINS):
            raise RuntimeError(f"{name} are written under the whole-mirror lock only")
        # Rows won by a counted primary write go in statements of their own, so that their row
        # count says how many of those writes changed something (one more statement only when
        # a batch mixes them with others, e.g. organization events and membership snapshots).
        won: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        for key, write in rows.items():
            row = dict(write.values, synced_at=now_ms)
            if name in STICKY and key[0] in sticky_deleted[name]:
                row["deleted"] = True
            (won if id(write) in primaries else others).append(row)
        changed = _upsert(session, TABLES[name], won, sticky=name in STICKY)
        _upsert(session, TABLES[name], others, sticky=name in STICKY)
        stale += counted_events[name] - changed
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
    if within is not None and not touched_orgs <= within:
        raise RuntimeError("these events write organizations the transaction did not lock")
    _cascade(session, touched_orgs, touched_users, now_ms, within=within)
    refresh_copies(session, copies, within=within)
    # The net change of each row the batch wrote or cascaded, recorded in this transaction.
    notifications.emit(session, watched)
    return stale


@dataclass
class Touched:
    """What a batch wrote that embedded copies depend on."""

    users: set[str] = field(default_factory=set)  # user rows written: all their memberships
    role_keys: set[str] = field(default_factory=set)  # role rows written: all holders of the key
    all_roles: bool = False  # a permission changed: every role's holders
    members: set[str] = field(default_factory=set)  # users whose memberships were written
    invitations: set[str] = field(default_factory=set)  # invitation ids written
    written_roles: set[str] = field(default_factory=set)  # role keys the written rows name


def refresh_copies(session: Session, touched: Touched, *, within: frozenset[str] | None = None) -> int:
    """Rewrite the user and role data memberships and invitations embed from the live rows;
    returns how many memberships changed.

    ``within`` (organization ids) confines the rewrite to those organizations' rows: a writer
    holding only their locks writes no other row. It is enough after writing rows of those
    organizations alone (no user, role or permission row), since only the written rows' copies
    can have gone stale.

    ``synced_at`` stays: it says when Clerk last showed the row, which reconciliation's
    missed-delete check relies on, and a derived copy is no such evidence.
    """
    changed = _refresh_user_copies(session, touched.users | touched.members, within)
    changed |= _refresh_role_copies(session, touched, within)
    return len(changed)


def _refresh_user_copies(
    session: Session, user_ids: set[str], within: frozenset[str] | None
) -> set[tuple[str, str]]:
    users = TABLES[USERS]
    members = TABLES[MEMBERSHIPS]
    changed: set[tuple[str, str]] = set()
    for chunk in _chunks(user_ids):
        live = {
            row.id: row
            for row in session.execute(
                select(users.c.id, *(users.c[name] for name in USER_COPY_FIELDS)).where(
                    _among(session, users.c.id, chunk), users.c.version != STUB_VERSION
                )
            )
        }
        if not live:
            continue
        changes: list[dict[str, Any]] = []
        rows = session.execute(
            _confine(
                session,
                select(
                    members.c.organization_id,
                    members.c.user_id,
                    members.c.identifier,
                    members.c.public_user_data,
                ).where(_among(session, members.c.user_id, sorted(live))),
                members,
                within,
            )
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
                        "user_data_complete": served_as_stored(data, row.user_id),
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
                    user_data_complete=bindparam("user_data_complete"),
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
        scoped = query if chunk is None else query.where(_among(session, roles.c.key, chunk))
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
                    permissions.c.deleted.is_(False), _among(session, permissions.c.key, sorted(dead_keys))
                )
            )
        )
    return {
        key: (name, None if granted is None else [p for p in granted if p not in dead_keys])
        for key, (_, name, granted) in found.items()
    }


def _refresh_role_copies(
    session: Session, touched: Touched, within: frozenset[str] | None
) -> set[tuple[str, str]]:
    members = TABLES[MEMBERSHIPS]
    if touched.all_roles:
        roles = _live_roles(session, None)
        scopes: list[Any] = [_among(session, members.c.role, chunk) for chunk in _chunks(roles)]
    else:
        # The roles the written rows name: a row whose write lost keeps a copy derived when
        # its winning write (or, since, its role) was applied.
        roles = _live_roles(session, touched.role_keys | touched.written_roles)
        scopes = [_among(session, members.c.role, chunk) for chunk in _chunks(touched.role_keys & set(roles))]
        # Membership writes: only those users' rows; a superset of the written rows is harmless.
        scopes += [_among(session, members.c.user_id, chunk) for chunk in _chunks(touched.members)]
    if not roles:
        return set()
    changes: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for scope in scopes:
        rows = session.execute(
            _confine(
                session,
                select(
                    members.c.organization_id,
                    members.c.user_id,
                    members.c.role,
                    members.c.role_name,
                    members.c.permissions,
                ).where(scope),
                members,
                within,
            )
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
    _refresh_invitation_roles(session, touched, roles, within)
    return {(change["k_org"], change["k_user"]) for change in changes}


def _refresh_invitation_roles(
    session: Session,
    touched: Touched,
    roles: dict[str, tuple[str | None, list[str] | None]],
    within: frozenset[str] | None,
) -> None:
    invitations = TABLES[INVITATIONS]
    if touched.all_roles or touched.role_keys:
        keys = set(roles) if touched.all_roles else touched.role_keys & set(roles)
        scopes: list[Any] = [_among(session, invitations.c.role, chunk) for chunk in _chunks(keys)]
    else:
        scopes = []
    scopes += [_among(session, invitations.c.id, chunk) for chunk in _chunks(touched.invitations)]
    changes: list[dict[str, Any]] = []
    seen: set[str] = set()
    for scope in scopes:
        for row in session.execute(
            _confine(
                session,
                select(invitations.c.id, invitations.c.role, invitations.c.role_name).where(scope),
                invitations,
                within,
            )
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


def _upsert(session: Session, table: Table, rows: list[dict[str, Any]], *, sticky: bool) -> int:
    """Write ``rows`` where newer than the mirror's; returns how many were inserted or updated.

    The count is the statements' row counts: on PostgreSQL and SQLite alike, a row the version
    guard (``ON CONFLICT DO UPDATE ... WHERE``) left alone is not counted.
    """
    if not rows:
        return 0
    changed = 0
    if session.get_bind().dialect.name == "postgresql":
        statement = _pg_upsert(table, sticky=sticky)
        for start in range(0, len(rows), PG_UPSERT_ROWS):
            chunk = rows[start : start + PG_UPSERT_ROWS]
            result = session.execute(statement, {"rows": json.dumps(chunk, separators=(",", ":"))})
            changed += cast(CursorResult[Any], result).rowcount
        return changed
    keys = [column.name for column in table.primary_key.columns]
    insert = sqlite.insert(table)
    excluded = insert.excluded
    assignments: dict[str, Any] = {
        column.name: excluded[column.name] for column in table.columns if column.name not in keys
    }
    if sticky:
        assignments["deleted"] = or_(table.c.deleted, excluded.deleted)
    upsert = insert.on_conflict_do_update(
        index_elements=keys, set_=assignments, where=table.c.version < excluded.version
    )
    chunk_size = max(1, MAX_PARAMS // len(table.columns))
    for start in range(0, len(rows), chunk_size):
        # executemany: SQLite's row count is the sum over the rows.
        result = session.execute(upsert, rows[start : start + chunk_size])
        changed += cast(CursorResult[Any], result).rowcount
    return changed


@functools.cache
def _pg_upsert(table: Table, *, sticky: bool) -> TextClause:
    """The newer-only upsert of many rows sent as ONE json parameter, on PostgreSQL.

    ``json_populate_recordset`` turns the array into rows of the table's type on the server:
    one statement and one parameter per batch instead of a bind per row, which costs both
    sides less than ``executemany``. A JSON column's ``None`` is stored as JSON ``null``, as
    the ORM's JSON type stores it.
    """
    keys = {column.name for column in table.primary_key.columns}
    json_columns = {column.name for column in table.columns if isinstance(column.type, JSON)}
    names = [column.name for column in table.columns]
    selected = ", ".join(
        f"""COALESCE(r."{name}", 'null'::json)""" if name in json_columns else f'r."{name}"' for name in names
    )
    updates = [
        f'"{name}" = t.deleted OR excluded.deleted'
        if sticky and name == "deleted"
        else f'"{name}" = excluded."{name}"'
        for name in names
        if name not in keys
    ]
    columns = ", ".join(f'"{name}"' for name in names)
    conflict = ", ".join(f'"{name}"' for name in names if name in keys)
    return text(
        f'INSERT INTO "{table.name}" AS t ({columns}) '
        f'SELECT {selected} FROM json_populate_recordset(NULL::"{table.name}", CAST(:rows AS json)) AS r '
        f"ON CONFLICT ({conflict}) DO UPDATE SET {', '.join(updates)} "
        "WHERE t.version < excluded.version"
    )


def _among(session: Session, column: Any, values: list[str]) -> ColumnElement[bool]:
    """``column IN values``; on PostgreSQL as ``= ANY(array)``, one parameter whatever the number
    of values, so the statement's text stays the same (a literal list of hundreds is costly to
    build, send and parse on every batch)."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(
            ColumnElement[bool], column == any_(bindparam(None, values, type_=postgresql.ARRAY(String)))
        )
    return cast(ColumnElement[bool], column.in_(values))


def _confine(session: Session, query: Any, table: Table, within: frozenset[str] | None) -> Any:
    """``query`` limited to the rows of the organizations ``within`` (None: no limit)."""
    if within is None:
        return query
    return query.where(_among(session, table.c.organization_id, sorted(within)))


def _chunks(ids: Iterable[str]) -> Iterable[list[str]]:
    ordered = sorted(ids)
    for start in range(0, len(ordered), MAX_IN):
        yield ordered[start : start + MAX_IN]


def _mark_deleted(session: Session, table: Table, ids: set[str], now_ms: int) -> None:
    for chunk in _chunks(ids):
        session.execute(
            update(table)
            .where(_among(session, table.c.id, chunk), table.c.deleted.is_(False))
            .values(deleted=True, synced_at=now_ms)
        )


def _deleted_ids(session: Session, table: Table, ids: set[str]) -> set[str]:
    found: set[str] = set()
    for chunk in _chunks(ids):
        found.update(
            session.scalars(select(table.c.id).where(_among(session, table.c.id, chunk), table.c.deleted))
        )
    return found


def _cascade(
    session: Session, org_ids: set[str], user_ids: set[str], now_ms: int, *, within: frozenset[str] | None
) -> None:
    """Tombstone live memberships and invitations of the deleted organizations and users touched
    (only rows of the organizations ``within``, when given)."""
    dead_orgs = _deleted_ids(session, TABLES[ORGANIZATIONS], org_ids)
    dead_users = _deleted_ids(session, TABLES[USERS], user_ids)
    for name in (MEMBERSHIPS, INVITATIONS, DOMAINS):
        table = TABLES[name]
        for chunk in _chunks(dead_orgs):
            session.execute(
                update(table)
                .where(_among(session, table.c.organization_id, chunk), table.c.deleted.is_(False))
                .values(deleted=True, synced_at=now_ms)
            )
        for chunk in _chunks(dead_users if name != DOMAINS else ()):
            session.execute(
                _confine(
                    session,
                    update(table).where(_among(session, table.c.user_id, chunk), table.c.deleted.is_(False)),
                    table,
                    within,
                ).values(deleted=True, synced_at=now_ms)
            )
