"""The benchmark's baseline: a minimal handler that verifies and writes each event inside the request.

It is what a first implementation would do: verify the Svix signature, parse the body and
apply the event to the mirror with a commit of its own before answering. It runs under the
same embedded server (``orgsync.serve.serve``: granian, the same workers and threads) as
``orgsync serve``, so the two intake figures differ only by what happens in the request.

    python bench/baseline_app.py --port 8001 [--workers 2] [--threads 8]

Settings come from the same environment as orgsync's (DATABASE_URL, CLERK_WEBHOOK_SIGNING_SECRET).
"""

from __future__ import annotations

import argparse
import json
import time

from flask import Flask, Response, request
from svix.webhooks import Webhook, WebhookVerificationError

from models.db import create_db_engine, make_session_factory, session_scope
from models.errors import PayloadError
from models.events import parse_event
from models.mirror import apply_events
from models.settings import Settings
from orgsync.serve import ServeOptions, serve


def create_baseline_app(settings: Settings) -> Flask:
    """One verify, one parse, one mirror write and one commit per request; nothing queued."""
    webhook = Webhook(settings.webhook_secrets[0])
    factory = make_session_factory(create_db_engine(settings.database_url))
    app = Flask("orgsync-baseline")

    def reply(status: int, payload: dict[str, str]) -> Response:
        return Response(json.dumps(payload), status=status, mimetype="application/json")

    @app.post("/webhooks/clerk")
    def receive() -> Response:
        body = request.get_data()
        headers = {
            name: request.headers.get(name, "") for name in ("svix-id", "svix-timestamp", "svix-signature")
        }
        try:
            webhook.verify(body, headers)
        except (WebhookVerificationError, ValueError):
            return reply(400, {"error": "invalid_signature"})
        try:
            event = parse_event(headers["svix-id"], body)
        except PayloadError as exc:
            # The baseline acknowledges what it cannot use, as orgsync does.
            return reply(200, {"status": "rejected", "reason": str(exc)})
        with session_scope(factory) as session:
            apply_events(session, [event], now_ms=time.time_ns() // 1_000_000)
        return reply(200, {"status": "applied"})

    @app.get("/healthz")
    def healthz() -> Response:
        return reply(200, {"status": "ok"})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=ServeOptions.workers)
    parser.add_argument("--threads", type=int, default=ServeOptions.threads)
    args = parser.parse_args()
    settings = Settings.from_env(require_webhook_secret=True)
    options = ServeOptions(host=args.host, port=args.port, workers=args.workers, threads=args.threads)
    serve(settings, options, factory=create_baseline_app)


if __name__ == "__main__":
    main()
