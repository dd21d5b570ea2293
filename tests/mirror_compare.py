"""The mirror read back in the shape of the emulator's ``State.snapshot()``, and row-by-row differences."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import tables

# The snapshot's rows, table by table: (mirror table, key columns, columns), as State.snapshot() has them.
SHAPE: dict[str, tuple[type[tables.Base], tuple[str, ...], tuple[str, ...]]] = {
    "organizations": (
        tables.Organization,
        ("id",),
        (
            "id",
            "name",
            "slug",
            "max_allowed_memberships",
            "admin_delete_enabled",
            "created_by",
            "public_metadata",
            "private_metadata",
            "created_at",
            "updated_at",
        ),
    ),
    "memberships": (
        tables.Membership,
        ("organization_id", "user_id"),
        (
            "organization_id",
            "user_id",
            "id",
            "role",
            "role_name",
            "permissions",
            "identifier",
            "public_metadata",
            "private_metadata",
            "created_at",
            "updated_at",
        ),
    ),
    "invitations": (
        tables.Invitation,
        ("id",),
        (
            "id",
            "organization_id",
            "email_address",
            "role",
            "status",
            "user_id",
            "inviter_id",
            "public_metadata",
            "private_metadata",
            "expires_at",
            "created_at",
            "updated_at",
        ),
    ),
    "roles": (
        tables.Role,
        ("id",),
        (
            "id",
            "key",
            "name",
            "description",
            "is_creator_eligible",
            "permissions",
            "created_at",
            "updated_at",
        ),
    ),
    "permissions": (
        tables.Permission,
        ("id",),
        ("id", "key", "name", "description", "type", "created_at", "updated_at"),
    ),
    "users": (
        tables.User,
        ("id",),
        (
            "id",
            "identifier",
            "username",
            "first_name",
            "last_name",
            "public_metadata",
            "created_at",
            "updated_at",
        ),
    ),
}

Snapshot = Mapping[str, list[dict[str, Any]]]
RowKey = tuple[str, tuple[Any, ...]]


def mirror_snapshot(session: Session) -> dict[str, list[dict[str, Any]]]:
    """The live mirror (tombstones left out) in the shape and order of ``State.snapshot()``."""
    result: dict[str, list[dict[str, Any]]] = {}
    for name, (model, keys, columns) in SHAPE.items():
        table = model.__table__
        query = (
            select(*(table.c[c] for c in columns))
            .where(table.c.deleted.is_(False))
            .order_by(*(table.c[k] for k in keys))
        )
        result[name] = [dict(row._mapping) for row in session.execute(query)]
    return result


def as_mirrored(truth: Snapshot) -> dict[str, list[dict[str, Any]]]:
    """The snapshot, less the one thing the mirror deliberately does not keep.

    orgsync cascades ``user.deleted`` to the invitations that user accepted (tombstoned, see
    models/mirror.py and test_mirror's cascade test); the emulator, like Clerk's API, keeps
    them. Which of the two Clerk really does is undocumented; everything else must match.
    """
    live_users = {user["id"] for user in truth["users"]}
    kept = [i for i in truth["invitations"] if i["user_id"] is None or i["user_id"] in live_users]
    return {**truth, "invitations": kept}


def by_key(state: Snapshot) -> dict[RowKey, dict[str, Any]]:
    return {
        (name, tuple(row[k] for k in SHAPE[name][1])): row
        for name in SHAPE
        if name in state
        for row in state[name]
    }


def differences(mirror: Snapshot, truth: Snapshot) -> dict[RowKey, tuple[Any, Any]]:
    """(table, key) -> (mirror's row, truth's row) wherever they differ; None for a missing row."""
    ours, theirs = by_key(mirror), by_key(truth)
    return {
        key: (ours.get(key), theirs.get(key))
        for key in sorted(ours.keys() | theirs.keys(), key=repr)
        if ours.get(key) != theirs.get(key)
    }


def describe(diff: Mapping[RowKey, tuple[Any, Any]], limit: int = 5) -> str:
    shown = [f"{key}:\n  mirror: {pair[0]}\n  truth:  {pair[1]}" for key, pair in list(diff.items())[:limit]]
    return f"{len(diff)} rows differ, first {len(shown)}:\n" + "\n".join(shown)
