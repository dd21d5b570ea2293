"""The one web app: every HTTP surface of a web process, composed in one place.

``create_app`` builds the Flask app from the settings and registers, in order:

- the webhook intake (``webhooks``: ``POST /webhooks/clerk``), always;
- the health probes (``/healthz``, ``/readyz``, below), always;
- Clerk's read API (``api.blueprint``: ``/v1``) and the orgsync API (``api.orgsync``:
  ``/orgsync/v1``), when ``ORGSYNC_API_TOKENS`` is set;
- the web console (``console``: ``/console``), when ``ORGSYNC_ADMIN_TOKENS`` or ``CLERK_JWT_KEY`` is set;
- Prometheus metrics (``api.metrics``: ``/metrics``), always (403 until a token or
  ``ORGSYNC_METRICS_PUBLIC`` allows a scraper).

A new surface is one more blueprint registered in ``create_app``;
blueprints answer their own errors, and the handlers at the end of ``create_app`` give every
other route the intake's ``{"error", "message"}`` JSON. The engine is shared by every
blueprint: one pool per process. ``orgsync.wsgi`` wires the broker into this factory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, request
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from api.blueprint import create_api_blueprint
from api.metrics import create_metrics_blueprint
from api.orgsync import create_orgsync_blueprint
from console import console_enabled, create_console_blueprint
from models.clock import now_ms
from models.db import create_db_engine, ping
from models.notifications import outbox_health
from models.permissions import AccessCache
from models.settings import Settings
from webhooks.app import WebhookState, create_webhook_blueprint
from webhooks.dispatch import Dispatcher, Send

logger = logging.getLogger(__name__)

EXTENSION = "orgsync.web"


@dataclass
class WebState:
    """What ``create_app`` built for the process, kept on ``app.extensions["orgsync.web"]``."""

    engine: Engine
    intake: WebhookState
    owns_engine: bool

    @property
    def dispatcher(self) -> Dispatcher | None:
        return self.intake.dispatcher

    def close(self) -> None:
        """Flush pending enqueues and release the engine if the app created it."""
        self.intake.close()
        if self.owns_engine:
            self.engine.dispose()


def get_state(app: Flask) -> WebState:
    state: WebState = app.extensions[EXTENSION]
    return state


def _json(status: int, payload: dict[str, Any]) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def _notification_state(engine: Engine) -> dict[str, Any] | str:
    try:
        with Session(engine) as session:
            return outbox_health(session, now_ms=now_ms())
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def create_health_blueprint(
    engine: Engine, broker_check: Callable[[], None] | None, *, notifications: bool = False
) -> Blueprint:
    """``/healthz``: the process answers; ``/readyz``: it can reach the database and the broker."""
    health = Blueprint("health", __name__)

    @health.get("/healthz")
    def healthz() -> Response:
        return _json(200, {"status": "ok"})

    @health.get("/readyz")
    def readyz() -> Response:
        checks: dict[str, str] = {}
        try:
            ping(engine)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unavailable ({type(exc).__name__})"
        if broker_check is None:
            checks["broker"] = "not checked"
        else:
            try:
                broker_check()
                checks["broker"] = "ok"
            except Exception as exc:
                checks["broker"] = f"unavailable ({type(exc).__name__})"
        failed = [name for name, result in checks.items() if result.startswith("unavailable")]
        if failed:
            logger.warning("not ready: %s", ", ".join(f"{name} {checks[name]}" for name in failed))
            return _json(503, {"status": "unavailable", "failed": failed, "checks": checks})
        body: dict[str, Any] = {"status": "ok", "checks": checks}
        if notifications:
            # The delivery state, for a look from outside; a backlog does not make this unready.
            body["notifications"] = _notification_state(engine)
        return _json(200, body)

    return health


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    send: Send | None = None,
    broker_check: Callable[[], None] | None = None,
    command_send: Callable[[list[int]], None] | None = None,
    reconcile_send: Callable[[list[str]], None] | None = None,
) -> Flask:
    """The web app of one process.

    Without ``engine`` one is created from ``settings.database_url`` (and disposed by
    ``get_state(app).close()``). ``send(ids)`` enqueues apply work for stored deliveries
    (without it the sweeper enqueues them); ``broker_check()`` raises when the broker is
    unreachable (for ``/readyz``); ``command_send(ids)`` enqueues commands submitted over
    ``/orgsync/v1`` and the console (without it the workers' sweep sends them);
    ``reconcile_send(org_ids)`` lets the console queue a reconciliation.
    """
    owns_engine = engine is None
    if engine is None:
        engine = create_db_engine(settings.database_url, timeout=settings.db_timeout)
    app = Flask(__name__)

    intake, intake_state = create_webhook_blueprint(settings, engine=engine, send=send)
    app.register_blueprint(intake)
    app.register_blueprint(
        create_health_blueprint(engine, broker_check, notifications=bool(settings.notify_urls))
    )
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
    app.register_blueprint(
        create_metrics_blueprint(engine, settings.api_tokens, public=settings.metrics_public)
    )
    if console_enabled(settings):  # the web console at /console (console/)
        app.register_blueprint(
            create_console_blueprint(
                engine,
                settings,
                command_send=command_send,
                apply_send=intake_state.dispatcher.submit if intake_state.dispatcher is not None else None,
                reconcile_send=reconcile_send,
            )
        )
    # Register further blueprints here.

    app.extensions[EXTENSION] = WebState(engine=engine, intake=intake_state, owns_engine=owns_engine)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        name = (exc.name or "error").lower().replace(" ", "_")
        response = _json(code, {"error": name, "message": exc.description or exc.name or "error"})
        for key, value in exc.get_headers():
            if key.lower() != "content-type":
                response.headers[key] = value
        return response

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return _json(500, {"error": "internal_error", "message": "internal server error"})

    return app
