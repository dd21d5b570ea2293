"""Change notifications: what changed in the mirror, derived from the mirror's own writes.

Clerk's webhooks are at-least-once, out of order and sometimes superseded; the mirror already
turns them into a correct state. Applications beside orgsync want that state's changes, not
the raw webhooks, so each mirror write transaction compares the rows it may change before and
after it writes (``capture`` before, ``emit`` after, both in ``models.mirror.apply_events`` and
in reconciliation's writes) and announces the NET change of each object:

* a duplicate or stale webhook writes nothing, so it changes nothing and announces nothing;
* a burst of updates to one object inside one batch is one change, from the state before the
  batch to the state after it;
* a change is a difference in the object's own fields. Copies a membership embeds from its
  user and role rows (``public_user_data``, ``identifier``, ``role_name``, ``permissions``) and
  counters (``members_count``) change with other objects, which have their own events; the
  data of every event still shows the object as the mirror holds it after the change, in
  Clerk's API shape (``models.render`` over ``models.reads``' views).

Every change is delivered up to three ways, each optional:

1. the ``notifications`` outbox table, written in the same transaction as the mirror write,
   from which ``worker.notify`` sends signed webhooks (only when ``ORGSYNC_NOTIFY_URLS`` is set);
2. PostgreSQL ``NOTIFY`` on ``ORGSYNC_NOTIFY_CHANNEL``, queued in the same transaction, so
   listeners hear of it exactly when it commits (a small payload: id, type, ordering key, object);
3. in-process callbacks (``subscribe``, or ``orgsync.api.Orgsync.on_change``), called after
   the transaction commits in the process that wrote it, never after a rollback.

When none is configured, ``capture`` returns None at once and nothing is read or written:
the mirror's write path costs what it did before.

Event types: ``organization.created|updated|deleted``, ``membership.added|removed|role_changed|
updated``, ``invitation.created|accepted|revoked|expired|updated|deleted``,
``user.created|updated|deleted``. Invitations expire without a write (the mirror derives
``expired`` on read), so ``emit_expired`` announces them from a periodic scan, with an event id
derived from the invitation and its expiry so that scanning twice announces once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Row, Table, event, func, insert, or_, select, text, tuple_
from sqlalchemy.orm import Session

from models import reads, render
from models.errors import PermanentError
from models.events import INVITATIONS, MEMBERSHIPS, ORGANIZATIONS, USERS
from models.tables import (
    Invitation,
    Membership,
    Notification,
    NotificationStatus,
    Organization,
    User,
)

if TYPE_CHECKING:
    from models.settings import Settings

log = logging.getLogger(__name__)

Key = tuple[str, ...]
Callback = Callable[["Change"], None]

_TABLES: dict[str, Table] = {
    ORGANIZATIONS: cast(Table, Organization.__table__),
    USERS: cast(Table, User.__table__),
    MEMBERSHIPS: cast(Table, Membership.__table__),
    INVITATIONS: cast(Table, Invitation.__table__),
}
WATCHED = tuple(_TABLES)
OUTBOX = cast(Table, Notification.__table__)
# Columns whose change alone is no change of the object: bookkeeping, counters, and the copies
# a row embeds from other objects (those objects announce their own changes).
_BOOKKEEPING = frozenset({"version", "synced_at"})
IGNORED: dict[str, frozenset[str]] = {
    ORGANIZATIONS: _BOOKKEEPING
    | {
        "members_count",
        "pending_invitations_count",
        "last_active_at",
        "missing_member_with_elevated_permissions",
    },
    USERS: _BOOKKEEPING | {"last_active_at"},
    MEMBERSHIPS: _BOOKKEEPING
    | {"role_name", "permissions", "identifier", "public_user_data", "user_data_complete"},
    INVITATIONS: _BOOKKEEPING | {"role_name"},
}
# Deletions of the objects others hang from come after the changes of those others.
_LAST = frozenset({"organization.deleted", "user.deleted"})
MAX_IN = 500
# An invitation that expired this long ago or less is announced by the periodic scan; older
# ones were announced by an earlier scan (or expired while notifications were off).
EXPIRY_LOOKBACK_MS = 24 * 3600 * 1000
_PENDING_INFO = "orgsync_notifications"


# ------------------------------------------------------------------ configuration


@dataclass
class _Config:
    outbox: bool = False
    channel: str | None = None
    callbacks: list[Callback] = field(default_factory=list)


_config = _Config()
_config_lock = threading.Lock()


def configure(*, outbox: bool, channel: str | None) -> None:
    """Switch the outbox (webhook delivery) and the NOTIFY channel on or off for this process."""
    with _config_lock:
        _config.outbox = outbox
        _config.channel = channel


def configure_from(settings: Settings) -> None:
    """Configure from ``models.settings.Settings``: the outbox when URLs are set, the channel when named."""
    configure(outbox=bool(settings.notify_urls), channel=settings.notify_channel)


def subscribe(callback: Callback) -> Callable[[], None]:
    """Call ``callback(change)`` after each mirror write of this process commits; returns an unsubscribe.

    Callbacks run in the writing process (the worker applying events, or an embedded
    ``orgsync run``), in commit order, after the commit: a callback that raises is logged and
    the others still run; nothing is retried.
    """
    with _config_lock:
        _config.callbacks.append(callback)

    def unsubscribe() -> None:
        with _config_lock, suppress(ValueError):
            _config.callbacks.remove(callback)

    return unsubscribe


def enabled() -> bool:
    return _config.outbox or _config.channel is not None or bool(_config.callbacks)


@contextmanager
def configured(*, outbox: bool = False, channel: str | None = None) -> Iterator[None]:
    """This configuration for the block, the previous one after it (tests and benchmarks)."""
    with _config_lock:
        saved = (_config.outbox, _config.channel)
    configure(outbox=outbox, channel=channel)
    try:
        yield
    finally:
        configure(outbox=saved[0], channel=saved[1])


# ---------------------------------------------------------------------- changes


@dataclass(frozen=True)
class Change:
    """One change event: what a receiver gets as ``{"id", "type", "timestamp", "data"}``."""

    event_id: str
    type: str
    ordering_key: str
    object_id: str
    timestamp_ms: int
    data: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return webhook_body(self.event_id, self.type, self.timestamp_ms, self.data)


def webhook_body(
    event_id: str, event_type: str, timestamp_ms: int, data: Mapping[str, Any]
) -> dict[str, Any]:
    """The Standard Webhooks payload: ``timestamp`` in ISO 8601 (UTC), ``data`` the change."""
    stamp = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return {"id": event_id, "type": event_type, "timestamp": stamp.replace("+00:00", "Z"), "data": dict(data)}


def new_event_id() -> str:
    return f"ntf_{uuid.uuid4().hex}"


@dataclass
class Capture:
    """The rows a write may change, as they were before it (``capture``'s result for ``emit``)."""

    now_ms: int
    keys: dict[str, set[Key]]
    before: dict[str, dict[Key, Row[Any]]]


def _key_of(name: str, row: Any) -> Key:
    if name == MEMBERSHIPS:
        return (str(row.organization_id), str(row.user_id))
    return (str(row.id),)


def _chunks(items: Iterable[Any]) -> Iterator[list[Any]]:
    ordered = sorted(items)
    for start in range(0, len(ordered), MAX_IN):
        yield ordered[start : start + MAX_IN]


# PostgreSQL: the keys as two (or one) array parameters joined through unnest: one short
# statement whatever the number of keys, instead of an IN list of a thousand parameters that
# is costly to build, convert and plan for every batch.
_PG_MEMBERSHIP_KEYS = text(
    "(organization_id, user_id) IN (SELECT * FROM unnest(CAST(:orgs AS text[]), CAST(:users AS text[])))"
)
_PG_IDS = text("id = ANY(CAST(:ids AS text[]))")


def _read(session: Session, name: str, keys: set[Key]) -> dict[Key, Row[Any]]:
    """The rows of ``keys``, whole; a key with no row is absent from the result."""
    table = _TABLES[name]
    found: dict[Key, Row[Any]] = {}
    if not keys:
        return found
    postgres = session.get_bind().dialect.name == "postgresql"
    rows: Iterable[Row[Any]]
    if postgres and name == MEMBERSHIPS:
        ordered = sorted(keys)
        query = select(table).where(_PG_MEMBERSHIP_KEYS)
        rows = session.execute(query, {"orgs": [k[0] for k in ordered], "users": [k[1] for k in ordered]})
    elif postgres:
        rows = session.execute(select(table).where(_PG_IDS), {"ids": sorted(key[0] for key in keys)})
    elif name == MEMBERSHIPS:
        rows = (
            row
            for chunk in _chunks(keys)
            for row in session.execute(
                select(table).where(tuple_(table.c.organization_id, table.c.user_id).in_(chunk))
            )
        )
    else:
        rows = (
            row
            for chunk in _chunks(key[0] for key in keys)
            for row in session.execute(select(table).where(table.c.id.in_(chunk)))
        )
    for row in rows:
        found[_key_of(name, row)] = row
    return found


def _live_keys(session: Session, name: str, column: str, ids: Iterable[str]) -> set[Key]:
    table = _TABLES[name]
    keys: set[Key] = set()
    for chunk in _chunks(set(ids)):
        query = select(table).where(table.c[column].in_(chunk), table.c.deleted.is_(False))
        keys.update(_key_of(name, row) for row in session.execute(query))
    return keys


def capture(
    session: Session,
    writes: Mapping[str, Iterable[Key]],
    *,
    cascade_orgs: Iterable[str] = (),
    cascade_users: Iterable[str] = (),
    now_ms: int,
) -> Capture | None:
    """Read the rows a write is about to change: those of ``writes`` (keys by table name) and the
    live memberships and invitations of the organizations and users it deletes (the cascade).

    None, reading nothing, when no notification channel is configured.
    """
    if not enabled():
        return None
    keys = {name: set(writes.get(name, ())) for name in WATCHED}
    orgs, users = set(cascade_orgs), set(cascade_users)
    for name in (MEMBERSHIPS, INVITATIONS):
        if orgs:
            keys[name] |= _live_keys(session, name, "organization_id", orgs)
        if users:
            keys[name] |= _live_keys(session, name, "user_id", users)
    return Capture(now_ms, keys, {name: _read(session, name, keys[name]) for name in WATCHED})


@dataclass(frozen=True)
class _Diff:
    type: str
    name: str
    row: Row[Any]
    previous: dict[str, Any] | None = None


def _own(name: str, row: Row[Any]) -> dict[str, Any]:
    ignored = IGNORED[name]
    return {column: value for column, value in row._mapping.items() if column not in ignored}


def _created_type(name: str, row: Row[Any]) -> str:
    if name == INVITATIONS:
        return {"accepted": "invitation.accepted", "revoked": "invitation.revoked"}.get(
            row.status, "invitation.created"
        )
    return {ORGANIZATIONS: "organization.created", USERS: "user.created", MEMBERSHIPS: "membership.added"}[
        name
    ]


_DELETED_TYPE = {
    ORGANIZATIONS: "organization.deleted",
    USERS: "user.deleted",
    MEMBERSHIPS: "membership.removed",
    INVITATIONS: "invitation.deleted",
}


def diff(name: str, old: Row[Any] | None, new: Row[Any] | None) -> list[_Diff]:
    """The net change of one object from ``old`` to ``new`` (either None when there is no row)."""
    if new is None:
        return []  # the mirror never removes rows; retention does not touch mirrored tables
    was_live = old is not None and not old.deleted
    if new.deleted:
        if old is not None and old.deleted:
            return []  # a tombstone's data may still move (sticky deletions): no change for anyone
        return [_Diff(_DELETED_TYPE[name], name, new)]
    if not was_live:
        return [_Diff(_created_type(name, new), name, new)]
    assert old is not None
    before, after = _own(name, old), _own(name, new)
    if before == after:
        return []
    previous = {column: value for column, value in before.items() if after.get(column) != value}
    if name == MEMBERSHIPS:
        if old.id != new.id:
            # Removed and added again within the batch: a new generation of the membership.
            return [_Diff("membership.removed", name, old), _Diff("membership.added", name, new)]
        if "role" in previous:
            previous.setdefault("role_name", old.role_name)
            return [_Diff("membership.role_changed", name, new, previous)]
        return [_Diff("membership.updated", name, new, previous)]
    if name == INVITATIONS and "status" in previous:
        kind = {"accepted": "invitation.accepted", "revoked": "invitation.revoked"}.get(new.status)
        if kind is not None:
            return [_Diff(kind, name, new, previous)]
    prefix = {ORGANIZATIONS: "organization", USERS: "user", INVITATIONS: "invitation"}[name]
    return [_Diff(f"{prefix}.updated", name, new, previous)]


def emit(session: Session, captured: Capture | None) -> list[Change]:
    """Compare the captured rows with what they are now; record and announce each net change.

    Call in the same transaction as ``capture``, after the write (cascades and copies included).
    """
    if captured is None:
        return []
    diffs: list[_Diff] = []
    for name in WATCHED:
        after = _read(session, name, captured.keys[name])
        before = captured.before[name]
        for key in sorted(captured.keys[name]):
            diffs.extend(diff(name, before.get(key), after.get(key)))
    if not diffs:
        return []
    diffs.sort(key=lambda item: item.type in _LAST)  # stable: table order otherwise
    changes = _render(session, diffs, captured.now_ms)
    record(session, changes)
    return changes


def record(session: Session, changes: Sequence[Change]) -> None:
    """Write ``changes`` to the outbox and NOTIFY channel and queue them for the callbacks."""
    if not changes:
        return
    if _config.outbox:
        session.execute(
            insert(OUTBOX),
            [
                {
                    "event_id": change.event_id,
                    "type": change.type,
                    "ordering_key": change.ordering_key,
                    "object_id": change.object_id,
                    "data": change.data,
                    "created_at": change.timestamp_ms,
                    "status": NotificationStatus.PENDING,
                    "attempts": 0,
                    "next_attempt_at": change.timestamp_ms,
                }
                for change in changes
            ],
        )
    if _config.channel is not None and session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) AS payload"),
            {"channel": _config.channel, "payloads": [notify_payload(change) for change in changes]},
        )
    if _config.callbacks:
        session.info.setdefault(_PENDING_INFO, []).extend(changes)


