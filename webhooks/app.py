"""Webhook intake: verified Clerk webhooks into the durable inbox, then handed to the broker.

Only the intake lives here, as a blueprint; ``orgsync.web.create_app`` composes it with the
health probes and the read APIs into the one web app.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import IO, Any

from flask import Blueprint, Flask, Response, request
from sqlalchemy import Engine

from models.clock import now_ms
from models.db import is_connection_error
from models.errors import RetryableError
from models.inbox import Stored, store_delivery
from models.settings import Settings
from models.tables import InboxStatus
from webhooks.dispatch import Dispatcher, Send
from webhooks.verify import RejectionError, SignatureVerifier

logger = logging.getLogger(__name__)

EXTENSION = "orgsync"
WEBHOOK_PATH = "/webhooks/clerk"
RETRY_AFTER_SECONDS = 5
_READ_CHUNK = 64 * 1024


@dataclass
class WebhookState:
    """Per-process objects the intake shares, kept on ``app.extensions["orgsync"]``."""

    settings: Settings
    engine: Engine
    verifier: SignatureVerifier
    dispatcher: Dispatcher | None

    def close(self) -> None:
        """Flush pending enqueues."""
        if self.dispatcher is not None:
            self.dispatcher.close()


def get_state(app: Flask) -> WebhookState:
    state: WebhookState = app.extensions[EXTENSION]
    return state


def _json(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload), status=status, headers=headers, mimetype="application/json")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json(status, {"error": code, "message": message}, headers)


def _read_body(stream: IO[bytes], limit: int) -> bytes | None:
    """Read at most ``limit`` bytes; None when the body is longer (chunked bodies have no length)."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    if size > limit:
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> Response:
    return _error(413, "payload_too_large", f"body exceeds {limit} bytes")


def _stored_response(stored: Stored) -> Response:
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
    return _json(200, payload)


def create_webhook_blueprint(
    settings: Settings, *, engine: Engine, send: Send | None = None
) -> tuple[Blueprint, WebhookState]:
    """The intake at ``WEBHOOK_PATH``. ``send(ids)`` enqueues apply work on a background thread;
    without it deliveries are only stored, and the sweeper enqueues them. Registering the
    blueprint puts the state on ``app.extensions["orgsync"]`` (see ``get_state``)."""
    verifier = SignatureVerifier(settings.webhook_secrets)
    state = WebhookState(
        settings=settings,
        engine=engine,
        verifier=verifier,
        dispatcher=Dispatcher(send, max_batch=settings.apply_batch_size) if send is not None else None,
    )
    # On PostgreSQL the insert is the whole transaction, so it may commit itself: one round
    # trip instead of BEGIN, INSERT, COMMIT, and just as durable, since the server commits
    # before it reports the statement complete. SQLite keeps its BEGIN IMMEDIATE transaction.
    intake = (
        engine.execution_options(isolation_level="AUTOCOMMIT")
        if engine.dialect.name == "postgresql"
        else engine
    )
    blueprint = Blueprint("webhooks", __name__)
    blueprint.record_once(lambda setup: setup.app.extensions.__setitem__(EXTENSION, state))
    max_body = settings.max_body_bytes

    def receive_webhook() -> Response:
        length = request.content_length
        if length is not None and length > max_body:
            return _too_large(max_body)
        body = _read_body(request.stream, max_body)
        if body is None:
            return _too_large(max_body)
        try:
            delivery = verifier.verify(request.headers, body)
        except RejectionError as rejection:
            logger.info(
                "webhook refused: %s (%s), id %r",
                rejection.code,
                rejection.message,
                request.headers.get("svix-id") or request.headers.get("webhook-id"),
            )
            return _error(rejection.status, rejection.code, rejection.message)
        try:
            # A plain connection, committed on leaving the block: the ORM unit of work would
            # cost a tenth of the request's CPU here for nothing.
            with intake.begin() as connection:
                stored = store_delivery(
                    connection,
                    svix_id=delivery.svix_id,
                    body=delivery.body,
                    received_at=now_ms(),
                    expected_instance=settings.instance_id,
                )
        except Exception as exc:
            if not (isinstance(exc, RetryableError) or is_connection_error(exc)):
                raise
            # Unreachable, dropped, timed out or no pooled connection free in time. Not
            # acknowledged: Svix delivers it again later. The insert may have committed before
            # the connection was lost; the redelivery then finds it and is answered "duplicate".
            logger.warning(
                "webhook %s not stored, database unavailable: %s", delivery.svix_id, type(exc).__name__
            )
            return _error(
                503,
                "database_unavailable",
                "the inbox cannot be written right now; retry later",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        # Enqueue strictly after the commit: a worker must find the row it is told about.
        if not stored.duplicate and stored.status == InboxStatus.PENDING and state.dispatcher is not None:
            state.dispatcher.submit((stored.inbox_id,))
        if stored.status == InboxStatus.REJECTED and not stored.duplicate:
            logger.info("webhook %s stored as rejected: %s", delivery.svix_id, stored.reason)
        return _stored_response(stored)

    blueprint.add_url_rule(WEBHOOK_PATH, "receive_webhook", receive_webhook, methods=["POST"])
    return blueprint, state
