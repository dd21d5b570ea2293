"""Helpers shared by tests: Svix-signed requests built with the real ``svix`` signer."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from svix.webhooks import Webhook

from emulator.payloads import OMIT

# For payloads with only what a test reads (identity, role, timestamps): spread into
# organization_data / membership_data. A field left out is stored as null by the mirror.
BARE_ORGANIZATION: dict[str, Any] = {
    name: OMIT
    for name in (
        "image_url",
        "has_image",
        "members_count",
        "missing_member_with_elevated_permissions",
        "pending_invitations_count",
        "max_allowed_memberships",
        "admin_delete_enabled",
        "public_metadata",
        "private_metadata",
        "created_by",
    )
}
BARE_MEMBERSHIP: dict[str, Any] = {
    name: OMIT for name in ("role_name", "permissions", "public_metadata", "private_metadata")
}


def new_msg_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def signed_headers(
    secret: str,
    body: bytes | str,
    *,
    msg_id: str | None = None,
    timestamp: datetime | None = None,
    prefix: str = "svix",
) -> dict[str, str]:
    """Headers exactly as Svix sends them (``prefix="webhook"`` for the unbranded names)."""
    text = body.decode() if isinstance(body, bytes) else body
    msg_id = msg_id or new_msg_id()
    when = timestamp or datetime.now(tz=UTC)
    signature = Webhook(secret).sign(msg_id, when, text)
    return {
        f"{prefix}-id": msg_id,
        f"{prefix}-timestamp": str(int(when.timestamp())),
        f"{prefix}-signature": signature,
        "content-type": "application/json",
    }