def notify_payload(change: Change) -> str:
    """What a NOTIFY listener gets: enough to decide whether to read the mirror (or the outbox).

    Ids and keys are mirror columns of at most 64 characters: a payload is a few hundred
    bytes, far below PostgreSQL's 8000-byte limit, whatever the object.
    """
    return json.dumps(
        {
            "id": change.event_id,
            "type": change.type,
            "ordering_key": change.ordering_key,
            "object_id": change.object_id,
        },
        separators=(",", ":"),
    )


# ------------------------------------------------------------------------ render


def _render(session: Session, diffs: Sequence[_Diff], now_ms: int) -> list[Change]:
    """Each changed row in Clerk's API shape, read through the one read layer in a few queries."""
    by_name: dict[str, list[_Diff]] = {}
    for item in diffs:
        by_name.setdefault(item.name, []).append(item)
    objects: dict[int, dict[str, Any]] = {}
    orgs = by_name.get(ORGANIZATIONS, [])
    if orgs:
        records = reads.organization_records(session, cast(Any, [d.row for d in orgs]), now_ms)
        for item in orgs:
            objects[id(item)] = render.organization(records[item.row.id], counts=True)
    members = by_name.get(MEMBERSHIPS, [])
    if members:
        views = reads.membership_views(session, [d.row for d in members], now_ms)
        for item, view in zip(members, views, strict=True):
            objects[id(item)] = render.membership(view)
    invitations = by_name.get(INVITATIONS, [])
    if invitations:
        records_i = reads.invitation_records(session, cast(Any, [d.row for d in invitations]), now_ms)
        for item, record_i in zip(invitations, records_i, strict=True):
            objects[id(item)] = render.invitation(record_i, with_organization=True)
    for item in by_name.get(USERS, []):
        objects[id(item)] = render.user(reads.user_record(cast(Any, item.row)))
    changes = []
    for item in diffs:
        obj = objects[id(item)]
        if item.row.deleted:
            obj["deleted"] = True
        data: dict[str, Any] = {"object": obj}
        row = item.row
        if item.name in (MEMBERSHIPS, INVITATIONS):
            data["organization_id"] = row.organization_id
            if row.user_id is not None:
                data["user_id"] = row.user_id
        if item.previous is not None:
            data["previous"] = item.previous
        ordering_key = row.id if item.name in (ORGANIZATIONS, USERS) else row.organization_id
        changes.append(Change(new_event_id(), item.type, str(ordering_key), str(row.id), now_ms, data))
    return changes


