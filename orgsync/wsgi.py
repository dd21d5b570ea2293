"""The web process's composition root: settings -> engine, Celery client and the Flask app.

Any WSGI server can serve ``orgsync.wsgi:app`` too (``granian --interface wsgi
orgsync.wsgi:app``, ``gunicorn orgsync.wsgi:app``): ``app`` is built on first access from the
environment, so importing this module has no side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.db import create_db_engine
from models.settings import Settings

if TYPE_CHECKING:
    from flask import Flask

_app: Flask | None = None


def build_web_app(settings: Settings) -> Flask:
    """Wire one engine and one Celery client (producer only) into the web app.

    Call it in the process that serves requests, after any fork: the engine's pool and the
    broker connection must not be shared across processes.
    """
    from orgsync.web import create_app  # noqa: PLC0415  (Flask loads only in web processes)
    from worker.app import (  # noqa: PLC0415
        check_broker,
        create_celery,
        make_command_sender,
        make_reconcile_org_sender,
        make_sender,
    )

    engine = create_db_engine(settings.database_url, timeout=settings.db_timeout)
    celery = create_celery(settings)

    def broker_check() -> None:
        check_broker(celery)

    return create_app(
        settings,
        engine=engine,
        send=make_sender(celery),
        broker_check=broker_check,
        command_send=make_command_sender(celery),
        reconcile_send=make_reconcile_org_sender(celery),
    )


def __getattr__(name: str) -> Any:
    # PEP 562: build ``app`` lazily, so that only a server importing ``orgsync.wsgi:app`` pays for it.
    global _app  # noqa: PLW0603
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = build_web_app(Settings.from_env(require_webhook_secret=True))
    return _app
