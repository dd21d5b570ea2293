"""The durable webhook inbox: store verified deliveries once, list them, replay them, sweep them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Insert, and_, bindparam, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.errors import PermanentError, RetryableError
from models.events import MIRRORED_EVENT_TYPES, storable_text
from models.tables import InboxEvent, InboxStatus

# The inbox and the parser must agree on what is applied: one list, kept beside the parser.
KNOWN_EVENT_TYPES = MIRRORED_EVENT_TYPES

_TABLE = InboxEvent.__table__
_TYPE_LENGTH = 128  # inbox_events.event_type is String(128)
_INSTANCE_LENGTH = 128  # inbox_events.instance_id is String(128)
# The reason's prefix on a delivery from an instance other than CLERK_INSTANCE_ID.
WRONG_INSTANCE = "wrong_instance:"
_SVIX_ID_LENGTH = 128


@dataclass(frozen=True)
class Stored:
    """What ``store_delivery`` did: the row's id, whether it already existed, and its status."""

    inbox_id: int
    duplicate: bool
    status: str
    reason: str | None = None


@dataclass(frozen=True)
class _Classified:
    status: str
    event_type: str | None
    reason: str | None
    instance_id: str | None = None


def _classify(body: str, expected_instance: str | None = None) -> _Classified:
    try:
        payload: Any = json.loads(body)
    except RecursionError:
        return _Classified(InboxStatus.REJECTED, None, "not_json: nested too deeply")
    except ValueError as exc:
        return _Classified(InboxStatus.REJECTED, None, f"not_json: {exc}")
    if not isinstance(payload, dict):
        return _Classified(
            InboxStatus.REJECTED, None, f"not_an_object: body is a JSON {type(payload).__name__}"
        )
    event_type = payload.get("type")
    if not isinstance(event_type, str) or not event_type:
        return _Classified(InboxStatus.REJECTED, None, "not_an_event: 'type' is missing or not a string")
    if not storable_text(event_type):
        # The column could not hold it (PostgreSQL text refuses NUL, UTF-8 a lone surrogate).
        return _Classified(
            InboxStatus.REJECTED, None, "not_an_event: 'type' holds a NUL character or invalid Unicode"
        )
    # Kept within the column: an over-long type is unknown anyway and stays readable in the row.
    event_type = event_type[:_TYPE_LENGTH]
    if payload.get("object") != "event":
        return _Classified(InboxStatus.REJECTED, event_type, "not_an_event: 'object' is not \"event\"")
    if not isinstance(payload.get("data"), dict):
        return _Classified(InboxStatus.REJECTED, event_type, "not_an_event: 'data' is not an object")
    instance_id = payload.get("instance_id")
    if not isinstance(instance_id, str) or not storable_text(instance_id):
        instance_id = None
    else:
        instance_id = instance_id[:_INSTANCE_LENGTH]
    if expected_instance is not None and instance_id != expected_instance:
        # A development and a production instance must never mix in one mirror.
        return _Classified(
            InboxStatus.REJECTED,
            event_type,
            f"{WRONG_INSTANCE} sent by {instance_id or 'an unnamed instance'!s}, "
            f"this mirror follows {expected_instance}",
            instance_id,
        )
    if event_type not in KNOWN_EVENT_TYPES:
        return _Classified(InboxStatus.IGNORED, event_type, None, instance_id)
    return _Classified(InboxStatus.PENDING, event_type, None, instance_id)


def _insert_for(dialect: str) -> Any:
    insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(_TABLE).values(
        svix_id=bindparam("svix_id"),
        event_type=bindparam("event_type"),
        instance_id=bindparam("instance_id"),
        status=bindparam("status"),
        attempts=0,
        last_error=bindparam("last_error"),
        body=bindparam("body"),
        received_at=bindparam("received_at"),
        handled_at=bindparam("handled_at"),
    )
    return statement.on_conflict_do_nothing(index_elements=[_TABLE.c.svix_id]).returning(_TABLE.c.id)


# Built once per dialect: the hot path then only binds parameters to a cached compiled form.
_INSERTS: dict[str, Insert] = {name: _insert_for(name) for name in ("postgresql", "sqlite")}
_SELECT_EXISTING = select(_TABLE.c.id, _TABLE.c.status, _TABLE.c.last_error).where(
    _TABLE.c.svix_id == bindparam("svix_id")
)