# ----------------------------------------------------------------------- expiry


def expired_event_id(invitation_id: str, expires_at: int) -> str:
    """The same id for the same expiry, however often the scan sees it."""
    digest = hashlib.sha256(f"{invitation_id}:{expires_at}".encode()).hexdigest()[:32]
    return f"ntf_x{digest}"


_expired_scanned_to: int | None = None


def emit_expired(session: Session, *, now_ms: int, lookback_ms: int = EXPIRY_LOOKBACK_MS) -> list[Change]:
    """Announce pending invitations that expired in the last ``lookback_ms`` and were not announced.

    With the outbox, an expiry is announced once whatever the process: its event id is derived
    from the invitation and its expiry, and ids already in the outbox are skipped. Without it
    (NOTIFY or callbacks only) there is no record to consult, so each process announces the
    expiries since its previous scan. Takes no mirror lock: it writes no mirror row.
    """
    global _expired_scanned_to  # noqa: PLW0603 (the process's scan position, as documented)
    if not enabled():
        return []
    since = now_ms - lookback_ms
    if not _config.outbox and _expired_scanned_to is not None:
        since = max(since, _expired_scanned_to)
    table = _TABLES[INVITATIONS]
    rows = list(
        session.execute(
            select(table).where(
                table.c.deleted.is_(False),
                table.c.status == "pending",
                table.c.expires_at <= now_ms,
                table.c.expires_at > since,
            )
        )
    )
    _expired_scanned_to = now_ms
    if not rows:
        return []
    ids = {row.id: expired_event_id(row.id, row.expires_at) for row in rows}
    known: set[str] = set()
    if _config.outbox:
        for chunk in _chunks(ids.values()):
            known.update(session.scalars(select(OUTBOX.c.event_id).where(OUTBOX.c.event_id.in_(chunk))))
    fresh = [row for row in rows if ids[row.id] not in known]
    if not fresh:
        return []
    views = reads.invitation_records(session, cast(Any, fresh), now_ms)
    changes = [
        Change(
            ids[row.id],
            "invitation.expired",
            str(row.organization_id),
            str(row.id),
            int(row.expires_at),
            {
                "object": render.invitation(view, with_organization=True),
                "organization_id": row.organization_id,
            },
        )
        for row, view in zip(fresh, views, strict=True)
    ]
    record(session, changes)
    return changes


