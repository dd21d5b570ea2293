"""The ``orgsync`` command line: the composition root for every process orgsync runs."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import click
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from models import queries
from models.db import create_db_engine, make_session_factory, session_scope
from models.errors import ConfigError, OrgsyncError, PermanentError, RetryableError
from models.queries import INVITATION_STATUSES, MAX_PAGE_SIZE, OrganizationView, Page
from models.redact import redact as redact_text
from models.settings import Settings, parse_signing_secrets
from models.tables import InboxEvent, InboxStatus
from orgsync.render import Column, render_table, to_json

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("orgsync")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 5

EPILOG = f"""\b
Settings come from the environment: DATABASE_URL, BROKER_URL (both default to SQLite files
in ORGSYNC_DATA_DIR, default .orgsync), CLERK_WEBHOOK_SIGNING_SECRET (one or more whsec_
secrets, required by `run` and `serve`), CLERK_SECRET_KEY, CLERK_API_URL, ORGSYNC_LOG_LEVEL.

\b
Exit status:
  {EXIT_OK}  success
  {EXIT_FAILED}  failure
  {EXIT_USAGE}  bad usage or input
  {EXIT_CONFIG}  configuration error (a setting, or a database that needs `orgsync db upgrade`)
  {EXIT_NOT_FOUND}  not found (organization, inbox event)
  {EXIT_UNAVAILABLE}  a service is unavailable (database, broker): try again later
"""


class CommandError(OrgsyncError):
    """An error reported by the command line itself, with its exit status."""

    exit_code = EXIT_FAILED


class NotFoundError(CommandError):
    exit_code = EXIT_NOT_FOUND


class NotMigratedError(CommandError):
    exit_code = EXIT_CONFIG


class BadOptionError(CommandError):
    exit_code = EXIT_USAGE


def exit_code_for(exc: OrgsyncError) -> int:
    if isinstance(exc, CommandError):
        return exc.exit_code
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, queries.InvalidQueryError):
        return EXIT_USAGE
    if isinstance(exc, RetryableError):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


Sender = Callable[[list[int]], None]


@dataclass
class Runtime:
    """What a command needs from outside: the environment, and seams for tests."""

    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    make_sender: Callable[[Settings], Sender] | None = None
    logging_configured: bool = False

    def settings(self, *, require_webhook_secret: bool = False, configure_logging: bool = True) -> Settings:
        """Read the settings once for this command and set up logging from them."""
        settings = Settings.from_env(self.environ, require_webhook_secret=require_webhook_secret)
        if configure_logging:
            self.configure_logging(settings.log_level)
        return settings

    def configure_logging(self, level: str) -> None:
        if self.logging_configured:
            return
        self.logging_configured = True
        logging.basicConfig(
            level=level,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if level != "DEBUG":
            # Alembic narrates every plugin and context at INFO; `db upgrade` reports the result.
            logging.getLogger("alembic").setLevel(logging.WARNING)

    def sender(self, settings: Settings) -> Sender:
        if self.make_sender is not None:
            return self.make_sender(settings)
        from worker.app import create_celery, make_sender  # noqa: PLC0415  (Celery only when needed)

        send: Sender = make_sender(create_celery(settings))
        return send


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"orgsync: error: {message}", err=True)
    raise click.exceptions.Exit(code)


def warn(message: str) -> None:
    click.echo(f"orgsync: warning: {message}", err=True)


class OrgsyncGroup(click.Group):
    """Turns orgsync errors into one line on stderr and an exit status, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except OrgsyncError as exc:
            fail(str(exc), exit_code_for(exc))
        except SQLAlchemyError as exc:
            # Anything the domain did not translate: name the failure, keep the SQL out of it.
            log.debug("database error", exc_info=True)
            fail(f"database error: {type(exc).__name__}: {first_line(exc)}", EXIT_FAILED)
        except Exception as exc:
            log.debug("unexpected error", exc_info=True)
            fail(
                f"unexpected {type(exc).__name__}: {exc} (ORGSYNC_LOG_LEVEL=DEBUG shows the traceback)",
                EXIT_FAILED,
            )


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, with credentials masked: fit for output."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return redact_text(line)


