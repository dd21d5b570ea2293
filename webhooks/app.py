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
from models.db import create_db_engine, ping
from models.permissions import AccessCache
from models.settings import Settings
from webhooks.committer import GroupCommitter, store_batch
from webhooks.dispatch import Dispatcher, Send
from webhooks.intake import WEBHOOK_PATH, Answer, Intake, IntakeMiddleware, too_large
from webhooks.verify import SignatureVerifier

logger = logging.getLogger(__name__)

EXTENSION = "orgsync"
_READ_CHUNK = 64 * 1024
__all__ = ["WEBHOOK_PATH", "WebhookState", "create_app", "get_state"]


@dataclass
class WebhookState:
    """Per-process objects the views share, kept on ``app.extensions["orgsync"]``."""

    settings: Settings
    engine: Engine
    verifier: SignatureVerifier
    committer: GroupCommitter
    dispatcher: Dispatcher | None
    broker_check: Callable[[], None] | None
    owns_engine: bool = field(default=False)

    def close(self) -> None:
        """Commit queued deliveries, flush pending enqueues, release the engine if the app made it."""
        self.committer.close()
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


def _answer(answer: Answer) -> Response:
    return _json(answer.status, answer.payload, dict(answer.headers))


def commit_wait_bound(engine: Engine, db_timeout: float) -> float | None:
    """How long a request waits for its commit: a batch ahead of it and its own, each bounded.

    PostgreSQL engines of the web process bound every checkout, statement and connection hold
    by ``db_timeout``; SQLite queues writers on its busy timeout, which bounds the wait there.
    """
    return 2 * db_timeout + 1 if engine.dialect.name == "postgresql" else None


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


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    send: Send | None = None,
    broker_check: Callable[[], None] | None = None,
    command_send: Callable[[list[int]], None] | None = None,
) -> Flask:
    """Build the webhook app. ``send(ids)`` enqueues apply work; it runs on a background thread.

    Without ``engine`` one is created from ``settings.database_url`` (one per process); without
    ``send`` deliveries are only stored, and the sweeper enqueues them. ``command_send(ids)``
    enqueues commands submitted over ``/orgsync/v1`` (without it the workers' sweep sends them).
    """
    verifier = SignatureVerifier(settings.webhook_secrets)
    owns_engine = engine is None
    if engine is None:
        engine = create_db_engine(settings.database_url, timeout=settings.db_timeout)
    dispatcher = Dispatcher(send, max_batch=settings.apply_batch_size) if send is not None else None
    committer = GroupCommitter(
        engine,
        store_batch,
        committed=dispatcher.submit if dispatcher is not None else None,
        wait_bound=commit_wait_bound(engine, settings.db_timeout),
    )
    state = WebhookState(
        settings=settings,
        engine=engine,
        verifier=verifier,
        committer=committer,
        dispatcher=dispatcher,
        broker_check=broker_check,
        owns_engine=owns_engine,
    )
    intake = Intake(verifier, committer, expected_instance=settings.instance_id)
    app = Flask(__name__)
    app.extensions[EXTENSION] = state
    max_body = settings.max_body_bytes

    def receive_webhook() -> Response:
        # Requests the middleware leaves to Flask: chunked bodies, odd Content-Length values.
        length = request.content_length
        if length is not None and length > max_body:
            return _answer(too_large(max_body))
        body = _read_body(request.stream, max_body)
        if body is None:
            return _answer(too_large(max_body))
        return _answer(intake.receive(request.headers, body))

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

    # The webhook route's plain requests are answered before Flask's routing (webhooks.intake).
    app.wsgi_app = IntakeMiddleware(app.wsgi_app, intake, max_body=max_body)  # type: ignore[method-assign]

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, "internal_error", "internal server error")

    return app