def store_delivery(
    session: Session | Connection,
    *,
    svix_id: str,
    body: str,
    received_at: int,
    expected_instance: str | None = None,
) -> Stored:
    """Insert one verified delivery unless its ``svix_id`` is known; never commits.

    Takes a Session or, on the hot intake path, a plain Connection (no ORM unit of work to pay
    for on every request).

    A body that is not a Clerk event envelope is stored as ``rejected`` with the reason, an
    unknown type as ``ignored``, anything else as ``pending``. Both outcomes are acknowledged
    by the caller: a retry could not make the body any different. The envelope's
    ``instance_id`` is recorded; with ``expected_instance`` set, a delivery from any other
    instance is stored as ``rejected`` and never applied.
    """
    if not svix_id or len(svix_id) > _SVIX_ID_LENGTH:
        raise PermanentError(f"svix_id must be 1..{_SVIX_ID_LENGTH} characters")
    verdict = _classify(body, expected_instance)
    reason = verdict.reason
    if "\x00" in body:
        # PostgreSQL text cannot hold NUL. Valid JSON never contains a raw NUL, so this body
        # is already rejected; keep a readable copy instead of failing the delivery.
        body = body.replace("\x00", "\ufffd")
    bind = session if isinstance(session, Connection) else session.get_bind()
    dialect = bind.dialect.name
    statement = _INSERTS.get(dialect)
    if statement is None:
        raise PermanentError(f"unsupported database dialect {dialect!r}")
    handled_at = None if verdict.status == InboxStatus.PENDING else received_at
    inserted = session.execute(
        statement,
        {
            "svix_id": svix_id,
            "event_type": verdict.event_type,
            "instance_id": verdict.instance_id,
            "status": verdict.status,
            "last_error": reason,
            "body": body,
            "received_at": received_at,
            "handled_at": handled_at,
        },
    ).scalar_one_or_none()
    if inserted is not None:
        return Stored(int(inserted), duplicate=False, status=verdict.status, reason=reason)
    # ON CONFLICT DO NOTHING waits for a concurrent insert of the same id to commit, so under
    # READ COMMITTED this fresh statement sees that row.
    existing = session.execute(_SELECT_EXISTING, {"svix_id": svix_id}).one_or_none()
    if existing is None:
        # The conflicting row vanished between the two statements (deleted by an operator):
        # a retry of the delivery will simply insert it.
        raise RetryableError(f"delivery {svix_id} conflicted with a row that no longer exists")
    return Stored(int(existing.id), duplicate=True, status=existing.status, reason=existing.last_error)


def list_events(session: Session, *, status: str | None = None, limit: int = 50) -> list[InboxEvent]:
    """The newest inbox rows first, optionally only those with ``status``."""
    if status is not None and status not in InboxStatus.ALL:
        raise PermanentError(f"unknown inbox status {status!r}; expected one of {', '.join(InboxStatus.ALL)}")
    if limit < 1:
        raise PermanentError("limit must be at least 1")
    query = select(InboxEvent).order_by(InboxEvent.id.desc()).limit(limit)
    if status is not None:
        query = query.where(InboxEvent.status == status)
    return list(session.scalars(query))


def reset_for_replay(session: Session, refs: Sequence[str]) -> list[int]:
    """Make the referenced rows pending again; flushes, the caller enqueues after its commit.

    A ref is an inbox id or a svix id. Unknown refs raise ``PermanentError`` naming them and
    change nothing. Applying is idempotent (versions), so replaying an applied row is safe.
    """
    wanted = list(dict.fromkeys(ref.strip() for ref in refs if ref.strip()))
    if not wanted:
        return []
    numeric = [int(ref) for ref in wanted if ref.isdigit()]
    rows = session.execute(
        select(InboxEvent.id, InboxEvent.svix_id, InboxEvent.last_error, InboxEvent.redacted_at).where(
            or_(InboxEvent.svix_id.in_(wanted), InboxEvent.id.in_(numeric))
        )
    ).all()
    foreign = [row.svix_id for row in rows if (row.last_error or "").startswith(WRONG_INSTANCE)]
    if foreign:
        # A development and a production instance must never mix in one mirror, replay or not.
        raise PermanentError(
            f"inbox events from another Clerk instance are never applied: {', '.join(foreign)}"
        )
    redacted = [row.svix_id for row in rows if row.redacted_at is not None]
    if redacted:
        # Their personal data is gone: applying them again would write "[redacted]" into the mirror.
        raise PermanentError(
            f"inbox events whose personal data was redacted cannot be replayed: {', '.join(redacted)}; "
            "run `orgsync sync` to repair the mirror from Clerk instead"
        )
    by_svix = {row.svix_id: int(row.id) for row in rows}
    by_id = {int(row.id) for row in rows}
    ids: list[int] = []
    missing: list[str] = []
    for ref in wanted:
        # A svix id match wins: Svix ids are never bare digits, but an operator may type either.
        if ref in by_svix:
            ids.append(by_svix[ref])
        elif ref.isdigit() and int(ref) in by_id:
            ids.append(int(ref))
        else:
            missing.append(ref)
    if missing:
        raise PermanentError(f"unknown inbox events: {', '.join(missing)}")
    ids = list(dict.fromkeys(ids))
    session.execute(
        update(InboxEvent)
        .where(InboxEvent.id.in_(ids))
        .values(
            status=InboxStatus.PENDING,
            attempts=0,
            last_error=None,
            next_attempt_at=None,
            handled_at=None,
        ),
        execution_options={"synchronize_session": False},
    )
    session.flush()
    return ids


def due_pending_ids(session: Session, *, now_ms: int, grace_ms: int, limit: int) -> list[int]:
    """Pending rows received at least ``grace_ms`` ago and due for an attempt, oldest first.

    The grace keeps the sweeper off rows whose enqueue is still on its way from the web process.
    """
    query = (
        select(InboxEvent.id)
        .where(
            and_(
                InboxEvent.status == InboxStatus.PENDING,
                InboxEvent.received_at <= now_ms - grace_ms,
                or_(InboxEvent.next_attempt_at.is_(None), InboxEvent.next_attempt_at <= now_ms),
            )
        )
        .order_by(InboxEvent.id)
        .limit(limit)
    )
    return [int(value) for value in session.scalars(query)]