def redact_url(url: str) -> str:
    """A URL fit for output: the password replaced, never shown."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ValueError, SQLAlchemyError):
        return "<unparseable URL>"


def runtime(ctx: click.Context) -> Runtime:
    obj = ctx.find_object(Runtime)
    if obj is None:
        obj = ctx.ensure_object(Runtime)
    return obj


# -- database helpers ----------------------------------------------------------------------


def schema_revisions(engine: Engine) -> tuple[set[str], set[str]]:
    """(current revisions in the database, head revisions of this orgsync)."""
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    from models.migrate import MIGRATIONS  # noqa: PLC0415

    heads = set(ScriptDirectory(str(MIGRATIONS)).get_heads())
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    except DBAPIError as exc:
        raise RetryableError(f"database unavailable: {first_line(exc)}") from exc
    return current, heads


def require_migrated(engine: Engine) -> None:
    current, heads = schema_revisions(engine)
    if current == heads:
        return
    if not current:
        raise NotMigratedError(
            f"the database at {redact_url(str(engine.url))} has no orgsync schema yet: "
            "run `orgsync db upgrade`"
        )
    raise NotMigratedError(
        f"the database schema is at revision {', '.join(sorted(current))} but this orgsync expects "
        f"{', '.join(sorted(heads))}: run `orgsync db upgrade` (or upgrade orgsync if the database is newer)"
    )


@contextmanager
def open_database(settings: Settings) -> Iterator[Engine]:
    """The engine of a migrated database; a SQLite file that does not exist is not created."""
    url = make_url(settings.database_url)
    path = url.database if url.get_backend_name() == "sqlite" else None
    if path and path != ":memory:" and not Path(path).exists():
        raise NotMigratedError(
            f"there is no database at {url.database} yet: run `orgsync db upgrade` (or `orgsync run`)"
        )
    engine = create_db_engine(settings.database_url)
    try:
        require_migrated(engine)
        yield engine
    finally:
        engine.dispose()


@contextmanager
def reading(settings: Settings) -> Iterator[Session]:
    """A session on a migrated database, for one command's reads."""
    with open_database(settings) as engine, session_scope(make_session_factory(engine)) as session:
        yield session


def emit(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], as_json: bool) -> None:
    click.echo(to_json(rows) if as_json else render_table(columns, rows))


json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
org_option = click.option(
    "--org", "org_ref", required=True, metavar="ID_OR_SLUG", help="Organization id or slug."
)


# -- the command group ---------------------------------------------------------------------


