"""Gunicorn embedded: ``orgsync serve`` runs the webhook app without a gunicorn config file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from models.settings import Settings

if TYPE_CHECKING:
    from flask import Flask


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    threads: int = 8
    # Svix gives up on a delivery after about 15 s; a request still running by then is lost work.
    timeout: int = 30
    graceful_timeout: int = 20
    access_log: bool = False


class WebApplication(BaseApplication):  # type: ignore[misc]
    """A gunicorn application whose config comes from ``ServeOptions``, never from argv or files."""

    def __init__(
        self, settings: Settings, options: ServeOptions, factory: Callable[[Settings], Flask] | None = None
    ) -> None:
        self.settings = settings
        self.options = options
        self.factory = factory
        super().__init__()

    def load_config(self) -> None:
        options = self.options
        config: dict[str, Any] = {
            "bind": [f"{bracket_ipv6(options.host)}:{options.port}"],
            "workers": options.workers,
            "threads": options.threads,
            "worker_class": "gthread",
            "timeout": options.timeout,
            "graceful_timeout": options.graceful_timeout,
            "loglevel": self.settings.log_level.lower(),
            "errorlog": "-",
            "accesslog": "-" if options.access_log else None,
            "proc_name": "orgsync-web",
            # The app is built in each worker after the fork (see ``load``), not in the arbiter.
            "preload_app": False,
            "child_exit": _child_exit,
            # The root logger set up by ``orgsync.logs`` writes gunicorn's lines too, in its format.
            "logger_class": GunicornLogger,
        }
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn >= 25 opens a control socket in $HOME by default: one per user, so two
            # servers (two `orgsync run`, or tests in parallel) would fight over it.
            config["control_socket_disable"] = True
        for key, value in config.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        # Runs in the worker process: the engine, the broker connection and the dispatcher
        # thread all belong to the process that uses them.
        factory = self.factory
        if factory is None:
            from orgsync.wsgi import build_web_app  # noqa: PLC0415

            factory = build_web_app
        return factory(self.settings)


class GunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, handing its error (and access) lines to the root logger."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True


def _child_exit(_server: Any, worker: Any) -> None:
    """In the arbiter, for each worker that exits: its live metrics files go, its counts stay."""
    from models.metrics import mark_dead  # noqa: PLC0415

    mark_dead(worker.pid)


def bracket_ipv6(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(settings: Settings, options: ServeOptions) -> None:
    """Run gunicorn in the foreground until it is told to stop (SIGTERM, SIGINT)."""
    WebApplication(settings, options).run()