# -------------------------------------------------------------------- callbacks


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    changes: list[Change] = session.info.pop(_PENDING_INFO, [])
    if not changes:
        return
    callbacks = list(_config.callbacks)
    for change in changes:
        for callback in callbacks:
            try:
                callback(change)
            except Exception:
                log.exception("a change notification callback failed on %s %s", change.type, change.event_id)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING_INFO, None)


# ------------------------------------------------------------------- the outbox


class NotificationNotFoundError(PermanentError):
    """No outbox row with that id or event id; the message names every one missing."""


def list_notifications(
    session: Session,
    *,
    status: str | None = None,
    type_prefix: str | None = None,
    ordering_key: str | None = None,
    limit: int = 50,
) -> list[Notification]:
    """Outbox rows, newest first; ``type_prefix`` matches ``membership`` or ``membership.added``."""
    query = select(Notification).order_by(Notification.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Notification.status == status)
    if type_prefix:
        query = query.where(
            or_(
                Notification.type == type_prefix,
                Notification.type.startswith(f"{type_prefix}.", autoescape=True),
            )
        )
    if ordering_key is not None:
        query = query.where(Notification.ordering_key == ordering_key)
    return list(session.scalars(query))


def _lookup(session: Session, refs: Sequence[str]) -> list[Notification]:
    """Rows by outbox id or event id (``ntf_...``), in the order given; every unknown one named."""
    found: list[Notification] = []
    missing: list[str] = []
    for ref in refs:
        value = ref.strip()
        condition = Notification.id == int(value) if value.isdigit() else Notification.event_id == value
        row = session.scalars(select(Notification).where(condition)).first()
        if row is None:
            missing.append(ref)
        else:
            found.append(row)
    if missing:
        raise NotificationNotFoundError(
            f"no notification {', '.join(repr(ref) for ref in missing)} in the outbox"
        )
    return found


