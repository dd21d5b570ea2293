"""The command line's shared base: runtime, exit codes, errors, options, output and the database.

Every feature module of ``orgsync.cli`` imports this one and no other; this one imports none
of them. ``orgsync.cli`` composes the feature modules into the ``orgsync`` command.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models import notifications, reads
from models.commands import CommandNotFoundError
from models.db import create_db_engine, make_session_factory, session_scope
from models.errors import ConfigError, OrganizationNotFoundError, OrgsyncError, PermanentError, RetryableError
from models.migrate import require_database_file, require_migrated
from models.reads import MAX_PAGE_SIZE, Listing
from models.redact import redact as redact_text
from models.settings import Settings
from models.submission import CommandService, Send
from orgsync import logs
from orgsync.render import Column, render_table, to_json

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
  {EXIT_NOT_FOUND}  not found (organization, inbox event, command)
  {EXIT_UNAVAILABLE}  a service is unavailable (database, broker): try again later
"""


class CliError(OrgsyncError):
    """An error reported by the command line itself, with its exit status (subclasses are permanent)."""

    exit_code = EXIT_FAILED


class RefusedError(CliError, PermanentError):
    """The request was understood and refused (the message says why)."""


class NotFoundError(CliError, PermanentError):
    exit_code = EXIT_NOT_FOUND


class BadOptionError(CliError, PermanentError):
    exit_code = EXIT_USAGE


def exit_code_for(exc: OrgsyncError) -> int:
    if isinstance(exc, CliError):
        return exc.exit_code
    if isinstance(exc, (OrganizationNotFoundError, CommandNotFoundError)):
        return EXIT_NOT_FOUND
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, reads.InvalidQueryError):
        return EXIT_USAGE
    if isinstance(exc, RetryableError):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


@dataclass
class Runtime:
    """What a command needs from outside: the environment, and seams for tests."""

    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    make_sender: Callable[[Settings], Send] | None = None
    make_command_sender: Callable[[Settings], Send] | None = None
    logging_configured: bool = False

    def settings(self, *, require_webhook_secret: bool = False, configure_logging: bool = True) -> Settings:
        """Read the settings once for this command and set up logging from them."""
        settings = Settings.from_env(self.environ, require_webhook_secret=require_webhook_secret)
        # A command that writes the mirror (``orgsync sync``) announces its changes like a worker.
        notifications.configure_from(settings)
        if configure_logging:
            self.configure_logging(settings.log_level, settings.log_format)
        return settings

    def configure_logging(self, level: str, fmt: str = "text") -> None:
        if self.logging_configured:
            return
        self.logging_configured = True
        logs.configure(level, fmt)

    def sender(self, settings: Settings) -> Send:
        """``send(inbox_ids)`` enqueueing apply tasks."""
        if self.make_sender is not None:
            return self.make_sender(settings)
        from worker.app import create_celery, make_sender  # noqa: PLC0415  (Celery only when needed)

        send: Send = make_sender(create_celery(settings))
        return send

    def command_sender(self, settings: Settings) -> Send:
        """``send(command_ids)`` enqueueing send tasks; built on first use (dry runs need no broker)."""
        built: list[Send] = []

        def send(ids: list[int]) -> None:
            if not built:
                if self.make_command_sender is not None:
                    built.append(self.make_command_sender(settings))
                else:
                    from worker.app import create_celery, make_command_sender  # noqa: PLC0415

                    settings.data_dir.mkdir(parents=True, exist_ok=True)
                    built.append(make_command_sender(create_celery(settings)))
            built[0](ids)

        return send

    def command_service(self, settings: Settings, sessions: sessionmaker[Session]) -> CommandService:
        """The one submission service, wired with this runtime's sender."""
        return CommandService(sessions, self.command_sender(settings), dry_run_default=settings.dry_run)


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


def describe(ids: Sequence[int]) -> str:
    listed = ", ".join(str(value) for value in ids)
    return f"command {listed}" if len(ids) == 1 else f"{len(ids)} commands ({listed})"


def report_enqueue(ids: Sequence[int], error: str | None) -> None:
    """Say on stderr whether the open commands reached the workers (``error``: why not)."""
    if not ids:
        return
    if error is None:
        click.echo(f"orgsync: enqueued {describe(ids)}", err=True)
        return
    warn(
        f"could not enqueue {describe(ids)} ({error}); they stay pending: the sweeper sends them "
        "once the broker is reachable, or run `orgsync commands retry ID`"
    )


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, with credentials masked: fit for output."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return redact_text(line)


def runtime(ctx: click.Context) -> Runtime:
    obj = ctx.find_object(Runtime)
    if obj is None:
        obj = ctx.ensure_object(Runtime)
    return obj


# -- the database --------------------------------------------------------------------------


@contextmanager
def open_database(settings: Settings) -> Iterator[Engine]:
    """The engine of a migrated database; a SQLite file that does not exist is not created."""
    require_database_file(settings.database_url)
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


# -- options and output --------------------------------------------------------------------


def emit(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], as_json: bool) -> None:
    click.echo(to_json(rows) if as_json else render_table(columns, rows))


json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
org_option = click.option(
    "--org", "org_ref", required=True, metavar="ID_OR_SLUG", help="Organization id or slug."
)


def paging_options(default_size: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        function = click.option(
            "--page-size", default=default_size, show_default=True, type=click.IntRange(1, MAX_PAGE_SIZE)
        )(function)
        return click.option("--page", default=1, show_default=True, type=click.IntRange(1))(function)

    return decorate


def emit_page(
    page: Listing[Any], columns: Sequence[Column], *, as_json: bool, number: int, size: int
) -> None:
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


def resolve_org_id(session: Session, ref: str) -> str:
    """The id of the live organization with id or slug ``ref``; not found is exit code 4."""
    found = reads.organization_id(session, ref)
    if found is None:
        raise NotFoundError(f"no organization with id or slug {ref!r}")
    return found


# Groups whose commands come from more than one feature module (reading and changing).


@click.group(epilog=EPILOG)
def members() -> None:
    """Memberships: read them from the mirror, change them in Clerk."""


@click.group(epilog=EPILOG)
def invitations() -> None:
    """Invitations: read them from the mirror, create or revoke them in Clerk."""
