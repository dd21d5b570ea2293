"""The webhook route's request path: verify, classify, group-commit, answer; before Flask routing.

Every delivery costs the web process its HTTP handling, the signature check, the envelope
parse and its share of one commit; everything else is overhead that the intake rate pays for
on every request. ``IntakeMiddleware`` therefore answers ``POST /webhooks/clerk`` straight
from the WSGI environ (no request context, routing, ``Request`` or ``Response`` objects),
and hands any other request, and any webhook request it does not handle the plain way (a
chunked body, a malformed Content-Length), to the Flask app, whose view runs the same
``Intake.receive``. Both answer the same bytes for the same request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from werkzeug.http import HTTP_STATUS_CODES

from models import metrics
from models.clock import now_ms
from models.errors import RetryableError
from models.inbox import Stored, inbox_row
from models.tables import InboxStatus
from webhooks.committer import BatchFailedError, GroupCommitter
from webhooks.verify import HeaderLookup, RejectionError, SignatureVerifier

logger = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/clerk"
RETRY_AFTER_SECONDS = 5
JSON_HEADERS = (("Content-Type", "application/json"),)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@cache
def status_line(status: int) -> str:
    """The WSGI status line werkzeug's ``Response`` sends for ``status`` ("422 UNPROCESSABLE ENTITY")."""
    return f"{status} {HTTP_STATUS_CODES.get(status, 'unknown').upper()}"


@dataclass(frozen=True, slots=True)
class Answer:
    """A JSON answer: status, payload and any extra headers."""

    status: int
    payload: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


def error(status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    return Answer(status, {"error": code, "message": message}, headers)


def too_large(limit: int) -> Answer:
    metrics.delivery("too_large")
    return error(413, "payload_too_large", f"body exceeds {limit} bytes")


def _stored_answer(stored: Stored) -> Answer:
    payload: dict[str, Any] = {"id": stored.inbox_id}
    if stored.duplicate:
        payload["status"] = "duplicate"
        payload["stored_status"] = stored.status
    elif stored.status == InboxStatus.PENDING:
        payload["status"] = "accepted"
    elif stored.status == InboxStatus.IGNORED:
        payload["status"] = "ignored"
        payload["message"] = "event type not mirrored; acknowledged and stored"
    else:
        payload["status"] = stored.status
        payload["message"] = "acknowledged and stored as rejected; it will not be applied"
    if stored.reason and not stored.duplicate:
        payload["reason"] = stored.reason
    return Answer(200, payload)


_UNAVAILABLE = error(
    503,
    "database_unavailable",
    "the inbox cannot be written right now; retry later",
    (("Retry-After", str(RETRY_AFTER_SECONDS)),),
)
_INTERNAL = error(500, "internal_error", "internal server error")


class Intake:
    """One delivery in, one answer out: 2xx only once the delivery is committed."""

    def __init__(
        self, verifier: SignatureVerifier, committer: GroupCommitter, *, expected_instance: str | None
    ) -> None:
        self.verifier = verifier
        self.committer = committer
        self.expected_instance = expected_instance

    def receive(self, headers: HeaderLookup, body: bytes) -> Answer:
        try:
            delivery = self.verifier.verify(headers, body)
        except RejectionError as rejection:
            refused_id = headers.get("svix-id") or headers.get("webhook-id")
            logger.info(
                "webhook refused: %s (%s), id %r",
                rejection.code,
                rejection.message,
                refused_id,
                extra={"delivery_id": refused_id},
            )
            metrics.delivery("refused", rejection.code)
            return error(rejection.status, rejection.code, rejection.message)
        row = inbox_row(
            svix_id=delivery.svix_id,
            body=delivery.body,
            received_at=now_ms(),
            expected_instance=self.expected_instance,
        )
        try:
            stored = self.committer.commit(row)
        except RetryableError as exc:
            # Unreachable, dropped, timed out or no pooled connection free in time. Not
            # acknowledged: Svix delivers it again later. The insert may have committed before
            # the connection was lost; the redelivery then finds it and is answered "duplicate".
            logger.warning(
                "webhook %s not stored, %s", delivery.svix_id, exc, extra={"delivery_id": delivery.svix_id}
            )
            metrics.delivery("unavailable", type(exc).__name__)
            return _UNAVAILABLE
        except BatchFailedError:
            metrics.delivery("unavailable", "internal_error")
            return _INTERNAL  # logged with its traceback by the committer
        if stored.duplicate:
            metrics.delivery("duplicate")
        elif stored.status == InboxStatus.PENDING:
            metrics.delivery("accepted")
        else:
            if stored.status == InboxStatus.REJECTED:
                logger.info(
                    "webhook %s stored as rejected: %s",
                    delivery.svix_id,
                    stored.reason,
                    extra={"delivery_id": delivery.svix_id},
                )
            metrics.delivery(stored.status, stored.reason)
        return _stored_answer(stored)


class _EnvironHeaders:
    """Case-insensitive request header lookup straight from a WSGI environ."""

    __slots__ = ("environ",)

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ

    def get(self, key: str, /) -> str | None:
        value = self.environ.get(_environ_key(key))
        return value if value is None else str(value)


@lru_cache(maxsize=64)
def _environ_key(name: str) -> str:
    """The environ key of request header ``name`` ("svix-id" -> "HTTP_SVIX_ID"), built once per name."""
    return "HTTP_" + name.upper().replace("-", "_")


def _plain_length(environ: dict[str, Any]) -> int | None:
    """The Content-Length of a plain (not chunked) body, None when the fast path should not judge."""
    if "HTTP_TRANSFER_ENCODING" in environ:
        return None
    value = environ.get("CONTENT_LENGTH")
    if not isinstance(value, str) or not value.isdigit() or not value.isascii():
        return None
    return int(value)


class IntakeMiddleware:
    """WSGI middleware answering plain ``POST /webhooks/clerk`` requests itself."""

    def __init__(self, app: WsgiApp, intake: Intake, *, max_body: int) -> None:
        self.app = app
        self.intake = intake
        self.max_body = max_body

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != WEBHOOK_PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        length = _plain_length(environ)
        if length is None:
            return self.app(environ, start_response)
        try:
            if length > self.max_body:
                answer = too_large(self.max_body)
            else:
                body = environ["wsgi.input"].read(length) if length else b""
                if len(body) < length:
                    # The client went away mid-body (werkzeug would say the same).
                    return self.app(environ, start_response)
                answer = self.intake.receive(_EnvironHeaders(environ), body)
        except Exception:
            logger.exception("unhandled error in POST %s", WEBHOOK_PATH)
            answer = _INTERNAL
        content = json.dumps(answer.payload).encode()
        headers = [*JSON_HEADERS, ("Content-Length", str(len(content))), *answer.headers]
        start_response(status_line(answer.status), headers)
        return [content]
