"""The Flask app: verified Clerk webhooks into the durable inbox, health and readiness probes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from flask import Flask, Response, request
from sqlalchemy import Engine
from werkzeug.exceptions import HTTPException

from api import create_api_blueprint
from api.orgsync import create_orgsync_blueprint
from console import console_enabled, create_console_blueprint
from models.clock import now_ms
from models.db import create_db_engine, is_connection_error, ping
from models.errors import RetryableError
from models.inbox import Stored, store_delivery
from models.permissions import AccessCache
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
    """Per-process objects the views share, kept on ``app.extensions["orgsync"]``."""

    settings: Settings
    engine: Engine
    verifier: SignatureVerifier
    dispatcher: Dispatcher | None
    broker_check: Callable[[], None] | None
    owns_engine: bool = field(default=False)

    def close(self) -> None:
        """Flush pending enqueues and release the engine if the app created it."""
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.owns_engine:
            self.engine.dispose()


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


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    send: Send | None = None,
    broker_check: Callable[[], None] | None = None,
    command_send: Callable[[list[int]], None] | None = None,
    reconcile_send: Callable[[list[str]], None] | None = None,
) -> Flask:
    """Build the webhook app. ``send(ids)`` enqueues apply work; it runs on a background thread.

    Without ``engine`` one is created from ``settings.database_url`` (one per process); without
    ``send`` deliveries are only stored, and the sweeper enqueues them. ``command_send(ids)``
    enqueues commands submitted over ``/orgsync/v1`` and the console (without it the workers'
    sweep sends them); ``reconcile_send(org_ids)`` lets the console queue a reconciliation.
    """
    verifier = SignatureVerifier(settings.webhook_secrets)
    owns_engine = engine is None
    if engine is None:
        engine = create_db_engine(settings.database_url, timeout=settings.db_timeout)
    state = WebhookState(
        settings=settings,
        engine=engine,
        verifier=verifier,
        dispatcher=Dispatcher(send, max_batch=settings.apply_batch_size) if send is not None else None,
        broker_check=broker_check,
        owns_engine=owns_engine,
    )
    # On PostgreSQL the insert is the whole transaction, so it may commit itself: one round
    # trip instead of BEGIN, INSERT, COMMIT, and just as durable, since the server commits
    # before it reports the statement complete. SQLite keeps its BEGIN IMMEDIATE transaction.
    intake = (
        engine.execution_options(isolation_level="AUTOCOMMIT")
        if engine.dialect.name == "postgresql"
        else engine
    )
    app = Flask(__name__)
    app.extensions[EXTENSION] = state
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

    def healthz() -> Response:
        return _json(200, {"status": "ok"})

    def readyz() -> Response:
        checks: dict[str, str] = {}
        try:
            ping(state.engine)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unavailable ({type(exc).__name__})"
        if state.broker_check is None:
            checks["broker"] = "not checked"
        else:
            try:
                state.broker_check()
                checks["broker"] = "ok"
            except Exception as exc:
                checks["broker"] = f"unavailable ({type(exc).__name__})"
        failed = [name for name, result in checks.items() if result.startswith("unavailable")]
        if failed:
            logger.warning("not ready: %s", ", ".join(f"{name} {checks[name]}" for name in failed))
            return _json(503, {"status": "unavailable", "failed": failed, "checks": checks})
        return _json(200, {"status": "ok", "checks": checks})

    if settings.api_tokens:
        app.register_blueprint(create_api_blueprint(engine, settings.api_tokens))
        app.register_blueprint(
            create_orgsync_blueprint(
                engine,
                settings.api_tokens,
                send=command_send,
                dry_run_default=settings.dry_run,
                permission_cache=AccessCache(),
            )
        )

    if console_enabled(settings):  # the web console at /console (console/)
        app.register_blueprint(
            create_console_blueprint(
                engine,
                settings,
                command_send=command_send,
                apply_send=state.dispatcher.submit if state.dispatcher is not None else None,
                reconcile_send=reconcile_send,
            )
        )

    app.add_url_rule(WEBHOOK_PATH, "receive_webhook", receive_webhook, methods=["POST"])
    app.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        name = (exc.name or "error").lower().replace(" ", "_")
        response = _error(code, name, exc.description or exc.name or "error")
        for key, value in exc.get_headers():
            if key.lower() != "content-type":
                response.headers[key] = value
        return response

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, "internal_error", "internal server error")

    return app
