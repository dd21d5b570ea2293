"""Svix signature verification of raw webhook bodies, with one specific reason per refusal."""

from __future__ import annotations

import binascii
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from standardwebhooks.webhooks import EmptyWebhookSecretError
from svix.webhooks import Webhook, WebhookVerificationError

from models.errors import ConfigError, PermanentError

TOLERANCE_SECONDS = 5 * 60
MAX_ID_LENGTH = 128  # inbox_events.svix_id is String(128)

_INTEGER = re.compile(r"-?[0-9]{1,20}")
_STALE = "svix-timestamp is more than 5 minutes in the past"
_FUTURE = "svix-timestamp is more than 5 minutes in the future"


class HeaderLookup(Protocol):
    """Case-insensitive header access, as werkzeug's ``Headers`` (or a dict with lowercase keys)."""

    def get(self, key: str, /) -> str | None: ...


class RejectionError(PermanentError):
    """A delivery refused before anything is stored: ``code`` is stable, ``message`` explains."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Delivery:
    """A verified delivery: the Svix message id, its timestamp in seconds and the decoded body."""

    svix_id: str
    timestamp: int
    body: str


def _header(headers: HeaderLookup, name: str) -> str:
    # Svix sends svix-*; Standard Webhooks senders use the unbranded webhook-* names.
    return headers.get(f"svix-{name}") or headers.get(f"webhook-{name}") or ""


class SignatureVerifier:
    """Verifies against every configured secret, so a rotation can overlap old and new secrets."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ConfigError("no webhook signing secret configured (CLERK_WEBHOOK_SIGNING_SECRET)")
        webhooks = []
        for position, secret in enumerate(secrets, start=1):
            try:
                webhooks.append(Webhook(secret))
            except (EmptyWebhookSecretError, binascii.Error, ValueError):
                # Name the position only: the value is a secret.
                raise ConfigError(
                    f"webhook signing secret {position} of {len(secrets)} is unusable"
                ) from None
        self._webhooks = tuple(webhooks)

    def verify(self, headers: HeaderLookup, body: bytes, *, now: float | None = None) -> Delivery:
        """Return the verified delivery or raise ``RejectionError``.

        ``headers`` must look names up case-insensitively (werkzeug's do) or use lowercase keys.
        The checks the svix library would report vaguely (or not as its own error type) are
        made here first, so each refusal names its cause.
        """
        msg_id = _header(headers, "id")
        raw_timestamp = _header(headers, "timestamp")
        signature = _header(headers, "signature")
        for name, value in (("id", msg_id), ("timestamp", raw_timestamp), ("signature", signature)):
            if not value:
                raise RejectionError("missing_headers", f"missing svix-{name} header (or webhook-{name})")
        if len(msg_id) > MAX_ID_LENGTH:
            raise RejectionError("invalid_id", f"svix-id is longer than {MAX_ID_LENGTH} characters")

        if not _INTEGER.fullmatch(raw_timestamp.strip()):
            raise RejectionError("invalid_timestamp", "svix-timestamp is not an integer number of seconds")
        timestamp = int(raw_timestamp)
        current = time.time() if now is None else now
        if timestamp < current - TOLERANCE_SECONDS:
            raise RejectionError("stale_timestamp", _STALE)
        if timestamp > current + TOLERANCE_SECONDS:
            raise RejectionError("future_timestamp", _FUTURE)

        for position, entry in enumerate(signature.split(" "), start=1):
            # svix splits each entry on its comma and raises a bare ValueError otherwise.
            if entry.count(",") != 1:
                raise RejectionError(
                    "malformed_signature", f"svix-signature entry {position} is not of the form 'v1,<base64>'"
                )

        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise RejectionError("invalid_encoding", "body is not valid UTF-8") from None

        svix_headers = {
            "svix-id": msg_id,
            "svix-timestamp": raw_timestamp.strip(),
            "svix-signature": signature,
        }
        for webhook in self._webhooks:
            try:
                webhook.verify(text, svix_headers)
            except WebhookVerificationError as exc:
                reason = str(exc)
                # The clock may move across the tolerance between our check and the library's.
                if "too old" in reason:
                    raise RejectionError("stale_timestamp", _STALE) from None
                if "too new" in reason:
                    raise RejectionError("future_timestamp", _FUTURE) from None
                continue
            except ValueError:
                # binascii.Error (bad base64 in a v1 entry) is a ValueError.
                raise RejectionError(
                    "malformed_signature", "svix-signature holds an entry that is not base64"
                ) from None
            return Delivery(svix_id=msg_id, timestamp=timestamp, body=text)
        raise RejectionError("invalid_signature", "no signature matches the configured signing secrets")
