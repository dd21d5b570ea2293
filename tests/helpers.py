"""Helpers shared by tests: Svix-signed requests built with the real ``svix`` signer."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from svix.webhooks import Webhook


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
