"""Clerk webhook events: parsing, lenient normalisation into table rows, and row versions.

Everything here is pure (no database): ``parse_event`` turns a verified body into an
``Event``, ``event_writes`` turns an event into the rows it writes, each carrying the
``version`` that decides, in any order of arrival, which write of a row wins.

Version layout (fixed width, digits and lowercase hex only, so it sorts the same as a
Python ``str`` and under every database collation):

* memberships: ``created_at(15) updated_at(15) rank(1) envelope_ms(15) sha256(svix_id)[:16]``.
  ``created_at`` leads because a re-added member is a new generation (new ``orgmem_`` id,
  later ``created_at``) that must outrank the old generation's tombstone, while a late update
  of the old generation must not resurrect it. ``organizationMembership.deleted`` carries the
  SAME ``updated_at`` as the last change, so the kind rank (created < updated < deleted) breaks
  that tie.
* everything else: ``updated_at(15) rank(1) envelope_ms(15) sha256(svix_id)[:16]``.

Deleted stubs carry no timestamps: the envelope timestamp stands in for ``updated_at`` and
they take the top rank. The envelope timestamp and the hash of the delivery id only break
ties, deterministically, so duplicates of one delivery are no-ops and two distinct
deliveries never tie.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from sqlalchemy import JSON, BigInteger, Boolean, Integer, String

from models.errors import PayloadError
from models.tables import Base
from models.userdata import served_as_stored
from models.versions import row_version

# Envelope timestamps below this are seconds (the spec's examples), above it milliseconds.
SECONDS_THRESHOLD = 10**11
# 9999-12-31T23:59:59.999Z: the last instant a Python datetime holds, so every stored time
# renders, and well inside the version layout's fixed width.
MAX_TIMESTAMP_MS = 253_402_300_799_999
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
_MAX_DIGITS = len(str(INT64_MAX))
# Metadata is small and shallow in practice; the bound keeps every JSON encoder on the way
# (SQLAlchemy's, psycopg's, PostgreSQL's jsonb parser) far from its recursion limit.
MAX_JSON_DEPTH = 64

ORGANIZATIONS = "organizations"
MEMBERSHIPS = "memberships"
INVITATIONS = "invitations"
ROLES = "roles"
PERMISSIONS = "permissions"
USERS = "users"
DOMAINS = "organization_domains"
ROLE_SETS = "role_sets"

MIRRORED_EVENT_TYPES: frozenset[str] = frozenset(
    {
        "organization.created",
        "organization.updated",
        "organization.deleted",
        "organizationMembership.created",
        "organizationMembership.updated",
        "organizationMembership.deleted",
        "organizationInvitation.created",
        "organizationInvitation.accepted",
        "organizationInvitation.revoked",
        "role.created",
        "role.updated",
        "role.deleted",
        "permission.created",
        "permission.updated",
        "permission.deleted",
        "user.created",
        "user.updated",
        "user.deleted",
        "organizationDomain.created",
        "organizationDomain.updated",
        "organizationDomain.deleted",
    }
)

# Very old instances send bare role keys; everything else is stored exactly as sent,
# because a custom key without the ``org:`` prefix (the spec's role example has one) is
# still the key Clerk's API expects back, and guessing a prefix would break that.
LEGACY_ROLE_KEYS: Mapping[str, str] = {
    "admin": "org:admin",
    "basic_member": "org:member",
    "guest_member": "org:guest_member",
}

# Kind ranks break ties between writes of one row with equal object timestamps.
MEMBERSHIP_RANK = {"created": 0, "updated": 1, "deleted": 2}
# A membership event's organization snapshot ranks below the organization's own events.
ORGANIZATION_RANK = {"snapshot": 0, "created": 1, "updated": 2, "deleted": 3}
OBJECT_RANK = {"created": 0, "updated": 1, "deleted": 2}
INVITATION_RANK = {"pending": 0, "accepted": 1, "revoked": 1}
INVITATION_STATUS = {"created": "pending", "accepted": "accepted", "revoked": "revoked"}


@dataclass(frozen=True)
class Event:
    """One Clerk webhook delivery: ``svix_id`` is the delivery id, ``timestamp_ms`` normalised."""

    svix_id: str
    type: str
    timestamp_ms: int
    data: dict[str, Any]
    # The rows it writes, as ``parse_event`` built and checked them: applying the event reuses
    # them instead of building and checking them again (``data`` is not to be changed after).
    parsed_writes: tuple[Write, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def resource(self) -> str:
        return self.type.partition(".")[0]

    @property
    def action(self) -> str:
        return self.type.partition(".")[2]


@dataclass(frozen=True)
class Write:
    """One row an event writes: ``key`` is the primary key, ``values`` every column but synced_at."""

    table: str
    key: tuple[str, ...]
    version: str
    values: dict[str, Any]

    @property
    def deleted(self) -> bool:
        return bool(self.values["deleted"])


def parse_event(svix_id: str, body: str | bytes) -> Event:
    """Parse and fully validate a verified body; raises ``PayloadError`` naming what is wrong."""
    if not svix_id:
        raise PayloadError("delivery id (svix-id) is empty")
    try:
        envelope = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PayloadError("body is not valid JSON") from None
    if not isinstance(envelope, dict):
        raise PayloadError("body is not a JSON object")
    event_type = envelope.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise PayloadError("type missing or not a string")
    if envelope.get("object", "event") != "event":
        raise PayloadError("object is not 'event'")
    if event_type not in MIRRORED_EVENT_TYPES:
        raise PayloadError(f"event type {event_type!r} is not mirrored")
    data = envelope.get("data")
    if not isinstance(data, dict):
        raise PayloadError(f"data missing or not an object for {event_type}")
    event = Event(
        svix_id=svix_id,
        type=event_type,
        timestamp_ms=normalize_timestamp(envelope.get("timestamp")),
        data=data,
    )
    # Validation is the extraction itself: whatever the mirror cannot interpret fails here.
    return replace(event, parsed_writes=event_writes(event))


def normalize_timestamp(value: Any) -> int:
    """The envelope timestamp in milliseconds; the docs say ms, the spec's examples seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise PayloadError("timestamp missing or not a non-negative number")
    if isinstance(value, float) and not math.isfinite(value):
        raise PayloadError("timestamp is not a finite number")
    millis = int(value * 1000) if value < SECONDS_THRESHOLD else int(value)
    if millis > MAX_TIMESTAMP_MS:
        raise PayloadError("timestamp is after the year 9999")
    return millis


