"""Reconciliation's database side: listing versions, newer-only listing writes, missed deletes, sync runs.

Listing versions. A listed object carries no delivery, so its version is built from the
object's own timestamps with the LOWEST tie-break there is:

* memberships: ``created_at(15) updated_at(15) 0 000000000000000 0000000000000000``;
* every other kind: ``updated_at(15) 0 000000000000000 0000000000000000``.

Rank digit 0 and a zero envelope timestamp and hash put a listing below EVERY webhook write
with the same object timestamps: a delivery's envelope timestamp is positive, and the
organization snapshot inside a membership event, ``created`` (rank 0), ``updated`` and
``deleted`` all have rank >= 0. So at equal timestamps the webhook-written row always wins
(it may be a deletion carrying the last change's ``updated_at``, which a stale listing must not
undo), while a listing with a later ``updated_at`` (a missed update) or ``created_at`` (a missed
re-add) wins over it. Two listings of an unchanged object build the same version: listing
again writes nothing and counts no drift.

Missed deletes. A row absent from a complete listing of its organization, and not written
since that listing began (``synced_at`` before it), is re-checked with a GET; only when Clerk
answers that it is gone is it tombstoned, with a version ranked as a deletion and stamped with
the time of the check (``max(updated_at, checked_at)``): every change of that generation
happened before it was gone, so no late webhook of it can resurrect the row, while a genuine
re-add (later ``created_at``) still does. Organizations, roles, users, permissions and domains
are tombstoned through ``apply_events`` with a deleted stub, so they stay deleted for good and
cascade as webhooks do.

Copies by content. After every listing write, the user and role data memberships and
invitations embed are derived again from the users and roles rows (``models.mirror``): a
copy that went stale without its own timestamps moving is repaired and counted as drift.

Every write here runs under ``lock_mirror_writes``: what a batch reads to count drift is what
it then overwrites, with no webhook batch in between.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
from psycopg.types.json import Json
from sqlalchemy import JSON, Table, func, or_, select, update
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models import notifications
from models.db import lock_mirror_writes
from models.errors import PayloadError, PermanentError, RetryableError
from models.events import (
    DOMAINS,
    INVITATIONS,
    MEMBERSHIP_RANK,
    MEMBERSHIPS,
    ORGANIZATIONS,
    PERMISSIONS,
    ROLE_SETS,
    ROLES,
    USERS,
    Event,
    event_writes,
    role_set_values,
    storable_text,
)
from models.mirror import TABLES, Touched, apply_events, refresh_copies
from models.tables import Organization, SyncRun, SyncStatus
from models.versions import row_version

log = logging.getLogger(__name__)

KINDS = (ORGANIZATIONS, MEMBERSHIPS, INVITATIONS, ROLES, USERS, PERMISSIONS, DOMAINS, ROLE_SETS)
ACTIONS = ("created", "updated", "tombstoned")
SCOPE_INSTANCE = "instance"
SCOPE_ORGANIZATION = "organization"

# A listing's tie-break is rank 0, envelope timestamp 0 and no delivery: below every delivery's.
LISTING_RANK = 0
DELETED_RANK = MEMBERSHIP_RANK["deleted"]
# The type whose builder in models.events normalises a listed object of each kind.
_LISTED_AS = {
    ORGANIZATIONS: "organization.updated",
    MEMBERSHIPS: "organizationMembership.updated",
    INVITATIONS: "organizationInvitation.created",
    ROLES: "role.updated",
    USERS: "user.updated",
    PERMISSIONS: "permission.updated",
    DOMAINS: "organizationDomain.updated",
}
STICKY = frozenset({ORGANIZATIONS, ROLES, USERS, PERMISSIONS, DOMAINS})
# The resource of the deleted stub that tombstones each sticky kind, as its webhook would.
_STUB_RESOURCE = {
    ORGANIZATIONS: "organization",
    ROLES: "role",
    USERS: "user",
    PERMISSIONS: "permission",
    DOMAINS: "organizationDomain",
}
LISTING_ID = "orgsync-listing"
MAX_PARAMS = 30_000
MAX_IN = 500
# Clerk's invitation statuses; ``expired`` is derived on read from expires_at, never stored.
STORED_STATUS = {"pending": "pending", "expired": "pending", "accepted": "accepted", "revoked": "revoked"}


class SyncBusyError(RetryableError):
    """Another reconciliation of the same scope is running (its heartbeat is fresh)."""


def listing_version(kind: str, *, created_at: int | None, updated_at: int | None) -> str:
    """The version of an object as a listing shows it (see the module docstring)."""
    updated = updated_at if updated_at is not None else (created_at or 0)
    return row_version(
        created_at=(created_at or 0) if kind == MEMBERSHIPS else None,
        updated_at=updated,
        rank=LISTING_RANK,
        timestamp_ms=0,
        svix_id=None,
    )


def tombstone_version(kind: str, *, created_at: int | None, updated_at: int | None, checked_at: int) -> str:
    """The version of a row Clerk confirmed gone at ``checked_at`` (epoch ms)."""
    return row_version(
        created_at=(created_at or 0) if kind == MEMBERSHIPS else None,
        updated_at=max(updated_at or 0, checked_at),
        rank=DELETED_RANK,
        timestamp_ms=checked_at,
        svix_id=None,
    )


# ----------------------------------------------------------------------------- drift


@dataclass
class Drift:
    """What a run repaired, by kind and action: each one is an event orgsync missed."""

    counts: dict[str, dict[str, int]] = field(
        default_factory=lambda: {kind: dict.fromkeys(ACTIONS, 0) for kind in KINDS}
    )

    def add(self, kind: str, action: str, n: int = 1) -> None:
        if n:
            self.counts[kind][action] += n

    def merge(self, other: Drift) -> None:
        for kind, actions in other.counts.items():
            for action, n in actions.items():
                self.add(kind, action, n)

    @property
    def total(self) -> int:
        return sum(n for actions in self.counts.values() for n in actions.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {kind: dict(actions) for kind, actions in self.counts.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Drift:
        drift = cls()
        for kind in KINDS:
            for action in ACTIONS:
                value = ((data or {}).get(kind) or {}).get(action)
                if isinstance(value, int):
                    drift.add(kind, action, value)
        return drift


# ------------------------------------------------------------------- listing writes


def _key_columns(kind: str) -> tuple[str, ...]:
    return ("organization_id", "user_id") if kind == MEMBERSHIPS else ("id",)


def listed_row(kind: str, item: Mapping[str, Any]) -> dict[str, Any]:
    """A listed object as a mirror row (every column but ``synced_at``); ``PayloadError`` if unusable."""
    if kind == ROLE_SETS:
        values = role_set_values(item)
        values["version"] = listing_version(
            kind, created_at=values["created_at"], updated_at=values["updated_at"]
        )
        values["deleted"] = False
        return values
    data = dict(item)
    if kind == MEMBERSHIPS:
        # The organization is listed (and written) on its own: skip the snapshot's row here.
        organization = data.pop("organization", None)
        if isinstance(organization, dict) and not data.get("organization_id"):
            data["organization_id"] = organization.get("id")
    event = Event(svix_id=LISTING_ID, type=_LISTED_AS[kind], timestamp_ms=0, data=data)
    writes = [w for w in event_writes(event) if w.table == kind]
    if not writes:
        raise PayloadError(f"listed {kind} object yields no row")
    values = dict(writes[0].values)
    if kind == INVITATIONS:
        status = item.get("status")
        values["status"] = STORED_STATUS.get(status if isinstance(status, str) else "", "pending")
    values["version"] = listing_version(
        kind, created_at=values["created_at"], updated_at=values["updated_at"]
    )
    values["deleted"] = False
    return values


def row_key(kind: str, row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[c]) for c in _key_columns(kind))


def _assignments(table: Table, kind: str, excluded: Any) -> dict[str, Any]:
    keys = _key_columns(kind)
    assignments: dict[str, Any] = {c.name: excluded[c.name] for c in table.columns if c.name not in keys}
    if kind in STICKY:
        assignments["deleted"] = or_(table.c.deleted, excluded.deleted)
    if kind == INVITATIONS:
        # The API's invitation has no user_id (the webhook's has): never erase a known one.
        assignments["user_id"] = func.coalesce(excluded.user_id, table.c.user_id)
    return assignments


def _upsert_newer(session: Session, kind: str, rows: list[dict[str, Any]]) -> None:
    """Insert or overwrite rows whose version is newer than the mirror's (keys unique in ``rows``)."""
    if session.get_bind().dialect.name == "postgresql":
        _copy_upsert(session, kind, rows)
        return
    table = TABLES[kind]
    insert = sqlite.insert(table)
    statement = insert.on_conflict_do_update(
        index_elements=list(_key_columns(kind)),
        set_=_assignments(table, kind, insert.excluded),
        where=table.c.version < insert.excluded.version,
    )
    chunk = max(1, MAX_PARAMS // len(table.columns))
    for start in range(0, len(rows), chunk):
        session.execute(statement, rows[start : start + chunk])


def _copy_upsert(session: Session, kind: str, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: COPY the rows into a temporary table, then one INSERT ... SELECT ... ON CONFLICT.

    An executemany runs one statement per row on the server, and a multi-row VALUES statement
    of thousands of parameters is costly to build and to parse: a listing's pages of 500 rows
    would make the mirror's writes, not the API, the bound of a large reconciliation.
    """
    table = TABLES[kind]
    names = [c.name for c in table.columns]
    staging = f"reconcile_staging_{table.name}"
    connection = session.connection()
    # Per database session, emptied at every commit: created once per pooled connection.
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} (LIKE {table.name}) ON COMMIT DELETE ROWS"
    )
    connection.exec_driver_sql(f"TRUNCATE {staging}")
    json_columns = {c.name for c in table.columns if isinstance(c.type, JSON)}
    raw = cast(psycopg.Connection[Any], connection.connection.dbapi_connection)
    with raw.cursor() as cursor, cursor.copy(f"COPY {staging} ({', '.join(names)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(
                [Json(row[n]) if n in json_columns and row[n] is not None else row[n] for n in names]
            )
    source = sa_table(staging, *(sa_column(n) for n in names))
    insert = postgresql.insert(table).from_select(names, select(*(source.c[n] for n in names)))
    session.execute(
        insert.on_conflict_do_update(
            index_elements=list(_key_columns(kind)),
            set_=_assignments(table, kind, insert.excluded),
            where=table.c.version < insert.excluded.version,
        )
    )


def _current(session: Session, kind: str, keys: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], Any]:
    """(version, deleted) of the mirror's rows for ``keys``.

    Memberships are read by organization (the batch holds whole organizations): far fewer
    bound parameters than a row-value IN list, which is costly to build and to plan.
    """
    table = TABLES[kind]
    columns = [table.c[c] for c in _key_columns(kind)]
    lookup = sorted({k[0] for k in keys})
    wanted = set(keys)
    found: dict[tuple[str, ...], Any] = {}
    for start in range(0, len(lookup), MAX_IN):
        chunk = lookup[start : start + MAX_IN]
        query = select(*columns, table.c.version, table.c.deleted).where(columns[0].in_(chunk))
        for row in session.execute(query):
            key = tuple(str(v) for v in row[: len(columns)])
            if key in wanted:
                found[key] = row
    return found


def write_listing(session: Session, kind: str, items: Iterable[Mapping[str, Any]], *, now_ms: int) -> Drift:
    """Write the listed objects newer than the mirror's rows; returns what that repaired.

    Takes the mirror lock. Objects the mirror cannot interpret are logged and skipped, as a
    drifted webhook payload would be rejected.
    """
    lock_mirror_writes(session)
    best: dict[tuple[str, ...], dict[str, Any]] = {}
    for item in items:
        try:
            row = listed_row(kind, item)
        except PayloadError as exc:
            log.warning("skipping a listed %s object: %s", kind, exc)
            continue
        key = row_key(kind, row)
        if key not in best or best[key]["version"] < row["version"]:
            best[key] = row
    drift = Drift()
    if not best:
        return drift
    if kind == INVITATIONS:
        _fill_accepting_users(session, list(best.values()))
    current = _current(session, kind, list(best))
    writes: list[dict[str, Any]] = []
    for key, row in best.items():
        mirrored = current.get(key)
        if mirrored is not None and mirrored.version >= row["version"]:
            continue
        if mirrored is not None and mirrored.deleted and kind in STICKY:
            # Clerk never reuses these ids: the listing predates the deletion.
            continue
        drift.add(kind, "created" if mirrored is None or mirrored.deleted else "updated")
        writes.append(dict(row, synced_at=now_ms))
    # Change notifications: a repair is a change of the mirror like any webhook's (None when off).
    watched = notifications.capture(session, {kind: [row_key(kind, row) for row in writes]}, now_ms=now_ms)
    if writes:
        _upsert_newer(session, kind, writes)
    # By content, not only by version: a copy that no longer matches the user or role row it
    # derives from is rewritten even when nothing listed was newer.
    drift.add(MEMBERSHIPS, "updated", refresh_copies(session, _touched(kind, best)))
    notifications.emit(session, watched)
    return drift


def _touched(kind: str, rows: Mapping[tuple[str, ...], Mapping[str, Any]]) -> Touched:
    touched = Touched()
    if kind == USERS:
        touched.users.update(key[0] for key in rows)
    elif kind == ROLES:
        touched.role_keys.update(row["key"] for row in rows.values() if row["key"])
    elif kind == PERMISSIONS:
        touched.all_roles = True
    elif kind == MEMBERSHIPS:
        touched.members.update(key[1] for key in rows)
        touched.written_roles.update(row["role"] for row in rows.values() if row["role"])
    elif kind == INVITATIONS:
        touched.invitations.update(key[0] for key in rows)
        touched.written_roles.update(row["role"] for row in rows.values() if row["role"])
    return touched


def _fill_accepting_users(session: Session, rows: list[dict[str, Any]]) -> None:
    """The user who accepted each accepted invitation, from the organization's members.

    The Backend API leaves ``user_id`` out of invitations; accepting one makes the user with
    that email address a member, whose membership carries the address as its identifier.
    Memberships are written before invitations in every batch, so the member is there.
    """
    wanted = [r for r in rows if r["status"] == "accepted" and not r["user_id"] and r["email_address"]]
    if not wanted:
        return
    table = TABLES[MEMBERSHIPS]
    members: dict[tuple[str, str], tuple[bool, str]] = {}
    organization_ids = sorted({r["organization_id"] for r in wanted})
    for start in range(0, len(organization_ids), MAX_IN):
        query = select(table.c.organization_id, table.c.identifier, table.c.user_id, table.c.deleted).where(
            table.c.organization_id.in_(organization_ids[start : start + MAX_IN]),
            table.c.identifier.is_not(None),
        )
        for org_id, identifier, user_id, deleted in session.execute(query):
            key = (org_id, identifier.lower())
            # A live membership is the acceptance's own; a tombstone is only the best guess left.
            if key not in members or (members[key][0] and not deleted):
                members[key] = (bool(deleted), user_id)
    for row in wanted:
        found = members.get((row["organization_id"], row["email_address"].lower()))
        if found is not None:
            row["user_id"] = found[1]


# ------------------------------------------------------------------- missed deletes


@dataclass(frozen=True)
class Absent:
    """A live mirror row missing from a complete listing: to re-check with Clerk."""

    kind: str
    key: tuple[str, ...]
    organization_id: str | None
    created_at: int | None
    updated_at: int | None


def absent_rows(
    session: Session,
    kind: str,
    *,
    seen: AbstractSet[tuple[str, ...]],
    listed_since_ms: int,
    organization_id: str | None = None,
) -> list[Absent]:
    """Live rows of ``kind`` (of one organization for memberships and invitations) that the listing
    did not show and that nothing wrote since it began."""
    if organization_id is not None and not storable_text(organization_id):
        # No mirror row can have this id (write_listing skipped its listing), and PostgreSQL
        # would refuse it as a parameter: nothing of it is live.
        return []
    table = TABLES[kind]
    keys = [table.c[c] for c in _key_columns(kind)]
    query = select(*keys, table.c.created_at, table.c.updated_at).where(
        table.c.deleted.is_(False), table.c.synced_at < listed_since_ms
    )
    org_column = table.c.get("organization_id")
    if organization_id is not None and org_column is not None:
        query = query.where(org_column == organization_id)
    result: list[Absent] = []
    for row in session.execute(query):
        key = tuple(str(v) for v in row[: len(keys)])
        if key in seen:
            continue
        org = organization_id if kind in (MEMBERSHIPS, INVITATIONS) else None
        if kind == ORGANIZATIONS:
            org = key[0]
        result.append(Absent(kind, key, org, row.created_at, row.updated_at))
    return result


def tombstone_rows(session: Session, gone: Sequence[Absent], *, listed_since_ms: int, now_ms: int) -> Drift:
    """Tombstone memberships and invitations Clerk confirmed gone, unless written since the listing."""
    lock_mirror_writes(session)
    drift = Drift()
    # Change notifications (None when off): the tombstones written below are removals.
    watched = notifications.capture(
        session,
        {kind: [item.key for item in gone if item.kind == kind] for kind in (MEMBERSHIPS, INVITATIONS)},
        now_ms=now_ms,
    )
    for item in gone:
        if item.kind not in (MEMBERSHIPS, INVITATIONS):
            raise ValueError(f"tombstone_rows takes memberships and invitations, not {item.kind}")
        table = TABLES[item.kind]
        version = tombstone_version(
            item.kind, created_at=item.created_at, updated_at=item.updated_at, checked_at=now_ms
        )
        match = [table.c[c] == v for c, v in zip(_key_columns(item.kind), item.key, strict=True)]
        result = session.execute(
            update(table)
            .where(
                *match,
                table.c.deleted.is_(False),
                table.c.synced_at < listed_since_ms,
                table.c.version < version,
            )
            .values(deleted=True, version=version, synced_at=now_ms),
            execution_options={"synchronize_session": False},
        )
        drift.add(item.kind, "tombstoned", cast(Any, result).rowcount or 0)
    notifications.emit(session, watched)
    return drift


def _live_count(
    session: Session, kind: str, organization_ids: Sequence[str], *, column: str = "organization_id"
) -> int:
    table = TABLES[kind]
    total = 0
    for start in range(0, len(organization_ids), MAX_IN):
        chunk = organization_ids[start : start + MAX_IN]
        total += (
            session.scalar(select(func.count()).where(table.c[column].in_(chunk), table.c.deleted.is_(False)))
            or 0
        )
    return total


def tombstone_objects(
    session: Session, kind: str, ids: Sequence[str], *, listed_since_ms: int, now_ms: int
) -> Drift:
    """Organizations, roles, users, permissions or domains Clerk confirmed gone: deleted for
    good, with the webhook cascade."""
    if kind == ROLE_SETS:
        # No webhook deletes a role set: the tombstone is written here, versioned as a deletion.
        lock_mirror_writes(session)
        table = TABLES[kind]
        result = session.execute(
            update(table)
            .where(table.c.id.in_(list(ids)), table.c.deleted.is_(False), table.c.synced_at < listed_since_ms)
            .values(deleted=True, synced_at=now_ms),
            execution_options={"synchronize_session": False},
        )
        drift = Drift()
        drift.add(kind, "tombstoned", cast(Any, result).rowcount or 0)
        return drift
    if kind not in STICKY:
        raise ValueError(f"tombstone_objects takes {', '.join(sorted(STICKY))}, not {kind}")
    lock_mirror_writes(session)
    table = TABLES[kind]
    live = [
        str(value)
        for value in session.scalars(
            select(table.c.id).where(
                table.c.id.in_(list(ids)), table.c.deleted.is_(False), table.c.synced_at < listed_since_ms
            )
        )
    ]
    drift = Drift()
    if not live:
        return drift
    if kind == ORGANIZATIONS:
        drift.add(MEMBERSHIPS, "tombstoned", _live_count(session, MEMBERSHIPS, live))
        drift.add(INVITATIONS, "tombstoned", _live_count(session, INVITATIONS, live))
    elif kind == USERS:
        drift.add(MEMBERSHIPS, "tombstoned", _live_count(session, MEMBERSHIPS, live, column="user_id"))
        drift.add(INVITATIONS, "tombstoned", _live_count(session, INVITATIONS, live, column="user_id"))
    resource = _STUB_RESOURCE[kind]
    stubs = [
        Event(
            svix_id=f"orgsync-reconcile:{object_id}",
            type=f"{resource}.deleted",
            timestamp_ms=now_ms,
            data={"object": resource, "id": object_id, "deleted": True},
        )
        for object_id in live
    ]
    apply_events(session, stubs, now_ms=now_ms)
    drift.add(kind, "tombstoned", len(live))
    return drift


def unseen_organizations(session: Session, events: Sequence[Event]) -> list[str]:
    """Organizations these events concern that the mirror has no row for (call before applying).

    An organization created by one of the events is new, not unseen: its whole history
    arrives as webhooks. One deleted by them needs no listing either.
    """
    referenced: set[str] = set()
    skip: set[str] = set()
    for event in events:
        data = event.data
        if event.resource == "organization":
            org_id = data.get("id")
            if isinstance(org_id, str):
                referenced.add(org_id)
                if event.action in ("created", "deleted") or data.get("deleted") is True:
                    skip.add(org_id)
            continue
        if event.resource == "organizationMembership":
            # As the parser reads it: a drifted ``organization`` that is not an object is ignored.
            organization = data.get("organization")
            org_id = (organization.get("id") if isinstance(organization, dict) else None) or data.get(
                "organization_id"
            )
        elif event.resource == "organizationInvitation":
            org_id = data.get("organization_id")
        else:
            continue
        if isinstance(org_id, str) and org_id:
            referenced.add(org_id)
    wanted = sorted(referenced - skip)
    known: set[str] = set()
    for start in range(0, len(wanted), MAX_IN):
        chunk = wanted[start : start + MAX_IN]
        known.update(session.scalars(select(Organization.id).where(Organization.id.in_(chunk))))
    return [org_id for org_id in wanted if org_id not in known]


# ------------------------------------------------------------------------ sync runs


def claim_run(
    session: Session, *, scope: str, organization_id: str | None, now_ms: int, stale_after_ms: int
) -> tuple[SyncRun, bool]:
    """Start a run, or take over the latest interrupted one of the instance; (run, resumed).

    Raises ``SyncBusyError`` while a run of the same scope (and organization) is running with
    a fresh heartbeat. The mirror lock serialises claims, so two processes never both resume.
    """
    lock_mirror_writes(session)
    query = select(SyncRun).where(SyncRun.scope == scope).order_by(SyncRun.id.desc()).limit(1)
    if organization_id is not None:
        query = query.where(SyncRun.organization_id == organization_id)
    latest = session.scalars(query.with_for_update()).first()
    if (
        latest is not None
        and latest.status == SyncStatus.RUNNING
        and now_ms - latest.heartbeat_at < stale_after_ms
    ):
        age = now_ms - latest.heartbeat_at
        raise SyncBusyError(f"reconciliation run {latest.id} is running (last heartbeat {age} ms ago)")
    resumable = latest is not None and latest.status in (SyncStatus.RUNNING, SyncStatus.INTERRUPTED)
    if resumable and scope == SCOPE_INSTANCE:
        assert latest is not None
        latest.status = SyncStatus.RUNNING
        latest.heartbeat_at = now_ms
        latest.error = None
        session.flush()
        return latest, True
    if resumable:
        # An organization's run is short: start it over rather than resume it.
        assert latest is not None
        latest.status = SyncStatus.FAILED
        latest.error = "abandoned: a newer run of the same organization replaced it"
        latest.finished_at = now_ms
    run = SyncRun(
        scope=scope,
        organization_id=organization_id,
        status=SyncStatus.RUNNING,
        started_at=now_ms,
        heartbeat_at=now_ms,
        progress={},
        drift=Drift().as_dict(),
        api_calls=0,
        rate_limit_waits=0,
        rows_seen=0,
    )
    session.add(run)
    session.flush()
    return run, False


@dataclass(frozen=True)
class RunState:
    """What a run has counted so far; saved with its cursor at every checkpoint."""

    progress: dict[str, Any]
    drift: Drift
    api_calls: int
    rate_limit_waits: int
    rows_seen: int


def save_run(session: Session, run_id: int, state: RunState, *, now_ms: int) -> None:
    run = session.get(SyncRun, run_id)
    if run is None:
        raise PermanentError(f"reconciliation run {run_id} disappeared")
    run.progress = dict(state.progress)
    run.drift = state.drift.as_dict()
    run.api_calls = state.api_calls
    run.rate_limit_waits = state.rate_limit_waits
    run.rows_seen = state.rows_seen
    run.heartbeat_at = now_ms


def finish_run(
    session: Session, run_id: int, state: RunState, *, status: str, now_ms: int, error: str | None = None
) -> None:
    save_run(session, run_id, state, now_ms=now_ms)
    run = session.get(SyncRun, run_id)
    assert run is not None
    run.status = status
    run.error = error
    if status in (SyncStatus.COMPLETED, SyncStatus.FAILED):
        run.finished_at = now_ms


def latest_runs(session: Session, *, limit: int = 20) -> list[SyncRun]:
    return list(session.scalars(select(SyncRun).order_by(SyncRun.id.desc()).limit(limit)))
