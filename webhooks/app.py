"""Webhook intake: verified Clerk webhooks into the durable inbox, then handed to the broker.

Only the intake lives here, as a blueprint; ``orgsync.web.create_app`` composes it with the
health probes and the read APIs into the one web app. Plain webhook requests are answered by
``webhooks.intake.IntakeMiddleware`` before Flask's routing; the Flask view handles the rest
(chunked bodies, odd Content-Length values) with the same code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import IO, cast

from flask import Blueprint, Flask, Response, request
from flask.sansio.blueprints import BlueprintSetupState
from sqlalchemy import Engine

from models.settings import Settings
from webhooks.committer import GroupCommitter, InboxWriter
from webhooks.dispatch import Dispatcher, Send
from webhooks.intake import WEBHOOK_PATH, Answer, Intake, IntakeMiddleware, too_large
from webhooks.verify import SignatureVerifier

logger = logging.getLogger(__name__)

_READ_CHUNK = 64 * 1024
__all__ = ["WEBHOOK_PATH", "WebhookState", "create_webhook_blueprint"]


@dataclass
class WebhookState:
    """Per-process objects the intake shares (``orgsync.web.WebState.intake``)."""

    settings: Settings
    engine: Engine
    verifier: SignatureVerifier
    committer: GroupCommitter
    dispatcher: Dispatcher | None

    def close(self) -> None:
        """Commit queued deliveries, then flush pending enqueues."""
        self.committer.close()
        if self.dispatcher is not None:
            self.dispatcher.close()


def _answer(answer: Answer) -> Response:
    return Response(
        json.dumps(answer.payload),
        status=answer.status,
        headers=dict(answer.headers),
        mimetype="application/json",
    )


def commit_wait_bound(engine: Engine, db_timeout: float) -> float | None:
    """How long a request waits for its commit: a batch ahead of it and its own, each bounded.

    PostgreSQL engines of the web process bound every checkout, statement and connection hold
    by ``db_timeout``; SQLite queues writers on its busy timeout, which bounds the wait there.
    """
    return 2 * db_timeout + 1 if engine.dialect.name == "postgresql" else None


def connection_hold(db_timeout: float) -> float:
    """How long the committer keeps one pooled connection across back-to-back batches: a
    quarter of the engine's hold bound (``db_timeout``), at most a second."""
    return min(1.0, db_timeout / 4)


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


def create_webhook_blueprint(
    settings: Settings, *, engine: Engine, send: Send | None = None
) -> tuple[Blueprint, WebhookState]:
    """The intake at ``WEBHOOK_PATH``. ``send(ids)`` enqueues apply work on a background thread;
    without it deliveries are only stored, and the sweeper enqueues them. Registering the
    blueprint wraps the app's WSGI callable in the intake middleware."""
    verifier = SignatureVerifier(settings.webhook_secrets)
    dispatcher = Dispatcher(send, max_batch=settings.apply_batch_size) if send is not None else None
    writer = InboxWriter(engine, hold_s=connection_hold(settings.db_timeout))
    committer = GroupCommitter(
        engine,
        writer,
        committed=dispatcher.submit if dispatcher is not None else None,
        wait_bound=commit_wait_bound(engine, settings.db_timeout),
        idle=writer.release,
    )
    state = WebhookState(
        settings=settings, engine=engine, verifier=verifier, committer=committer, dispatcher=dispatcher
    )
    intake = Intake(verifier, committer, expected_instance=settings.instance_id)
    max_body = settings.max_body_bytes

    def install(setup: BlueprintSetupState) -> None:
        # The webhook route's plain requests are answered before Flask's routing.
        app = cast(Flask, setup.app)
        app.wsgi_app = IntakeMiddleware(app.wsgi_app, intake, max_body=max_body)  # type: ignore[method-assign]

    blueprint = Blueprint("webhooks", __name__)
    blueprint.record_once(install)

    def receive_webhook() -> Response:
        # Requests the middleware leaves to Flask: chunked bodies, odd Content-Length values.
        length = request.content_length
        if length is not None and length > max_body:
            return _answer(too_large(max_body))
        body = _read_body(request.stream, max_body)
        if body is None:
            return _answer(too_large(max_body))
        return _answer(intake.receive(request.headers, body))

    blueprint.add_url_rule(WEBHOOK_PATH, "receive_webhook", receive_webhook, methods=["POST"])
    return blueprint, state