def get_notification(session: Session, ref: str) -> Notification:
    return _lookup(session, [ref])[0]


def retry_notifications(
    session: Session, refs: Sequence[str], *, all_dead: bool = False, now_ms: int
) -> list[Notification]:
    """Make dead (or delivered: sent again) rows pending and due now; pending ones are left as they are.

    A row sent again keeps its event id, so a receiver that already has it de-duplicates; its
    key's later rows wait for it again, which keeps the key's order.
    """
    rows = _lookup(session, refs)
    if all_dead:
        rows += list(
            session.scalars(
                select(Notification)
                .where(Notification.status == NotificationStatus.DEAD)
                .order_by(Notification.id)
            )
        )
    reset: list[Notification] = []
    for row in {row.id: row for row in rows}.values():
        if row.status == NotificationStatus.PENDING:
            continue
        row.status = NotificationStatus.PENDING
        row.next_attempt_at = now_ms
        row.last_error = None
        row.delivered_to = None
        row.delivered_at = None
        reset.append(row)
    session.flush()
    return reset


def outbox_health(session: Session, *, now_ms: int) -> dict[str, Any]:
    """The delivery state for ``orgsync status`` and the health endpoint: counts and the oldest wait."""
    # Delivered rows are not counted: there may be millions, and no one needs to act on them.
    counts = {
        status: int(session.scalar(select(func.count()).where(Notification.status == status)) or 0)
        for status in (NotificationStatus.PENDING, NotificationStatus.DEAD)
    }
    oldest = session.scalar(
        select(func.min(Notification.created_at)).where(Notification.status == NotificationStatus.PENDING)
    )
    failing = int(
        session.scalar(
            select(func.count()).where(
                Notification.status == NotificationStatus.PENDING, Notification.attempts > 0
            )
        )
        or 0
    )
    return {
        "pending": counts[NotificationStatus.PENDING],
        "failing": failing,
        "dead": counts[NotificationStatus.DEAD],
        "oldest_pending_age_s": round(max(0, now_ms - oldest) / 1000, 3) if oldest is not None else 0.0,
    }
