"""``GET /metrics``: Prometheus text format, for a bearer of any ORGSYNC_API_TOKENS token or for all.

The counters of every web and worker process come from the multiprocess files (see
``models.metrics``); the state gauges are read from the database at scrape time
(``models.metrics_db``). With ``ORGSYNC_METRICS_PUBLIC=true`` no token is asked for: for a
scraper inside a private network, where handing it a token that also reads the mirror would
give it more than it needs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from flask import Blueprint, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from api.auth import TokenCheck
from models import metrics
from models.metrics_db import DatabaseCollector

METRICS_PATH = "/metrics"


class _Local(Collector):
    """This process's own instruments, when they are not kept in files (one process, tests)."""

    def collect(self):  # type: ignore[no-untyped-def]
        yield from metrics.instruments().registry.collect()


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": code, "message": message})
    return Response(body, status=status, headers=headers, mimetype="application/json")


def scrape(engine: Engine) -> bytes:
    """The exposition text: every process's counters and the database gauges."""
    registry = CollectorRegistry(auto_describe=False)
    directory = metrics.multiprocess_dir()
    if directory is not None:
        MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    else:
        registry.register(_Local())
    registry.register(DatabaseCollector(engine))
    return generate_latest(registry)


def create_metrics_blueprint(engine: Engine, tokens: Sequence[str], *, public: bool) -> Blueprint:
    """``/metrics``; without tokens and not public it answers 403 naming the settings to set."""
    blueprint = Blueprint("orgsync_metrics", __name__)
    check = TokenCheck(tokens) if tokens else None

    @blueprint.get(METRICS_PATH)
    def metrics_view() -> Response:
        if not public:
            if check is None:
                return _error(
                    403,
                    "metrics_not_enabled",
                    "set ORGSYNC_API_TOKENS (and send one as a bearer token) or ORGSYNC_METRICS_PUBLIC=true",
                )
            if check.match(request.headers.get("Authorization")) is None:
                return _error(
                    401,
                    "unauthorized",
                    "send 'Authorization: Bearer <token>' with a token from ORGSYNC_API_TOKENS",
                    {"WWW-Authenticate": 'Bearer realm="orgsync"'},
                )
        return Response(scrape(engine), status=200, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return blueprint
