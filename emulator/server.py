"""Run the emulator: state, webhook delivery and the HTTP API wired together from one config.

``Emulator`` is the in-process handle tests and benchmarks use (start it on a free port, run
a scenario, settle, snapshot); ``run_emulator`` is what ``orgsync emulator`` calls: it starts
everything, prints where it listens and serves until interrupted.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from emulator.api import RateLimits, create_app
from emulator.chaos import ChaosConfig
from emulator.delivery import WebhookDelivery
from emulator.records import Clock, Json
from emulator.scenario import Scenario, ScenarioReport, seed_state
from emulator.sessions import SessionIssuer
from emulator.state import State

DEFAULT_PORT = 8765
DEFAULT_SECRET_KEY = "sk_test_orgsync_emulator"  # noqa: S105 (a public development default)
# A fixed, public development secret (base64 of "orgsync-emulator-signing-secret!"): the
# emulator is a local fake, and orgsync must be configured with the same value to verify.
DEFAULT_SIGNING_SECRET = "whsec_b3Jnc3luYy1lbXVsYXRvci1zaWduaW5nLXNlY3JldCE="  # noqa: S105


@dataclass(frozen=True)
class EmulatorConfig:
    """Everything ``orgsync emulator`` can set. ``port=0`` picks a free port."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    secret_key: str = DEFAULT_SECRET_KEY
    webhook_urls: tuple[str, ...] = ()
    signing_secret: str = DEFAULT_SIGNING_SECRET
    rate_limit: int = 100
    membership_rate_limit: int = 10
    rate_window: float = 10.0
    seed_orgs: int = 0
    seed_members: int = 0
    seed: int | None = None  # None: random ids; set: ids, seeding and scenarios are reproducible
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    time_scale: float = 1.0
    delivery_workers: int = 4
    delivery_timeout: float = 15.0
    instance_id: str = "ins_orgsyncemulator"
    max_allowed_memberships: int = 0
    announce_defaults: bool = False
    log_requests: bool = False
    # Where the key pair signing session tokens lives; None: a new pair each start.
    session_key_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.secret_key:
            raise ValueError("secret_key must not be empty")
        if not self.signing_secret.startswith("whsec_"):
            raise ValueError("signing_secret must be a whsec_ secret")
        if self.seed_orgs < 0 or self.seed_members < 0:
            raise ValueError("seed_orgs and seed_members must not be negative")


class QuietRequestHandler(WSGIRequestHandler):
    """Serves without an access log line per request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class Emulator:
    """A running fake Clerk: ``with Emulator(config) as emu: ...`` starts and stops it."""

    def __init__(self, config: EmulatorConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self.state = State(
            clock=clock, seed=config.seed, default_max_memberships=config.max_allowed_memberships
        )
        self.delivery = WebhookDelivery(
            config.webhook_urls,
            config.signing_secret,
            instance_id=config.instance_id,
            chaos=config.chaos,
            time_scale=config.time_scale,
            workers=config.delivery_workers,
            timeout=config.delivery_timeout,
        )
        self.state.subscribe(self.delivery.on_event)
        self.sessions = SessionIssuer(key_file=config.session_key_file)
        self.app = create_app(
            self.state,
            secret_key=config.secret_key,
            delivery=self.delivery,
            limits=RateLimits(config.rate_limit, config.membership_rate_limit, config.rate_window),
            sessions=self.sessions,
        )
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> Emulator:
        if self._server is not None:
            return self
        handler = WSGIRequestHandler if self.config.log_requests else QuietRequestHandler
        # Bind here: werkzeug reports its own bind failures by printing and calling sys.exit,
        # while a caller (a test, `orgsync emulator`) needs an OSError it can handle.
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        with socket.create_server((self.config.host, self.config.port), family=family) as listening:
            self._server = make_server(
                self.config.host,
                self.config.port,
                self.app,
                threaded=True,
                request_handler=handler,
                fd=listening.fileno(),  # werkzeug duplicates it
            )
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="emulator-http", daemon=True
        )
        self._thread.start()
        self.delivery.start()
        if self.config.announce_defaults:
            self.state.announce_defaults()
        if self.config.seed_orgs:
            seed_state(
                self.state,
                organizations=self.config.seed_orgs,
                members=self.config.seed_members,
                seed=self.config.seed or 0,
            )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.delivery.close()
        self._server = None
        self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ views
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the emulator is not started")
        return int(self._server.socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    @property
    def api_url(self) -> str:
        """The ``server_url`` for the official SDK."""
        return f"{self.url}/v1"

    # ---------------------------------------------------------------- driving
    def snapshot(self) -> Json:
        return self.state.snapshot()

    def settle(self, timeout: float | None = 30.0) -> bool:
        """Wait until every emitted event is delivered, failed for good or dropped."""
        return self.delivery.settle(timeout)

    def run_scenario(
        self,
        steps: int,
        *,
        seed: int | None = None,
        rate: float | None = None,
        settle_timeout: float | None = None,
        **options: Any,
    ) -> ScenarioReport:
        """Run ``steps`` scenario steps; with ``settle_timeout``, then wait for the deliveries
        (raising ``TimeoutError`` if they do not settle in time)."""
        if seed is None:
            seed = self.config.seed or 0
        scenario = Scenario(self.state, seed=seed, **options)
        report = scenario.run(steps, rate=rate)
        if settle_timeout is not None and not self.settle(settle_timeout):
            raise TimeoutError(f"{self.delivery.pending()} deliveries still pending after {settle_timeout} s")
        return report


def run_emulator(
    config: EmulatorConfig,
    *,
    out: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> None:
    """Start the emulator, print where it listens, serve until ``stop`` is set or Ctrl-C."""
    emulator = Emulator(config)
    emulator.start()
    try:
        out(f"Clerk emulator listening on {emulator.url} (Backend API: {emulator.api_url})")
        if config.webhook_urls:
            out(f"Delivering webhooks to: {', '.join(config.webhook_urls)}")
        else:
            out("No --webhook-url given: events are not delivered anywhere")
        if config.seed_orgs:
            counts = emulator.state.counts()
            out(f"Seeded {counts['organizations']} organizations, {counts['memberships']} memberships")
        # Public, like the PEM in Clerk's Dashboard: one line that a shell or .env file takes.
        one_line = emulator.sessions.public_pem().strip().replace("\n", "\\n")
        out("Session tokens (orgsync session-token USER_ID) verify with this public key:")
        out(f"CLERK_JWT_KEY='{one_line}'")
        organizations = emulator.state.organization_ids()
        members = emulator.state.members_of(organizations[0]) if organizations else []
        if members:
            # Seeding makes the first member of each organization its admin.
            out(f"An admin of {organizations[0]} to sign in as: {members[0][0]}")
        (stop or threading.Event()).wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()


serve = run_emulator
