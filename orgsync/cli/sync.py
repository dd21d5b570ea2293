"""``orgsync sync``: reconcile the mirror with the Backend API, showing progress and the drift it repaired.

The run happens in this process (no worker needed: the first run is a new deployment's
backfill), through the same rate limiter storage as the workers' commands, capped at
ORGSYNC_RECONCILE_SHARE of the instance budget. Interrupted (Ctrl-C, a lost connection), it
is saved; running `orgsync sync` again resumes it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO

import click

from models.db import make_session_factory
from models.errors import OrganizationNotFoundError
from models.reconcile import ACTIONS, KINDS, SyncBusyError
from models.tables import SyncStatus
from orgsync.cli.base import (
    EPILOG,
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    NotFoundError,
    fail,
    open_database,
    runtime,
)
from orgsync.render import render_table
from worker.reconcile import (
    DEFAULT_WORKERS,
    Progress,
    SyncResult,
    reconcile_client,
    run_reconcile,
)

REDRAW_S = 0.2


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def progress_line(progress: Progress, width: int = 24) -> str:
    total, done = progress.organizations_total, progress.organizations_done
    if total:
        filled = min(width, int(width * done / total))
        bar = "#" * filled + "." * (width - filled)
        orgs = f"[{bar}] {done}/{total} orgs"
    else:
        orgs = f"{progress.phase}: {done} orgs"
    return (
        f"{orgs} | {progress.rows:,} rows | {progress.api_calls:,} API calls | "
        f"{progress.rate_limit_waits:,} rate-limit waits | drift {progress.drift:,} | "
        f"ETA {format_duration(progress.eta_s)}"
    )


class ProgressBar:
    """One line on stderr, redrawn in place at most every REDRAW_S; for people, never parsed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._last = 0.0
        self._width = 0

    def update(self, progress: Progress) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < REDRAW_S and progress.phase != "done":
                return
            self._last = now
            line = progress_line(progress)
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self._stream.write("\r" + line + " " * pad)
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._width:
                self._stream.write("\n")
                self._stream.flush()


def drift_rows(result: SyncResult) -> list[dict[str, object]]:
    counts = result.drift.as_dict()
    return [{"kind": kind, **counts[kind]} for kind in KINDS]


def summary(result: SyncResult) -> str:
    where = f"organization {result.organization_id}" if result.organization_id else "the whole instance"
    head = (
        f"sync run {result.run_id} ({where}){' resumed' if result.resumed else ''}: {result.status} in "
        f"{format_duration(result.elapsed_s)}: {result.organizations:,} organizations, {result.rows:,} rows, "
        f"{result.api_calls:,} API calls, {result.rate_limit_waits:,} rate-limit waits"
    )
    columns = [("kind", "kind"), *((action, action) for action in ACTIONS)]
    total = result.drift.total
    drift = (
        "drift: none (the mirror matched Clerk)"
        if not total
        else f"drift: {total:,} repairs, each one a missed webhook event\n"
        + render_table(columns, drift_rows(result))
    )
    lines = [head, drift]
    if result.error:
        lines.append(f"error: {result.error}")
    return "\n".join(lines)


@click.command("sync", epilog=EPILOG)
@click.option(
    "--org", "org_ref", default=None, metavar="ID_OR_SLUG", help="Only this organization (id or slug)."
)
@click.option(
    "--workers",
    default=DEFAULT_WORKERS,
    show_default=True,
    type=click.IntRange(1, 32),
    help="Organizations fetched at the same time.",
)
@click.option(
    "--progress/--no-progress",
    "show_progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run as a JSON object instead of text.")
@click.pass_context
def sync(
    ctx: click.Context, org_ref: str | None, workers: int, show_progress: bool | None, as_json: bool
) -> None:
    """Reconcile the mirror with Clerk's Backend API (the first run is the backfill).

    Lists organizations, their memberships and invitations, and roles; writes what is newer
    than the mirror, re-checks what the mirror has and Clerk did not list, and prints the
    drift it repaired. Safe while webhooks keep arriving.
    """
    settings = runtime(ctx).settings()
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    bar = ProgressBar(sys.stderr) if show_progress else None
    with open_database(settings) as engine:
        client = reconcile_client(settings)
        try:
            result = run_reconcile(
                make_session_factory(engine),
                client,
                organization=org_ref,
                workers=workers,
                on_progress=bar.update if bar is not None else None,
            )
        except SyncBusyError as exc:
            fail(f"{exc}: try again later", EXIT_UNAVAILABLE)
        except OrganizationNotFoundError as exc:
            raise NotFoundError(str(exc)) from exc
        finally:
            if bar is not None:
                bar.close()
            client.close()
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        click.echo(summary(result))
    if result.status == SyncStatus.INTERRUPTED:
        click.echo("orgsync: the run was interrupted: run `orgsync sync` again to resume it", err=True)
        raise click.exceptions.Exit(EXIT_UNAVAILABLE)
    if result.status != SyncStatus.COMPLETED:
        raise click.exceptions.Exit(EXIT_FAILED)