def normalize_role_key(role: str) -> str:
    return LEGACY_ROLE_KEYS.get(role, role)


def membership_version(
    *, created_at: int, updated_at: int, kind: str, timestamp_ms: int, svix_id: str
) -> str:
    """Version of a membership row; ``kind`` is created, updated or deleted."""
    return row_version(
        created_at=created_at,
        updated_at=updated_at,
        rank=MEMBERSHIP_RANK[kind],
        timestamp_ms=timestamp_ms,
        svix_id=svix_id,
    )


def object_version(*, updated_at: int, rank: int, timestamp_ms: int, svix_id: str) -> str:
    """Version of an organization, invitation, role, permission or user row."""
    return row_version(updated_at=updated_at, rank=rank, timestamp_ms=timestamp_ms, svix_id=svix_id)


# --- lenient field readers: a field drifted to another type becomes None rather than a rejected
# event; a value of the right type that no column could hold (NaN, 2**64, a NUL) rejects it ---


def _str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    return value if isinstance(value, str) else None


class UnstorableValueError(PayloadError):
    """A field of the right type whose value the mirror cannot hold; names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")


def _int(data: Mapping[str, Any], name: str, prefix: str = "data") -> int | None:
    """A whole number, or None when the field drifted to another type.

    A number that cannot be stored as one (NaN, an infinity, a fraction) is not drift: the
    event is rejected rather than stored with a silently changed value. Ranges are checked
    against the column, in ``check_storable``.
    """
    value = data.get(name)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnstorableValueError(f"{prefix}.{name}", f"is {value!r}, not a finite number")
        if not value.is_integer():
            raise UnstorableValueError(f"{prefix}.{name}", "is not a whole number")
        return int(value)
    if isinstance(value, str):
        digits = value.strip()
        # ASCII only: str.isdigit() also accepts digits such as superscripts that int() refuses.
        if not (digits.isascii() and digits.isdigit()):
            return None
        if len(digits) > _MAX_DIGITS:
            # Also keeps int() clear of its limit on digits (thousands): a ValueError there.
            raise UnstorableValueError(f"{prefix}.{name}", "is a number beyond the signed 64-bit range")
        return int(digits)
    return None


def _timestamp(data: Mapping[str, Any], name: str, prefix: str = "data") -> int | None:
    """Epoch milliseconds from 1970 to 9999, or None when the field drifted to another type."""
    value = _int(data, name, prefix)
    if value is not None and not 0 <= value <= MAX_TIMESTAMP_MS:
        raise UnstorableValueError(f"{prefix}.{name}", "is not a time in milliseconds between 1970 and 9999")
    return value


def _bool(data: Mapping[str, Any], name: str) -> bool | None:
    value = data.get(name)
    return value if isinstance(value, bool) else None


def _dict(data: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = data.get(name)
    return value if isinstance(value, dict) else None


def _keys(value: Any) -> list[str] | None:
    """Permission keys from a list of keys or of Permission objects (roles embed full objects)."""
    if not isinstance(value, list):
        return None
    keys: list[str] = []
    for item in value:
        if isinstance(item, str):
            keys.append(item)
        elif isinstance(item, dict) and isinstance(item.get("key"), str):
            keys.append(item["key"])
    return keys


def _required_id(data: Mapping[str, Any], path: str, event_type: str) -> str:
    value = data.get(path.rpartition(".")[2])
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{path} missing for {event_type}")
    return value


def _is_deletion(event: Event) -> bool:
    return event.action == "deleted" or event.data.get("deleted") is True


def _updated_at(data: Mapping[str, Any], event: Event, prefix: str = "data") -> int:
    # A stub has no timestamps; a payload that drifted without updated_at falls back the same way.
    updated = _timestamp(data, "updated_at", prefix)
    if updated is None:
        updated = _timestamp(data, "created_at", prefix)
    return event.timestamp_ms if updated is None else updated


def event_writes(event: Event) -> tuple[Write, ...]:
    """The rows ``event`` writes, with their versions.

    Raises ``PayloadError`` if the event is uninterpretable or holds a value its column cannot
    (checked against ``models.tables``), so that content no retry could store is rejected here.
    An event from ``parse_event`` carries its rows already checked.
    """
    if event.parsed_writes is not None:
        return event.parsed_writes
    builder = _BUILDERS.get(event.resource)
    if builder is None or event.type not in MIRRORED_EVENT_TYPES:
        raise PayloadError(f"event type {event.type!r} is not mirrored")
    try:
        writes = builder(event)
        for write in writes:
            _check_storable(write.table, write.values)
    except UnstorableValueError as exc:
        raise PayloadError(f"{exc} for {event.type}") from None
    return writes


def _organization_write(
    data: Mapping[str, Any], event: Event, *, kind: str, organization_id: str, prefix: str = "data"
) -> Write:
    deleted = kind == "deleted"
    version = object_version(
        updated_at=_updated_at(data, event, prefix),
        rank=ORGANIZATION_RANK[kind],
        timestamp_ms=event.timestamp_ms,
        svix_id=event.svix_id,
    )
    values: dict[str, Any] = {
        "id": organization_id,
        "name": _str(data, "name"),
        "slug": _str(data, "slug"),
        "image_url": _str(data, "image_url"),
        "has_image": _bool(data, "has_image"),
        "max_allowed_memberships": _int(data, "max_allowed_memberships", prefix),
        "admin_delete_enabled": _bool(data, "admin_delete_enabled"),
        "members_count": _int(data, "members_count", prefix),
        "pending_invitations_count": _int(data, "pending_invitations_count", prefix),
        "missing_member_with_elevated_permissions": _bool(data, "missing_member_with_elevated_permissions"),
        "role_set_key": _str(data, "role_set_key"),
        "last_active_at": _timestamp(data, "last_active_at", prefix),
        "created_by": _str(data, "created_by"),
        "public_metadata": _dict(data, "public_metadata"),
        "private_metadata": _dict(data, "private_metadata"),
        "created_at": _timestamp(data, "created_at", prefix),
        "updated_at": _timestamp(data, "updated_at", prefix),
        "version": version,
        "deleted": deleted,
    }
    return Write(ORGANIZATIONS, (organization_id,), version, values)


def _organization_event(event: Event) -> tuple[Write, ...]:
    organization_id = _required_id(event.data, "data.id", event.type)
    kind = "deleted" if _is_deletion(event) else event.action
    return (_organization_write(event.data, event, kind=kind, organization_id=organization_id),)


def _membership_event(event: Event) -> tuple[Write, ...]:
    data = event.data
    membership_id = _required_id(data, "data.id", event.type)
    organization = _dict(data, "organization")
    organization_id = (organization or {}).get("id") or data.get("organization_id")
    if not isinstance(organization_id, str) or not organization_id:
        raise PayloadError(f"data.organization.id missing for {event.type}")
    user_data = _dict(data, "public_user_data")
    user_id = (user_data or {}).get("user_id") or data.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise PayloadError(f"data.public_user_data.user_id missing for {event.type}")
    deleted = event.action == "deleted"
    role = _str(data, "role")
    if role is None:
        if not deleted:
            raise PayloadError(f"data.role missing for {event.type}")
        role = ""
    created_at = _timestamp(data, "created_at")
    updated_at = _timestamp(data, "updated_at")
    version = membership_version(
        created_at=created_at or 0,
        updated_at=updated_at if updated_at is not None else (created_at or 0),
        kind=event.action,
        timestamp_ms=event.timestamp_ms,
        svix_id=event.svix_id,
    )
    values: dict[str, Any] = {
        "organization_id": organization_id,
        "user_id": user_id,
        "id": membership_id,
        "role": normalize_role_key(role),
        "role_name": _str(data, "role_name"),
        "permissions": _keys(data.get("permissions")),
        "identifier": _str(user_data or {}, "identifier"),
        "public_user_data": user_data,
        "user_data_complete": served_as_stored(user_data, user_id),
        "public_metadata": _dict(data, "public_metadata"),
        "private_metadata": _dict(data, "private_metadata"),
        "created_at": created_at,
        "updated_at": updated_at,
        "version": version,
        "deleted": deleted,
    }
    writes = [Write(MEMBERSHIPS, (organization_id, user_id), version, values)]
    if organization is not None:
        writes.append(
            _organization_write(
                organization,
                event,
                kind="snapshot",
                organization_id=organization_id,
                prefix="data.organization",
            )
        )
    return tuple(writes)


def _invitation_event(event: Event) -> tuple[Write, ...]:
    data = event.data
    invitation_id = _required_id(data, "data.id", event.type)
    organization_id = _required_id(data, "data.organization_id", event.type)
    # The event type is authoritative; ``expired`` is never stored, it is derived on read.
    status = INVITATION_STATUS[event.action]
    version = object_version(
        updated_at=_updated_at(data, event),
        rank=INVITATION_RANK[status],
        timestamp_ms=event.timestamp_ms,
        svix_id=event.svix_id,
    )
    role = _str(data, "role")
    values: dict[str, Any] = {
        "id": invitation_id,
        "organization_id": organization_id,
        "email_address": _str(data, "email_address"),
        "role": None if role is None else normalize_role_key(role),
        "role_name": _str(data, "role_name"),
        "status": status,
        "user_id": _str(data, "user_id"),
        "inviter_id": _str(data, "inviter_id"),
        "url": _str(data, "url"),
        "public_metadata": _dict(data, "public_metadata"),
        "private_metadata": _dict(data, "private_metadata"),
        "expires_at": _timestamp(data, "expires_at"),
        "created_at": _timestamp(data, "created_at"),
        "updated_at": _timestamp(data, "updated_at"),
        "version": version,
        "deleted": False,
    }
    return (Write(INVITATIONS, (invitation_id,), version, values),)


def _object_version(event: Event) -> tuple[str, bool]:
    deleted = _is_deletion(event)
    rank = OBJECT_RANK["deleted" if deleted else event.action]
    version = object_version(
        updated_at=_updated_at(event.data, event),
        rank=rank,
        timestamp_ms=event.timestamp_ms,
        svix_id=event.svix_id,
    )
    return version, deleted


def _role_event(event: Event) -> tuple[Write, ...]:
    data = event.data
    role_id = _required_id(data, "data.id", event.type)
    version, deleted = _object_version(event)
    key = _str(data, "key")
    values: dict[str, Any] = {
        "id": role_id,
        "key": None if key is None else normalize_role_key(key),
        "name": _str(data, "name"),
        "description": _str(data, "description"),
        "is_creator_eligible": _bool(data, "is_creator_eligible"),
        "permissions": _keys(data.get("permissions")),
        "created_at": _timestamp(data, "created_at"),
        "updated_at": _timestamp(data, "updated_at"),
        "version": version,
        "deleted": deleted,
    }
    return (Write(ROLES, (role_id,), version, values),)


def _permission_event(event: Event) -> tuple[Write, ...]:
    data = event.data
    permission_id = _required_id(data, "data.id", event.type)
    version, deleted = _object_version(event)
    values: dict[str, Any] = {
        "id": permission_id,
        "key": _str(data, "key"),
        "name": _str(data, "name"),
        "description": _str(data, "description"),
        "type": _str(data, "type"),
        "created_at": _timestamp(data, "created_at"),
        "updated_at": _timestamp(data, "updated_at"),
        "version": version,
        "deleted": deleted,
    }
    return (Write(PERMISSIONS, (permission_id,), version, values),)


def primary_identifier(data: Mapping[str, Any]) -> str | None:
    """The primary email address, else the first listed, else the primary phone, else the username."""
    listed = data.get("email_addresses")
    addresses = [item for item in listed if isinstance(item, dict)] if isinstance(listed, list) else []
    primary_id = data.get("primary_email_address_id")
    for item in addresses:
        if primary_id is not None and item.get("id") == primary_id:
            email = item.get("email_address")
            if isinstance(email, str):
                return email
    for item in addresses:
        email = item.get("email_address")
        if isinstance(email, str):
            return email
    # Clerk's identifier of a user without email: the primary phone number, else the username.
    phones = data.get("phone_numbers")
    primary_phone = data.get("primary_phone_number_id")
    if isinstance(phones, list) and primary_phone is not None:
        for item in phones:
            if isinstance(item, dict) and item.get("id") == primary_phone:
                phone = item.get("phone_number")
                if isinstance(phone, str):
                    return phone
    return _str(data, "username")


def email_addresses(data: Mapping[str, Any]) -> list[str] | None:
    """Every email address of a user payload, primary first; None when the list drifted away."""
    listed = data.get("email_addresses")
    if not isinstance(listed, list):
        return None
    found = [
        item["email_address"]
        for item in listed
        if isinstance(item, dict) and isinstance(item.get("email_address"), str)
    ]
    primary = primary_identifier(data)
    if primary in found:
        found.remove(primary)
        found.insert(0, primary)
    return found


def _user_event(event: Event) -> tuple[Write, ...]:
    data = event.data
    user_id = _required_id(data, "data.id", event.type)
    version, deleted = _object_version(event)
    # Public data plus what joins a user to an app's own table and matches invitations to
    # users (external id, every email address); never phone numbers or private metadata.
    values: dict[str, Any] = {
        "id": user_id,
        "identifier": primary_identifier(data),
        "external_id": _str(data, "external_id"),
        "email_addresses": email_addresses(data),
        "banned": _bool(data, "banned"),
        "locked": _bool(data, "locked"),
        "last_active_at": _timestamp(data, "last_active_at"),
        "username": _str(data, "username"),
        "first_name": _str(data, "first_name"),
        "last_name": _str(data, "last_name"),
        "image_url": _str(data, "image_url"),
        "has_image": _bool(data, "has_image"),
        "public_metadata": _dict(data, "public_metadata"),
        "created_at": _timestamp(data, "created_at"),
        "updated_at": _timestamp(data, "updated_at"),
        "version": version,
        "deleted": deleted,
    }
    return (Write(USERS, (user_id,), version, values),)


def _domain_event(event: Event) -> tuple[Write, ...]:
    data = event.data
    domain_id = _required_id(data, "data.id", event.type)
    deleted = _is_deletion(event)
    organization_id = data.get("organization_id")
    if not isinstance(organization_id, str) or not organization_id:
        organization_id = (_dict(data, "public_organization_data") or {}).get("id")
    if not isinstance(organization_id, str) or not organization_id:
        if not deleted:
            raise PayloadError(f"data.organization_id missing for {event.type}")
        # A deleted stub may name only the domain; the row it tombstones keeps its organization.
        organization_id = ""
    version, _ = _object_version(event)
    verification = _dict(data, "affiliation_verification") or _dict(data, "verification") or {}
    values: dict[str, Any] = {
        "id": domain_id,
        "organization_id": organization_id,
        "name": _str(data, "name"),
        "enrollment_mode": _str(data, "enrollment_mode"),
        "affiliation_email_address": _str(data, "affiliation_email_address"),
        "verification_status": _str(verification, "status"),
        "total_pending_invitations": _int(data, "total_pending_invitations"),
        "total_pending_suggestions": _int(data, "total_pending_suggestions"),
        "created_at": _timestamp(data, "created_at"),
        "updated_at": _timestamp(data, "updated_at"),
        "version": version,
        "deleted": deleted,
    }
    return (Write(DOMAINS, (domain_id,), version, values),)


def _role_key_of(value: Any) -> str | None:
    key = value.get("key") if isinstance(value, dict) else None
    return normalize_role_key(key) if isinstance(key, str) else None


def role_set_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """A listed role set as a row (every column but version, deleted and synced_at).

    Clerk sends no webhook for role sets: they are only listed. Raises ``PayloadError`` when
    the object has no id or holds a value no column can.
    """
    role_set_id = data.get("id")
    if not isinstance(role_set_id, str) or not role_set_id:
        raise PayloadError("role set id missing")
    roles = data.get("roles")
    keys = [k for k in (_role_key_of(item) for item in roles) if k] if isinstance(roles, list) else None
    values: dict[str, Any] = {
        "id": role_set_id,
        "key": _str(data, "key"),
        "name": _str(data, "name"),
        "description": _str(data, "description"),
        "type": _str(data, "type"),
        "role_keys": keys,
        "default_role_key": _role_key_of(data.get("default_role")),
        "creator_role_key": _role_key_of(data.get("creator_role")),
        "created_at": _timestamp(data, "created_at"),
        "updated_at": _timestamp(data, "updated_at"),
    }
    try:
        _check_storable(ROLE_SETS, values)
    except UnstorableValueError as exc:
        raise PayloadError(f"{exc} for a role set") from None
    return values


# --- what the database can hold: every row is checked against its table before it is written ---


class _Column(NamedTuple):
    name: str
    kind: str  # text, int, json or bool
    low: int = 0
    high: int = sys.maxsize  # the most characters of a text, the largest value of an integer


def _schema(table_name: str) -> tuple[_Column, ...]:
    columns: list[_Column] = []
    for column in Base.metadata.tables[table_name].columns:
        kind = column.type
        if isinstance(kind, String):  # Text included: unbounded, still no NUL
            columns.append(_Column(column.name, "text", high=kind.length or sys.maxsize))
        elif isinstance(kind, BigInteger):
            if column.name.endswith("_at"):
                columns.append(_Column(column.name, "int", 0, MAX_TIMESTAMP_MS))
            else:
                columns.append(_Column(column.name, "int", -INT64_MAX - 1, INT64_MAX))
        elif isinstance(kind, Integer):
            columns.append(_Column(column.name, "int", -INT32_MAX - 1, INT32_MAX))
        elif isinstance(kind, JSON):
            columns.append(_Column(column.name, "json"))
        elif isinstance(kind, Boolean):
            columns.append(_Column(column.name, "bool"))
        else:
            # A new column type must say what it can hold before events may write it.
            raise TypeError(f"no storability check for {table_name}.{column.name} ({kind!r})")
    return tuple(columns)


_NOT_UNICODE = "is not valid Unicode (it holds an unpaired surrogate)"
_NUL = "contains a NUL character (PostgreSQL text cannot hold it)"


def _text_problem(value: str, limit: int = sys.maxsize) -> str | None:
    if "\x00" in value:
        return _NUL
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return _NOT_UNICODE
    if len(value) > limit:
        return f"is longer than {limit} characters"
    return None


def storable_text(value: str) -> bool:
    """Whether every database orgsync supports can hold ``value`` as text (length aside)."""
    return _text_problem(value) is None


def _json_problem(value: Any) -> str | None:
    """What keeps ``value`` out of a JSON column (PostgreSQL's jsonb in particular), if anything.

    Iterative, not recursive: a body nested close to the JSON parser's limit must not hit
    Python's recursion limit here. Only containers go on the stack; scalars are checked inline.
    """
    stack: list[tuple[Any, int]] = [((value,), -1)]
    while stack:
        container, depth = stack.pop()
        if depth >= MAX_JSON_DEPTH:
            return f"is nested deeper than {MAX_JSON_DEPTH} levels"
        if type(container) is dict:
            for key in container:
                if type(key) is not str:
                    return "holds a key that is not a string"
                if "\x00" in key or not key.isascii():
                    problem = _text_problem(key)
                    if problem is not None:
                        return f"holds a key that {problem}"
            children: Any = container.values()
        else:
            children = container
        for child in children:
            kind = type(child)
            if kind is str:
                if "\x00" in child or not child.isascii():
                    problem = _text_problem(child)
                    if problem is not None:
                        return f"holds a string that {problem}"
            elif kind is dict or kind is list:
                if child:
                    stack.append((child, depth + 1))
            elif kind is float:
                if not math.isfinite(child):
                    return "holds NaN or an infinity, which JSON cannot represent"
            elif child is not None and kind is not bool and kind is not int:
                return f"holds a {kind.__name__}, which is not a JSON value"
    return None


def _column_problem(column: _Column, value: Any) -> str | None:
    if column.kind == "text":
        if not isinstance(value, str):
            return "is not a string"
        return _text_problem(value, column.high)
    if column.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return "is not an integer"
        if not column.low <= value <= column.high:
            if column.name.endswith("_at"):
                return "is not a time in milliseconds between 1970 and 9999"
            bits = 32 if column.high == INT32_MAX else 64
            return f"is outside the signed {bits}-bit range"
        return None
    if column.kind == "bool":
        return None if isinstance(value, bool) else "is not a boolean"
    return _json_problem(value)


def _check_storable(table: str, values: Mapping[str, Any]) -> None:
    """Raise ``UnstorableValueError`` naming the first column whose value the database cannot hold."""
    # On every row of every event parsed: the common case is decided inline.
    for column in _SCHEMAS[table]:
        name, kind, low, high = column
        value = values.get(name)
        if value is None:
            continue
        if kind == "text":
            if type(value) is str and value.isascii() and "\x00" not in value and len(value) <= high:
                continue
        elif kind == "int":
            if type(value) is int and low <= value <= high:
                continue
        elif kind == "bool":
            if type(value) is bool:
                continue
        elif not value and type(value) in (dict, list):
            continue
        problem = _column_problem(column, value)
        if problem is not None:
            raise UnstorableValueError(f"{table}.{name}", problem)


_SCHEMAS: dict[str, tuple[_Column, ...]] = {
    name: _schema(name)
    for name in (ORGANIZATIONS, MEMBERSHIPS, INVITATIONS, ROLES, PERMISSIONS, USERS, DOMAINS, ROLE_SETS)
}

_BUILDERS = {
    "organization": _organization_event,
    "organizationMembership": _membership_event,
    "organizationInvitation": _invitation_event,
    "role": _role_event,
    "permission": _permission_event,
    "user": _user_event,
    "organizationDomain": _domain_event,
}