@click.group(cls=OrgsyncGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orgsync", prog_name="orgsync")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """A local mirror of a Clerk instance's organizations, memberships, invitations and roles."""
    runtime(ctx)


def main(argv: Sequence[str] | None = None) -> None:
    """Console script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="orgsync")


# -- processes -----------------------------------------------------------------------------


@cli.command(epilog=EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.pass_context
def run(ctx: click.Context, host: str, port: int) -> None:
    """Run everything: web server, worker and beat together.

    Migrates the database first, then starts the three as child processes with the same
    environment. Ctrl-C or SIGTERM stops all of them; if one of them dies, the others are
    stopped and `run` fails.
    """
    from orgsync.runner import Supervisor, child_specs, connect_host, url_host, web_ready  # noqa: PLC0415

    rt = runtime(ctx)
    settings = rt.settings(require_webhook_secret=True)
    click.echo(upgrade_database(settings), err=True)
    supervisor = Supervisor(
        child_specs(host, port),
        env=dict(rt.environ),
        out=lambda message: click.echo(message, err=True),
    )
    url = f"http://{url_host(host)}:{port}/webhooks/clerk"
    code = supervisor.run(
        ready=web_ready(connect_host(host), port),
        on_ready=lambda: click.echo(f"orgsync listening on {url}"),
    )
    ctx.exit(code)


@cli.command(epilog=EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1), help="Web processes.")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1), help="Threads per process.")
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.pass_context
def serve(ctx: click.Context, *, host: str, port: int, workers: int, threads: int, access_log: bool) -> None:
    """Serve the webhook endpoint with gunicorn.

    POST /webhooks/clerk, GET /healthz (alive) and GET /readyz (database and broker reachable),
    on gthread workers.
    """
    from orgsync.serve import ServeOptions  # noqa: PLC0415
    from orgsync.serve import serve as run_server  # noqa: PLC0415

    settings = runtime(ctx).settings(require_webhook_secret=True)
    check_schema_at_start(settings)
    run_server(
        settings,
        ServeOptions(host=host, port=port, workers=workers, threads=threads, access_log=access_log),
    )


def check_schema_at_start(settings: Settings) -> None:
    """Refuse to start on an unmigrated database; start anyway when it is only unreachable.

    An unreachable database is a state the server handles (503, Svix retries), and the
    database may well come up after the server; a missing schema never fixes itself.
    """
    engine = create_db_engine(settings.database_url)
    try:
        require_migrated(engine)
    except RetryableError as exc:
        log.warning("starting without a database check: %s", exc)
    finally:
        engine.dispose()


def celery_app(settings: Settings) -> Celery:
    from worker.app import create_celery  # noqa: PLC0415

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return create_celery(settings)


def exit_with(ctx: click.Context, code: object) -> None:
    ctx.exit(code if isinstance(code, int) else EXIT_OK)


@cli.command(epilog=EPILOG)
@click.option(
    "--concurrency",
    type=click.IntRange(1),
    default=None,
    help="Worker processes (default: 1 on SQLite, else one per CPU).",
)
@click.option("--hostname", "-n", default=None, help="Node name, e.g. worker1@%h.")
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None, hostname: str | None) -> None:
    """Run a Celery worker: applies inbox events to the mirror."""
    settings = runtime(ctx).settings(configure_logging=False)
    if concurrency is None and settings.database_url.startswith("sqlite"):
        # SQLite has one writer at a time: more processes would only queue on its lock.
        concurrency = 1
    argv = ["worker", f"--loglevel={settings.log_level}"]
    if concurrency is not None:
        argv.append(f"--concurrency={concurrency}")
    if hostname:
        argv.append(f"--hostname={hostname}")
    if settings.broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport has no fanout exchanges, which these features need.
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    exit_with(ctx, celery_app(settings).start(argv))


@cli.command(epilog=EPILOG)
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Run Celery beat, which schedules the inbox sweeper.

    The sweeper enqueues inbox rows left pending (broker down, worker crashed). Run exactly one.
    """
    settings = runtime(ctx).settings(configure_logging=False)
    # The schedule file lives in ORGSYNC_DATA_DIR (create_celery sets beat_schedule_filename).
    exit_with(ctx, celery_app(settings).start(["beat", f"--loglevel={settings.log_level}"]))


# -- the emulator --------------------------------------------------------------------------


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


@cli.command(epilog=EPILOG)
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
        )
    except ValueError as exc:
        # The options were checked one by one above; this is the emulator's own last word.
        raise BadOptionError(str(exc)) from None
    click.echo(f"orgsync: emulator using {sources}", err=True)
    stop, restore = stop_on_signals()
    try:
        run_emulator(config, out=click.echo, stop=stop)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        fail(f"cannot listen on {host}:{port}: {reason}", EXIT_FAILED)
    finally:
        restore()


@cli.group(epilog=EPILOG)
def db() -> None:
    """Database schema."""


