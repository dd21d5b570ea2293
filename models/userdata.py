"""A membership's public user data as the read API serves it, and when the stored copy
already is that.

Clerk requires ``user_id``, ``first_name``, ``last_name``, ``image_url``,
``profile_image_url`` and ``has_image`` in a membership's ``public_user_data`` and sends
``identifier`` too. A stored copy holding them all, with the membership's own user id, is
served as the JSON text it is stored as; any other copy is read
(``models.reads.membership_user_data``: the user id and identifier) and completed
(``complete_user_data``: Clerk's defaults), which costs a parse and an encoding per
membership on every page that shows it. Writers of memberships record which kind each copy
is (``Membership.user_data_complete``).
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

# Every field the read path adds when it is missing: ``membership_user_data`` the first two,
# ``complete_user_data`` the others.
SERVED_FIELDS = (
    "user_id",
    "identifier",
    "first_name",
    "last_name",
    "image_url",
    "profile_image_url",
    "has_image",
)


def complete_user_data(result: dict[str, Any]) -> dict[str, Any]:
    """Clerk's required public user data fields added to ``result`` (changed in place)."""
    result.setdefault("first_name", None)
    result.setdefault("last_name", None)
    result.setdefault("image_url", result.get("profile_image_url") or "")
    result.setdefault("profile_image_url", result["image_url"])
    result.setdefault("has_image", False)
    return result


def served_as_stored(data: object, user_id: str) -> bool:
    """Whether ``data``, a membership's public user data, is served unchanged: an object with
    ``user_id`` equal to the membership's and every other field of ``SERVED_FIELDS``."""
    return (
        type(data) is dict and data.get("user_id") == user_id and all(name in data for name in SERVED_FIELDS)
    )


def mark_served_copies(connection: sa.Connection, *, batch: int = 5_000) -> int:
    """Mark every membership whose stored public user data is served as stored, judged as its
    writers judge it, in key order, ``batch`` rows per round trip; returns how many. For rows
    written before writers recorded it (migration 0008)."""
    members = sa.table(
        "memberships",
        sa.column("organization_id", sa.String),
        sa.column("user_id", sa.String),
        sa.column("public_user_data", sa.JSON),
        sa.column("user_data_complete", sa.Boolean),
    )
    mark = (
        sa.update(members)
        .where(
            members.c.organization_id == sa.bindparam("k_org"),
            members.c.user_id == sa.bindparam("k_user"),
        )
        .values(user_data_complete=True)
    )
    marked = 0
    after = ("", "")
    while True:
        rows = connection.execute(
            sa.select(
                members.c.organization_id, members.c.user_id, sa.cast(members.c.public_user_data, sa.Text)
            )
            .where(sa.tuple_(members.c.organization_id, members.c.user_id) > sa.tuple_(*after))
            .order_by(members.c.organization_id, members.c.user_id)
            .limit(batch)
        ).all()
        if not rows:
            return marked
        served: list[dict[str, Any]] = [
            {"k_org": org, "k_user": user} for org, user, text in rows if _served_text(text, user)
        ]
        if served:
            connection.execute(mark, served)
            marked += len(served)
        after = (rows[-1][0], rows[-1][1])


def _served_text(text: str | None, user_id: str) -> bool:
    if text is None:
        return False
    try:
        return served_as_stored(json.loads(text), user_id)
    except ValueError:  # not JSON: read and completed on every page, as before
        return False
