"""Logging for every orgsync process: one line per event, as text or JSON (``ORGSYNC_LOG_FORMAT``).

The web server (granian), the worker and beat (Celery) and the CLI all log through the root
logger set up here, so one format covers them all: granian's own loggers hand their records
to it (``orgsync.serve.server_log_config``), and Celery is told not to set up logging of its own
(``quiet_celery``).

Each line may carry context as fields: ``delivery_id`` and ``event_type`` (passed by the code
that logs, with ``extra=``), and ``task_id`` and ``task`` of the Celery task running, added
here. In JSON each is a key; in text they follow the message in brackets. Messages and
tracebacks go through ``models.redact`` on the way out: a URL's credentials or a key-shaped
token that slipped into an exception never reaches the log.

Celery's per-task lines ("Task ... received", "Task ... succeeded", beat's "Sending due
task") come every sweep interval with nothing to say: they are shown only at DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from models.redact import redact

# Fields a record may carry, in the order they are shown.
CONTEXT_FIELDS = ("delivery_id", "event_type", "task_id", "task", "inbox_ids", "command_id", "run_id")
# Celery's loggers that narrate every task and every beat tick at INFO.
CHATTY_LOGGERS = (
    "celery.app.trace",
    "celery.worker.strategy",
    "celery.beat",
    "celery.worker.consumer.mingle",
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _current_task() -> tuple[str | None, str | None]:
    celery_state = sys.modules.get("celery._state")
    if celery_state is None:
        return None, None
    task = celery_state.get_current_task()
    if task is None or task.request is None:
        return None, None
    return getattr(task.request, "id", None), getattr(task, "name", None)


class ContextFilter(logging.Filter):
    """Adds the running Celery task's id and name to each record that has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_id", None) is None:
            task_id, name = _current_task()
            if task_id is not None:
                record.task_id = task_id
                record.task = name
        return True


def _context(record: logging.LogRecord) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            found[name] = value
    return found


class TextFormatter(logging.Formatter):
    """The classic line, context fields appended as ``[key=value ...]``, redacted."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        if context:
            line += " [" + " ".join(f"{key}={value}" for key, value in context.items()) + "]"
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "pid": record.process,
        }
        entry.update(_context(record))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        return json.dumps(entry, default=str, ensure_ascii=False)


def make_formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: str = "text") -> None:
    """Set up the root logger of this process (again, replacing what a previous call set).

    Like ``logging.basicConfig``, it leaves alone a root logger that someone else already set
    up (an application embedding orgsync, a test runner capturing logs).
    """
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if getattr(handler, "_orgsync", False)]
    if len(ours) < len(root.handlers):
        return
    for handler in ours:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._orgsync = True  # type: ignore[attr-defined]
    handler.setFormatter(make_formatter(fmt))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)
    quiet = logging.WARNING if level != "DEBUG" else logging.NOTSET
    # Alembic narrates every plugin and context at INFO; `db upgrade` reports the result.
    logging.getLogger("alembic").setLevel(quiet)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


def quiet_celery(level: str, fmt: str) -> None:
    """Make Celery use ``configure`` instead of its own logging setup, in every process it forks."""
    from celery import signals  # noqa: PLC0415  (Celery only in the worker and beat)

    def setup(**_: Any) -> None:
        configure(level, fmt)

    # Celery sets up no logging of its own when something answers this signal.
    signals.setup_logging.connect(setup, weak=False)
    configure(level, fmt)
