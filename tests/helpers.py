"""Helpers shared by tests: Svix-signed requests built with the real ``svix`` signer."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from svix.webhooks import Webhook

T = TypeVar("T")


def wait_until(what: str, probe: Callable[[], T | None], bound: float = 60.0) -> T:
    """Poll ``probe`` until it returns a value; ``bound`` only turns a hang into a failure."""
    deadline = time.monotonic() + bound
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {bound:.0f} s")
        time.sleep(0.05)


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


def assert_no_secrets(text: str, *secrets: str) -> None:
    """None of ``secrets`` in ``text``, nor a ``whsec_`` secret's base64 body; names the line, masked."""
    for secret in secrets:
        for form in {secret, secret.removeprefix("whsec_")}:
            for number, line in enumerate(text.splitlines(), 1):
                if form in line:
                    shown = line.replace(form, "<SECRET>")
                    raise AssertionError(f"a secret ({secret[:8]}...) leaked, line {number}: {shown[:300]}")
