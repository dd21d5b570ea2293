"""``orgsync emulator``: run a fake Clerk (Backend API and signed webhooks) with optional chaos."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx

from models.errors import ConfigError
from models.settings import Settings, parse_signing_secrets
from orgsync.cli.base import EPILOG, EXIT_FAILED, EXIT_UNAVAILABLE, BadOptionError, fail, runtime


class FiniteFloat(click.ParamType[float, Any]):
    """A float within [minimum, maximum]; NaN and infinities are refused (they pass range checks)."""

    name = "number"

    def __init__(self, minimum: float, maximum: float | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if number < self.minimum or (self.maximum is not None and number > self.maximum):
            upper = "" if self.maximum is None else f" and at most {self.maximum:g}"
            self.fail(f"{number:g} is out of range: must be at least {self.minimum:g}{upper}", param, ctx)
        return number


class OutageType(click.ParamType[Any, Any]):
    """``START:END`` seconds after delivery starts, as ``emulator.Outage`` parses it."""

    name = "START:END"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from emulator import Outage  # noqa: PLC0415

        if isinstance(value, Outage):
            return value
        try:
            outage = Outage.parse(str(value))
        except ValueError:
            self.fail(f"{value!r} is not START:END in seconds with 0 <= START < END", param, ctx)
        if not (math.isfinite(outage.start) and math.isfinite(outage.end)):
            self.fail(f"{value!r} is not START:END in finite seconds", param, ctx)
        return outage


def check_webhook_urls(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    for value in values:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.BadParameter(f"{value!r} is not an http(s)://host[:port]/path URL", ctx, param)
        try:
            parts.port  # noqa: B018  (parsing the port is the check)
        except ValueError:
            raise click.BadParameter(f"{value!r} has an invalid port", ctx, param) from None
    return values


def emulator_secrets(
    environ: Mapping[str, str], secret_key: str | None, signing_secret: str | None
) -> tuple[str, str, str]:
    """(secret key, signing secret, where they came from): option, else orgsync's variable, else the default.

    Taking orgsync's own variables lets one shell configure both sides with the same values.
    Errors name the option or variable, never the value.
    """
    from emulator import DEFAULT_SECRET_KEY, DEFAULT_SIGNING_SECRET  # noqa: PLC0415

    if secret_key is not None:
        key_source = "--secret-key"
        if not secret_key.startswith("sk_") or any(c.isspace() for c in secret_key):
            raise BadOptionError("--secret-key must start with 'sk_' and contain no spaces")
    elif environ.get("CLERK_SECRET_KEY", "").strip():
        # Settings checks this variable the same way wherever orgsync reads it.
        secret_key = Settings.from_env({"CLERK_SECRET_KEY": environ["CLERK_SECRET_KEY"]}).clerk_secret_key
        key_source = "CLERK_SECRET_KEY"
    if secret_key is None:
        secret_key, key_source = DEFAULT_SECRET_KEY, ""

    if signing_secret is not None:
        try:
            secrets = parse_signing_secrets(signing_secret, "--signing-secret")
        except ConfigError as exc:
            raise BadOptionError(str(exc)) from None
        if len(secrets) != 1:
            raise BadOptionError("--signing-secret takes exactly one whsec_ secret")
        signing_secret = secrets[0]
        secret_source = "--signing-secret"  # noqa: S105  (an option's name)
    elif environ.get("CLERK_WEBHOOK_SIGNING_SECRET", "").strip():
        # With several secrets (a rotation), orgsync accepts any of them: sign with the first.
        signing_secret = parse_signing_secrets(environ["CLERK_WEBHOOK_SIGNING_SECRET"])[0]
        secret_source = "CLERK_WEBHOOK_SIGNING_SECRET"  # noqa: S105  (a variable's name)
    if signing_secret is None:
        signing_secret, secret_source = DEFAULT_SIGNING_SECRET, ""

    described = (
        f"the secret key from {key_source}" if key_source else "the public development secret key",
        f"the signing secret from {secret_source}"
        if secret_source
        else "the public development signing secret",
    )
    return secret_key, signing_secret, " and ".join(described)


def stop_on_signals() -> tuple[threading.Event, Callable[[], None]]:
    """An event set by SIGTERM or SIGINT, and a function that restores the previous handlers."""
    stop = threading.Event()
    received: list[str] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)
        if received:
            click.echo(f"orgsync: received {received[0]}; emulator stopped", err=True)

    return stop, restore


@click.command(epilog=EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port."
)
@click.option(
    "--secret-key",
    default=None,
    metavar="SK",
    help="Bearer key the Backend API accepts (default: $CLERK_SECRET_KEY, else a public development key).",
)
@click.option(
    "--webhook-url",
    "webhook_urls",
    multiple=True,
    callback=check_webhook_urls,
    metavar="URL",
    help="Deliver webhooks here; repeat for several endpoints (orgsync: http://HOST:PORT/webhooks/clerk).",
)
@click.option(
    "--signing-secret",
    default=None,
    metavar="WHSEC",
    help="whsec_ secret to sign webhooks with (default: the first of $CLERK_WEBHOOK_SIGNING_SECRET, "
    "else a public development secret).",
)
@click.option(
    "--rate-limit",
    default=100,
    show_default=True,
    type=click.IntRange(0),
    help="Backend API requests per 10 s for the instance (0: unlimited).",
)
@click.option("--seed-orgs", default=0, show_default=True, type=click.IntRange(0), metavar="N")
@click.option(
    "--seed-members",
    default=None,
    type=click.IntRange(1),
    metavar="M",
    help="Members per seeded organization, the first an admin (default 5).",
)
@click.option(
    "--seed", "random_seed", default=None, type=int, metavar="RANDOM_SEED", help="Reproducible ids."
)
@click.option("--announce-defaults", is_flag=True, help="Emit role and permission events for the defaults.")
@click.option(
    "--duplicate-rate",
    default=0.0,
    type=FiniteFloat(0.0, 1.0),
    help="Chaos: probability (0-1) that a delivery is sent twice.",
)
@click.option(
    "--reorder-window",
    default=0.0,
    type=FiniteFloat(0.0),
    help="Chaos: hold each delivery a random 0..S seconds, reordering them.",
)
@click.option(
    "--delay-rate",
    default=0.0,
    type=FiniteFloat(0.0, 1.0),
    help="Chaos: probability (0-1) of an extra delay.",
)
@click.option(
    "--max-delay", default=0.0, type=FiniteFloat(0.0), help="Chaos: longest extra delay, in seconds."
)
@click.option(
    "--drop-rate",
    default=0.0,
    type=FiniteFloat(0.0, 1.0),
    help="Chaos: probability (0-1) that an event is never delivered.",
)
@click.option(
    "--outage",
    "outages",
    multiple=True,
    type=OutageType(),
    help="Chaos: endpoints fail from START to END s after start (repeatable).",
)
@click.option("--chaos-seed", default=0, show_default=True, type=int, help="Seed of every chaos decision.")
@click.option(
    "--time-scale",
    default=1.0,
    show_default=True,
    type=FiniteFloat(0.0),
    help="Factor on Svix's retry schedule (0.001 turns hours into seconds).",
)
@click.option("--log-requests", is_flag=True, help="Log every Backend API request.")
@click.option(
    "--session-key-file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="PEM private key signing session tokens, created there if missing, so CLERK_JWT_KEY "
    "stays valid across restarts (default: a new key pair each start).",
)
@click.pass_context
def emulator(
    ctx: click.Context,
    *,
    host: str,
    port: int,
    secret_key: str | None,
    webhook_urls: tuple[str, ...],
    signing_secret: str | None,
    rate_limit: int,
    seed_orgs: int,
    seed_members: int | None,
    random_seed: int | None,
    announce_defaults: bool,
    duplicate_rate: float,
    reorder_window: float,
    delay_rate: float,
    max_delay: float,
    drop_rate: float,
    outages: tuple[Any, ...],
    chaos_seed: int,
    time_scale: float,
    log_requests: bool,
    session_key_file: Path | None,
) -> None:
    """Run a fake Clerk: a Backend API under /v1 and Svix-signed webhooks, with optional chaos.

    Point orgsync at it with CLERK_API_URL=http://HOST:PORT/v1 and the same signing secret.
    Serves until Ctrl-C or SIGTERM. Secrets are never printed.
    """
    from emulator import ChaosConfig, EmulatorConfig, run_emulator  # noqa: PLC0415

    if seed_members is not None and not seed_orgs:
        raise BadOptionError("--seed-members needs --seed-orgs")
    if delay_rate and not max_delay:
        raise BadOptionError("--delay-rate needs --max-delay (the longest delay, in seconds)")
    key, signing, sources = emulator_secrets(runtime(ctx).environ, secret_key, signing_secret)
    try:
        config = EmulatorConfig(
            host=host,
            port=port,
            secret_key=key,
            webhook_urls=webhook_urls,
            signing_secret=signing,
            rate_limit=rate_limit,
            seed_orgs=seed_orgs,
            seed_members=(5 if seed_members is None else seed_members) if seed_orgs else 0,
            seed=random_seed,
            chaos=ChaosConfig(
                seed=chaos_seed,
                duplicate_rate=duplicate_rate,
                reorder_window=reorder_window,
                delay_rate=delay_rate,
                max_delay=max_delay,
                drop_rate=drop_rate,
                outages=tuple(outages),
            ),
            time_scale=time_scale,
            announce_defaults=announce_defaults,
            log_requests=log_requests,
            session_key_file=session_key_file,
        )
    except ValueError as exc:
        # The options were checked one by one above; this is the emulator's own last word.
        raise BadOptionError(str(exc)) from None
    if session_key_file is not None:
        from emulator.sessions import SessionIssuer  # noqa: PLC0415

        try:  # read (or create) it now: a bad file is a usage error before anything listens
            SessionIssuer(key_file=session_key_file).public_pem()
        except (ValueError, OSError) as exc:
            raise BadOptionError(f"--session-key-file: {exc}") from None
    click.echo(f"orgsync: emulator using {sources}", err=True)
    stop, restore = stop_on_signals()
    try:
        run_emulator(config, out=click.echo, stop=stop)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        fail(f"cannot listen on {host}:{port}: {reason}", EXIT_FAILED)
    finally:
        restore()


@click.command("session-token", epilog=EPILOG)
@click.argument("user_id")
@click.option(
    "--org",
    "organization",
    default=None,
    metavar="ORG_ID",
    help="Make this organization (one the user belongs to) the session's active one.",
)
@click.option(
    "--expires-in",
    default=3600,
    show_default=True,
    type=click.IntRange(30, 315_360_000),
    metavar="SECONDS",
    help="The token's lifetime.",
)
@click.pass_context
def session_token(ctx: click.Context, user_id: str, organization: str | None, expires_in: int) -> None:
    """Print a Clerk session token for USER_ID, to sign in to the console as that member.

    Opens a session with the Backend API at CLERK_API_URL (POST /sessions, which Clerk offers
    on development instances and the emulator always) and prints a token for it. The console
    accepts it in its sign-in form, as the __session cookie or as an Authorization: Bearer header.
    """
    from clerk_backend_api import Clerk  # noqa: PLC0415
    from clerk_backend_api.models import ClerkBaseError  # noqa: PLC0415

    # No log lines: the token is the whole output, for $(orgsync session-token ...).
    settings = runtime(ctx).settings(configure_logging=False)
    if not settings.clerk_secret_key:
        raise ConfigError("CLERK_SECRET_KEY is not set: no session can be opened without it")
    sdk = Clerk(
        bearer_auth=settings.clerk_secret_key,
        server_url=settings.clerk_api_url,
        timeout_ms=int(settings.clerk_timeout * 1000),
    )
    body: dict[str, Any] = {"user_id": user_id}
    if organization:
        body["active_organization_id"] = organization
    try:
        session = sdk.sessions.create(request=body)  # type: ignore[arg-type]
        token = sdk.sessions.create_token(session_id=session.id, expires_in_seconds=expires_in)
    except ClerkBaseError as exc:
        fail(f"Clerk refused the session ({exc.status_code}): {_clerk_reason(exc.body)}", EXIT_FAILED)
    except httpx.HTTPError as exc:
        fail(f"cannot reach CLERK_API_URL: {type(exc).__name__}", EXIT_UNAVAILABLE)
    if not token.jwt:
        fail("Clerk answered without a token", EXIT_FAILED)
    click.echo(token.jwt)


def _clerk_reason(body: str) -> str:
    """The ``long_message`` of the first error in Clerk's error body, else a generic reason."""
    try:
        errors = json.loads(body).get("errors") or []
        return str(errors[0].get("long_message") or errors[0]["message"])
    except (ValueError, AttributeError, LookupError, TypeError):
        return "no reason given"