def upgrade_database(settings: Settings) -> str:
    from models.migrate import upgrade  # noqa: PLC0415

    engine = create_db_engine(settings.database_url)
    try:
        before, heads = schema_revisions(engine)
    finally:
        engine.dispose()
    where = redact_url(settings.database_url)
    if before == heads:
        return f"orgsync: database {where} is up to date (revision {', '.join(sorted(heads))})"
    try:
        upgrade(settings.database_url)
    except DBAPIError as exc:
        raise RetryableError(f"database unavailable during the upgrade: {first_line(exc)}") from exc
    engine = create_db_engine(settings.database_url)
    try:
        after, _ = schema_revisions(engine)
    finally:
        engine.dispose()
    was = ", ".join(sorted(before)) or "empty"
    return f"orgsync: database {where} upgraded from {was} to revision {', '.join(sorted(after))}"


@db.command("upgrade", epilog=EPILOG)
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or upgrade the schema to this version of orgsync; safe to run again."""
    settings = runtime(ctx).settings()
    click.echo(upgrade_database(settings))


# -- reading the mirror --------------------------------------------------------------------


@cli.group(epilog=EPILOG)
def orgs() -> None:
    """Organizations in the mirror."""


def paging_options(default_size: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        function = click.option(
            "--page-size", default=default_size, show_default=True, type=click.IntRange(1, MAX_PAGE_SIZE)
        )(function)
        return click.option("--page", default=1, show_default=True, type=click.IntRange(1))(function)

    return decorate


def emit_page(page: Page[Any], columns: Sequence[Column], *, as_json: bool, number: int, size: int) -> None:
    """One page of rows; for people, a footer saying where the page sits and how to get the next."""
    rows = [item.to_dict() for item in page.data]
    emit(rows, columns, as_json)
    if as_json:
        return
    first = (number - 1) * size + 1
    last = first + len(rows) - 1
    if rows:
        footer = f"{first}-{last} of {page.total_count}"
    elif page.total_count:
        footer = f"page {number} is past the end: {page.total_count} in all"
    else:
        return
    if rows and last < page.total_count:
        footer += f" (next: --page {number + 1})"
    click.echo(footer)


@orgs.command("list", epilog=EPILOG)
@paging_options(100)
@json_option
@click.pass_context
def orgs_list(ctx: click.Context, *, page: int, page_size: int, as_json: bool) -> None:
    """List organizations, oldest first."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        result = queries.list_organizations(session, page=page, page_size=page_size)
    emit_page(
        result,
        [
            ("id", "id"),
            ("slug", "slug"),
            ("name", "name"),
            ("members", "members_count"),
            ("created", "created_at"),
            ("updated", "updated_at"),
        ],
        as_json=as_json,
        number=page,
        size=page_size,
    )


def resolve_org(session: Session, ref: str) -> OrganizationView:
    org = queries.resolve_organization(session, ref)
    if org is None:
        raise NotFoundError(f"no organization with id or slug {ref!r}")
    return org


@cli.group(epilog=EPILOG)
def members() -> None:
    """Memberships: read them from the mirror, change them in Clerk."""


@members.command("list", epilog=EPILOG)
@org_option
@click.option("--role", default=None, metavar="KEY", help="Only this role, e.g. org:admin.")
@paging_options(100)
@json_option
@click.pass_context
def members_list(
    ctx: click.Context, *, org_ref: str, role: str | None, page: int, page_size: int, as_json: bool
) -> None:
    """List the members of an organization, oldest first."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        org = resolve_org(session, org_ref)
        result = queries.get_memberships(session, org.id, page=page, page_size=page_size, role=role)
    emit_page(
        result,
        [
            ("user id", "public_user_data.user_id"),
            ("identifier", "public_user_data.identifier"),
            ("first name", "public_user_data.first_name"),
            ("last name", "public_user_data.last_name"),
            ("role", "role"),
            ("membership id", "id"),
            ("joined", "created_at"),
        ],
        as_json=as_json,
        number=page,
        size=page_size,
    )


@cli.group(epilog=EPILOG)
def invitations() -> None:
    """Invitations: read them from the mirror, create or revoke them in Clerk."""


@invitations.command("list", epilog=EPILOG)
@org_option
@click.option("--status", type=click.Choice(INVITATION_STATUSES), default=None, help="Only this status.")
@paging_options(100)
@json_option
@click.pass_context
def invitations_list(
    ctx: click.Context, *, org_ref: str, status: str | None, page: int, page_size: int, as_json: bool
) -> None:
    """List the invitations of an organization, newest first (every status unless --status)."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        org = resolve_org(session, org_ref)
        result = queries.list_invitations(session, org.id, status=status, page=page, page_size=page_size)
    emit_page(
        result,
        [
            ("id", "id"),
            ("email address", "email_address"),
            ("role", "role"),
            ("status", "status"),
            ("created", "created_at"),
            ("expires", "expires_at"),
        ],
        as_json=as_json,
        number=page,
        size=page_size,
    )


