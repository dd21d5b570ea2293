"""Processes: ``run`` (everything), ``serve`` (web), ``worker``, ``beat``, and ``db upgrade``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from models.db import create_db_engine
from models.errors import RetryableError
from models.metrics import prepare_multiprocess_dir
from models.migrate import require_migrated, upgrade_database
from models.settings import Settings
from orgsync.cli.base import EPILOG, EXIT_OK, runtime
from orgsync.logs import quiet_celery

# ``orgsync worker --queue`` roles, and the Celery queue each consumes (worker.app's names,
# repeated here so that the command line loads without Celery).
WORKER_QUEUES = {"apply": "orgsync", "clerk": "orgsync.clerk"}
WORKER_ROLES = tuple(WORKER_QUEUES)

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("orgsync")


@click.command(epilog=EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.pass_context
def run(ctx: click.Context, host: str, port: int) -> None:
    """Run everything: web server, the apply and clerk workers, and beat together.

    Migrates the database first, then starts them as child processes with the same
    environment. Ctrl-C or SIGTERM stops all of them; if one of them dies, the others are
    stopped and `run` fails.
    """
    from orgsync.runner import Supervisor, child_specs, connect_host, url_host, web_ready  # noqa: PLC0415

    rt = runtime(ctx)
    settings = rt.settings(require_webhook_secret=True)
    click.echo(upgrade_database(settings.database_url), err=True)
    env = dict(rt.environ)
    # One metrics directory for the web, worker and beat processes: /metrics sums them all.
    prepare_multiprocess_dir(env, metrics_dir(settings))
    supervisor = Supervisor(
        child_specs(host, port),
        env=env,
        out=lambda message: click.echo(message, err=True),
    )
    url = f"http://{url_host(host)}:{port}/webhooks/clerk"
    code = supervisor.run(
        ready=web_ready(connect_host(host), port),
        on_ready=lambda: click.echo(f"orgsync listening on {url}"),
    )
    ctx.exit(code)


@click.command(epilog=EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1), help="Web processes.")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1), help="Threads per process.")
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.pass_context
def serve(ctx: click.Context, *, host: str, port: int, workers: int, threads: int, access_log: bool) -> None:
    """Serve the webhook endpoint (and the read API and console when configured) with granian.

    POST /webhooks/clerk, GET /healthz (alive) and GET /readyz (database and broker reachable);
    each web process runs the app on its threads.
    """
    from orgsync.serve import ServeOptions  # noqa: PLC0415
    from orgsync.serve import serve as run_server  # noqa: PLC0415

    settings = runtime(ctx).settings(require_webhook_secret=True)
    check_schema_at_start(settings)
    share_metrics_dir(settings)
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


def metrics_dir(settings: Settings) -> Path:
    """Where the processes of this data directory keep their metrics, unless the operator says."""
    return settings.data_dir / "metrics"


def share_metrics_dir(settings: Settings) -> None:
    """Set up this process's metrics directory before it forks: its children inherit it.

    The web server's worker processes and the worker's pool processes each write their own
    files there; processes of the same data directory (a ``serve`` and a ``worker`` started
    apart) share it, so one ``/metrics`` shows them all.
    """
    prepare_multiprocess_dir(os.environ, metrics_dir(settings))


def celery_app(settings: Settings) -> Celery:
    from worker.app import create_celery  # noqa: PLC0415

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    share_metrics_dir(settings)
    return create_celery(settings)


def exit_with(ctx: click.Context, code: object) -> None:
    ctx.exit(code if isinstance(code, int) else EXIT_OK)


@click.command(epilog=EPILOG)
@click.option(
    "--queue",
    "queue",
    type=click.Choice(sorted(WORKER_ROLES)),
    default=None,
    help="Run the pool of one queue only: apply (inbox events) or clerk (Backend API calls, "
    "reconciliation, beat's chores). Default: both, as two worker processes.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1),
    default=None,
    help="Processes of each pool (default: 1 on SQLite, else one per CPU).",
)
@click.option(
    "--hostname", "-n", default=None, help="Node name, e.g. w1@%h; each pool prefixes its role: apply-w1@%h."
)
@click.pass_context
def worker(ctx: click.Context, queue: str | None, concurrency: int | None, hostname: str | None) -> None:
    """Run Celery workers: one pool applies inbox events, the other talks to Clerk.

    Applying events never waits behind a Backend API call: each queue has worker processes
    of its own. Without --queue both pools run, as child processes stopped together.
    """
    settings = runtime(ctx).settings(configure_logging=False)
    if queue is None:
        from orgsync.runner import Supervisor, worker_specs  # noqa: PLC0415

        supervisor = Supervisor(
            worker_specs(concurrency=concurrency, hostname=hostname),
            # One process group: whoever signals or kills ours reaches the pools too.
            own_groups=False,
            out=lambda message: click.echo(message, err=True),
        )
        ctx.exit(supervisor.run())
    if concurrency is None and settings.database_url.startswith("sqlite"):
        # SQLite has one writer at a time: more processes would only queue on its lock.
        concurrency = 1
    quiet_celery(settings.log_level, settings.log_format)
    argv = ["worker", f"--loglevel={settings.log_level}", f"--queues={WORKER_QUEUES[queue]}"]
    argv.append(f"--hostname={queue}-{hostname}" if hostname else f"--hostname={queue}@%h")
    if concurrency is not None:
        argv.append(f"--concurrency={concurrency}")
    if settings.broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport has no fanout exchanges, which these features need.
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    exit_with(ctx, celery_app(settings).start(argv))


@click.command(epilog=EPILOG)
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Run Celery beat, which schedules the inbox sweeper.

    The sweeper enqueues inbox rows left pending (broker down, worker crashed). Run exactly one.
    """
    settings = runtime(ctx).settings(configure_logging=False)
    quiet_celery(settings.log_level, settings.log_format)
    # The schedule file lives in ORGSYNC_DATA_DIR (create_celery sets beat_schedule_filename).
    exit_with(ctx, celery_app(settings).start(["beat", f"--loglevel={settings.log_level}"]))


@click.group(epilog=EPILOG)
def db() -> None:
    """Database schema."""


@db.command("upgrade", epilog=EPILOG)
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or upgrade the schema to this version of orgsync; safe to run again."""
    settings = runtime(ctx).settings()
    click.echo(upgrade_database(settings.database_url))
