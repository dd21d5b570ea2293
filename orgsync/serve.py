"""The web server: ``orgsync serve`` runs the app under granian, configured here, not by files.

granian's HTTP handling (parsing, keep-alive, writing answers) is Rust; only the WSGI app runs
as Python, on each worker process's blocking threads. Its main process forks the workers,
respawns one that dies and stops them all on SIGTERM or SIGINT. Each worker builds the app
after the fork (``load_app``): the engine, the broker connection and the dispatcher thread all
belong to the process that uses them.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from granian.constants import Interfaces
from granian.log import LogLevels
from granian.server import MPServer

from models.settings import Settings

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

# The loggers granian writes to: its own lines and, with --access-log, one per request.
SERVER_LOGGERS = ("_granian", "granian.access")

# Names a request's WSGI environ holds for the request itself (PEP 3333's CGI variables and
# what servers add); every other name in it came from the process environment.
REQUEST_VARIABLES = frozenset(
    {
        "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE", "CONTENT_LENGTH",
        "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "SERVER_SOFTWARE", "GATEWAY_INTERFACE",
        "REMOTE_ADDR", "REMOTE_HOST", "REMOTE_PORT", "REQUEST_URI", "RAW_URI",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    # Python threads per worker that run the app; requests beyond them wait in the worker.
    threads: int = 8
    # How long a stopping worker may finish what it is answering before it is killed.
    graceful_timeout: int = 20
    access_log: bool = False


class RequestEnviron:
    """The app sees only the request in its environ, not the server's process environment.

    granian starts each request's environ from a copy of ``os.environ`` (as CGI did), so the
    database URL, the Clerk secret key and the API tokens would ride along with every request
    into anything that records an environ. They are taken out before the app sees it.
    """

    def __init__(self, app: WSGIApplication, environment: Iterable[str]) -> None:
        self.app = app
        self.inherited = tuple(
            name for name in environment if name not in REQUEST_VARIABLES and not name.startswith("HTTP_")
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        for name in self.inherited:
            environ.pop(name, None)
        return self.app(environ, start_response)


def load_app(settings: Settings, factory: Callable[[Settings], WSGIApplication] | None) -> WSGIApplication:
    """Build the app in a worker process, after the fork (granian calls it once per worker)."""
    from models.metrics import drop_dead_gauges  # noqa: PLC0415

    # A worker that replaces one that died clears the dead one's live gauges.
    drop_dead_gauges()
    if factory is None:
        from orgsync.wsgi import build_web_app  # noqa: PLC0415

        factory = build_web_app
    return RequestEnviron(factory(settings), os.environ)


class ThreadAdvice(logging.Filter):
    """Drops granian's advice against more threads than twice the cores, given at every start.

    It fits apps that compute; requests here mostly wait on a commit shared with others
    (``webhooks.committer``), and more threads waiting make bigger shared commits: on two
    cores, 8 threads per worker took about 40 % more deliveries per second than 4 (bench/).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Configuration allows spawning up to")


def server_log_config(level: str) -> dict[str, Any]:
    """granian's loggers hand their records to the root logger set up by ``orgsync.logs``."""
    return {
        "handlers": {},
        "filters": {"thread_advice": {"()": ThreadAdvice}},
        "loggers": {
            name: {"level": level, "propagate": True, "handlers": [], "filters": ["thread_advice"]}
            for name in SERVER_LOGGERS
        },
    }


def build_server(
    settings: Settings, options: ServeOptions, factory: Callable[[Settings], WSGIApplication] | None = None
) -> tuple[MPServer, Callable[[], WSGIApplication]]:
    """The configured server and the loader its workers build the app with."""
    server = MPServer(
        "orgsync.wsgi:app",
        address=options.host,
        port=options.port,
        interface=Interfaces.WSGI,
        workers=options.workers,
        blocking_threads=options.threads,
        websockets=False,
        log_level=LogLevels(settings.log_level.lower()),
        log_dictconfig=server_log_config(settings.log_level),
        log_access=options.access_log,
        # A worker that dies is replaced, as the server keeps answering on the others.
        respawn_failed_workers=True,
        workers_kill_timeout=options.graceful_timeout,
    )
    from models.metrics import drop_dead_gauges  # noqa: PLC0415

    # Once the workers have stopped, their live gauges go (their counters stay).
    server.on_shutdown(drop_dead_gauges)
    return server, functools.partial(load_app, settings, factory)


def serve(
    settings: Settings, options: ServeOptions, factory: Callable[[Settings], WSGIApplication] | None = None
) -> None:
    """Run the server in the foreground until it is told to stop (SIGTERM, SIGINT)."""
    server, loader = build_server(settings, options, factory)
    server.serve(target_loader=loader, wrap_loader=False)