@cli.group(epilog=EPILOG)
def roles() -> None:
    """Roles in the mirror."""


@roles.command("list", epilog=EPILOG)
@paging_options(100)
@json_option
@click.pass_context
def roles_list(ctx: click.Context, *, page: int, page_size: int, as_json: bool) -> None:
    """List roles by key, with their permissions."""
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        result = queries.list_roles(session, page=page, page_size=page_size)
    emit_page(
        result,
        [("key", "key"), ("name", "name"), ("id", "id"), ("permissions", "permissions")],
        as_json=as_json,
        number=page,
        size=page_size,
    )


@cli.group(epilog=EPILOG)
def events() -> None:
    """The webhook inbox: what arrived and what became of it."""


def event_dict(row: InboxEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "svix_id": row.svix_id,
        "type": row.event_type,
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "received_at": row.received_at,
        "handled_at": row.handled_at,
        "next_attempt_at": row.next_attempt_at,
    }


@events.command("list", epilog=EPILOG)
@click.option("--status", type=click.Choice(InboxStatus.ALL), default=None, help="Only this status.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@click.pass_context
def events_list(ctx: click.Context, status: str | None, limit: int, as_json: bool) -> None:
    """List inbox events, newest first."""
    from models.inbox import list_events  # noqa: PLC0415

    settings = runtime(ctx).settings()
    with reading(settings) as session:
        rows = [event_dict(row) for row in list_events(session, status=status, limit=limit)]
    emit(
        rows,
        [
            ("id", "id"),
            ("svix id", "svix_id"),
            ("type", "type"),
            ("status", "status"),
            ("attempts", "attempts"),
            ("received", "received_at"),
            ("last error", "last_error"),
        ],
        as_json,
    )


@events.command("replay", epilog=EPILOG)
@click.argument("refs", nargs=-1, required=True, metavar="ID...")
@click.pass_context
def events_replay(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Apply inbox events again: by inbox id or svix id (msg_...).

    The events are reset to pending and committed, then enqueued. If the broker cannot be
    reached they stay pending and the sweeper enqueues them once it can.
    """
    from models.inbox import reset_for_replay  # noqa: PLC0415

    rt = runtime(ctx)
    settings = rt.settings()
    with open_database(settings) as engine, session_scope(make_session_factory(engine)) as session:
        try:
            ids = reset_for_replay(session, refs)
        except RetryableError:
            raise
        except PermanentError as exc:
            # The inbox names every unknown reference and changes nothing.
            raise NotFoundError(str(exc)) from exc
    listed = ", ".join(str(i) for i in ids)
    click.echo(f"reset {len(ids)} event(s) to pending: {listed}")
    # Enqueue only after the commit above, so that the worker sees the rows as pending.
    try:
        rt.sender(settings)(ids)
    except Exception as exc:
        log.debug("enqueue failed", exc_info=True)
        warn(
            f"could not enqueue them ({type(exc).__name__}: {first_line(exc)}); they stay pending "
            f"and the sweeper enqueues them once the broker is reachable"
        )
        return
    click.echo(f"enqueued {len(ids)} event(s)")


# Importing these modules registers their commands in the groups above.
from orgsync import cli_commands, cli_rules, cli_sync  # noqa: E402, F401
