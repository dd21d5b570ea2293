"""The Celery factory: configuration, thin tasks, beat schedule, a database and Clerk client per process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, signals
from celery._state import get_current_app
from celery.beat import PersistentScheduler
from celery.concurrency import get_implementation
from celery.concurrency.prefork import TaskPool as PreforkPool
from kombu.entity import Queue
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from models import metrics, notifications
from models.clock import now_ms
from models.db import create_db_engine, make_session_factory, session_scope
from models.errors import ConfigError, RetryableError
from models.retention import Pacer, Policy, prune
from models.settings import Settings
from models.submission import enqueue_commands
from models.tables import SyncStatus
from worker.apply import apply_inbox, backoff_ms, sweep_inbox
from worker.clerk import ClerkClient
from worker.commands import confirm_commands, due_command_ids, send_command
from worker.notify import Sender, announce_expired, drain
from worker.process import PerProcess
from worker.ratelimit import RateLimiter
from worker.reconcile import reconcile_client, reconcile_task_body
from worker.redis_transport import TRANSPORT as REDIS_TRANSPORT
from worker.rules import RulesHook
from worker.wakeup import TRANSPORT as WAKING_TRANSPORT
from worker.wakeup import wake_dir_for

log = logging.getLogger(__name__)

TASK_APPLY = "orgsync.apply_events"
TASK_SWEEP = "orgsync.sweep_inbox"
TASK_SEND_COMMAND = "orgsync.send_command"
TASK_CONFIRM_COMMANDS = "orgsync.confirm_commands"
TASK_RECONCILE = "orgsync.reconcile"
TASK_RECONCILE_ORG = "orgsync.reconcile_org"
TASK_PRUNE = "orgsync.prune"
# Queues of our own: the application orgsync runs beside may share the Redis server. Applying
# events has a queue, and worker processes, to itself: nothing that talks to Clerk (commands,
# reconciliation, confirmations) or takes long (pruning) may hold up the next batch. The apply
# queue keeps the name orgsync always had, so messages queued before an upgrade still run.
QUEUE_APPLY = "orgsync"
QUEUE_CLERK = "orgsync.clerk"
QUEUE = QUEUE_APPLY
# What ``orgsync worker --queue`` takes: each role's queue.
WORKER_QUEUES = {"apply": QUEUE_APPLY, "clerk": QUEUE_CLERK}
APPLY_TASKS = frozenset({TASK_APPLY, TASK_SWEEP})
TASK_NOTIFY = "orgsync.deliver_notifications"
# At most this many chunks of apply_batch_size per sweep: a long broker outage leaves a backlog
# that a few sweeps drain, without one sweep holding the whole inbox in memory.
SWEEP_MAX_CHUNKS = 20
# Redis hands an unacknowledged message to another worker after this long. It must exceed the
# longest retry countdown (worker.apply.BACKOFF_CAP_MS) or a delayed retry would run twice; a
# worker that died holding a message is covered much sooner by the sweeper anyway.
REDIS_VISIBILITY_TIMEOUT_S = 3600
BROKER_CONNECT_TIMEOUT_S = 3.0
# How long one organization's reconciliation waits for a rate-limit slot before it gives the
# worker back and is retried later.
ORG_RECONCILE_LIMIT_WAIT_S = 1.0


@dataclass(frozen=True)
class _Database:
    engine: Engine
    factory: sessionmaker[Session]


def _open_database(url: str) -> _Database:
    engine = create_db_engine(url)
    return _Database(engine, make_session_factory(engine))


class ProcessDatabase:
    """The engine and session factory of one process, built after any fork, never at import.

    Prefork children build theirs in ``worker_process_init``; solo and thread pools in
    ``worker_init``. ``session_factory()`` also builds on first use in a process that got no
    signal (a task run eagerly, a shell), and rebuilds when it finds itself in a forked child:
    a pool's sockets must never be shared between processes.
    """

    def __init__(self, url: str) -> None:
        self._database = PerProcess(
            lambda: _open_database(url),
            close=lambda database: database.engine.dispose(),
            # Inherited through fork: forget the parent's connections without closing them,
            # the parent still uses them.
            forget=lambda database: database.engine.dispose(close=False),
        )

    def start(self) -> None:
        self._database.get()

    def stop(self) -> None:
        self._database.stop()

    def session_factory(self) -> sessionmaker[Session]:
        return self._database.get().factory


def command_client(settings: Settings) -> ClerkClient:
    """The commands' Backend API client: the whole instance budget, shared through the storage."""
    limiter = RateLimiter(settings.rate_limit_storage, settings.rate_limit, settings.membership_rate_limit)
    return ClerkClient.from_settings(settings, limiter)


class DataDirScheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's file-backed beat scheduler, creating its file's directory first.

    Beat opens the schedule file before any signal a handler could use to create the data
    directory, and the data directory need not exist when PostgreSQL and Redis hold the state.
    """

    def setup_schedule(self) -> None:
        Path(self.schedule_filename).parent.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()


def _is_prefork(pool_cls: Any) -> bool:
    implementation = get_implementation(pool_cls)
    return isinstance(implementation, type) and issubclass(implementation, PreforkPool)


def _transport_options(broker_url: str) -> dict[str, Any]:
    # Connection retries for publishing come from these options, and kombu's default is to
    # retry for a long time: the web process would then block its dispatcher (and /readyz)
    # while the broker is down. One quick retry survives a stale pooled connection; after
    # that the caller gets an error and the sweeper enqueues the rows later. The SQLAlchemy
    # transport removes these four keys before it calls create_engine, so they are safe there.
    options: dict[str, Any] = {
        "max_retries": 1,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.2,
    }
    if broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        options["visibility_timeout"] = REDIS_VISIBILITY_TIMEOUT_S
        options["socket_connect_timeout"] = BROKER_CONNECT_TIMEOUT_S
    wake_dir = wake_dir_for(broker_url)
    if wake_dir is not None:
        options["wake_dir"] = str(wake_dir)
    return options


def _broker(broker_url: str) -> tuple[str, str | None]:
    """The URL and transport Celery connects with: our waking transport for ``sqla+`` URLs, and
    for Redis kombu's own with a closed channel failing as a lost connection.

    kombu takes a ``sqla+`` prefix over any transport named in the configuration, so the
    prefix goes and the transport is named instead.
    """
    if broker_url.startswith("sqla+"):
        return broker_url[len("sqla+") :], WAKING_TRANSPORT
    if broker_url.startswith("redis://"):
        # Not rediss://: kombu derives TLS from that scheme, which a named transport would hide.
        return broker_url, REDIS_TRANSPORT
    return broker_url, None


def route_task(name: str, *_: Any, **__: Any) -> dict[str, str]:
    """Apply and the sweeper on the apply queue; everything else (Clerk, beat's chores) on the other."""
    return {"queue": QUEUE_APPLY if name in APPLY_TASKS else QUEUE_CLERK}


def create_celery(settings: Settings) -> Celery:
    """The Celery app for ``settings``: tasks registered, sweeper scheduled, no connection made."""
    app = Celery("orgsync")
    broker_url, transport = _broker(settings.broker_url)
    app.conf.update(
        broker_url=broker_url,
        broker_transport=transport,
        broker_transport_options=_transport_options(settings.broker_url),
        broker_connection_timeout=BROKER_CONNECT_TIMEOUT_S,
        # A worker started before the broker, or outliving it, waits for it instead of exiting:
        # a broker outage of any length must end with the worker consuming again.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE_APPLY,
        # A worker started without -Q consumes both (as ``celery -A worker.main worker`` does);
        # ``orgsync worker`` runs one worker per queue.
        task_queues=[Queue(name, routing_key=name) for name in (QUEUE_APPLY, QUEUE_CLERK)],  # type: ignore[no-untyped-call]
        task_routes=(route_task,),
        # At-least-once: a message is acknowledged after its task ran, and given back when the
        # process running it dies. Applying is idempotent, so running twice is harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        enable_utc=True,
        timezone="UTC",
        beat_schedule={
            "orgsync-sweep-inbox": {
                "task": TASK_SWEEP,
                "schedule": settings.sweep_interval,
                # Sweeps that piled up while no worker ran are worthless: only the last one counts.
                "options": {"expires": settings.sweep_interval},
            },
            "orgsync-confirm-commands": {
                "task": TASK_CONFIRM_COMMANDS,
                "schedule": settings.sweep_interval,
                "options": {"expires": settings.sweep_interval},
            },
        },
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        beat_scheduler=f"{__name__}:DataDirScheduler",
    )
    database = ProcessDatabase(settings.database_url)
    # Change notifications are derived by whichever process writes the mirror: this app's workers.
    notifications.configure_from(settings)
    clerk = PerProcess(lambda: command_client(settings), close=ClerkClient.close)
    send = make_sender(app)
    send_commands = make_command_sender(app)
    rules_hook = RulesHook.from_settings(settings, send=send_commands)
    reconcile_clients = PerProcess(lambda: reconcile_client(settings), close=ClerkClient.close)
    org_clients = PerProcess(
        lambda: reconcile_client(settings, limit_wait=ORG_RECONCILE_LIMIT_WAIT_S), close=ClerkClient.close
    )
    send_reconcile_org = make_reconcile_org_sender(app)
    confirm_timeout_ms = int(settings.confirm_timeout * 1000)
    grace_ms = int(settings.sweep_grace * 1000)
    # Longer than a sweep interval and the grace, so a row just sent is not sent again by the
    # next sweep while its task waits in the queue.
    lease_ms = int(max(4 * settings.sweep_interval, settings.sweep_grace, 60.0) * 1000)

    # shared=False: a shared task would be added to every Celery app created later in this
    # process, running this app's closure (its settings, its engine) under another app.
    @app.task(name=TASK_APPLY, bind=True, max_retries=settings.max_attempts, shared=False)  # type: ignore[untyped-decorator]
    def apply_events_task(self: Any, inbox_ids: list[int]) -> None:
        try:
            report = apply_inbox(
                database.session_factory(),
                [int(value) for value in inbox_ids],
                now_ms=now_ms(),
                max_attempts=settings.max_attempts,
                after_batch=rules_hook,
                on_unseen_organizations=send_reconcile_org,
                fill_to=settings.apply_batch_size,
                # Redelivered after its worker died (Redis marks it): maybe this batch killed it.
                one_by_one=bool((self.request.delivery_info or {}).get("redelivered")),
            )
        except RetryableError as exc:
            # Not even the failure could be recorded (database down): retry the same ids.
            _retry(self, inbox_ids, backoff_ms(self.request.retries + 1) / 1000, exc)
            return
        log.debug(
            "applied=%d rejected=%d skipped=%d stale=%d failed=%d dead=%d",
            report.applied,
            report.rejected,
            report.skipped,
            report.stale,
            report.failed,
            report.dead,
        )
        if report.applied:
            # The batch may carry the webhook echo of commands we sent: confirm them now.
            _confirm_quietly(database.session_factory(), confirm_timeout_ms)
            if settings.notify_urls:
                # Deliver the batch's change notifications now rather than at the next beat.
                _send_quietly(app, TASK_NOTIFY)
        if report.retry_ids and report.retry_at_ms is not None:
            _retry(self, report.retry_ids, max(0.0, (report.retry_at_ms - now_ms()) / 1000), None)

    @app.task(name=TASK_SWEEP, shared=False)  # type: ignore[untyped-decorator]
    def sweep_inbox_task() -> int:
        sent = sweep_inbox(
            database.session_factory(),
            send,
            now_ms=now_ms(),
            grace_ms=grace_ms,
            lease_ms=lease_ms,
            batch_size=settings.apply_batch_size,
            limit=settings.apply_batch_size * SWEEP_MAX_CHUNKS,
        )
        if sent:
            log.info("sweeper enqueued %d pending inbox rows", sent)
        return sent

    # max_retries=None: the command's own attempt count (settings.max_attempts) bounds it.
    @app.task(name=TASK_SEND_COMMAND, bind=True, max_retries=None, shared=False)  # type: ignore[untyped-decorator]
    def send_command_task(self: Any, command_id: int) -> str:
        try:
            client = clerk.get()
        except ConfigError as exc:
            # Left pending: once the worker is configured and restarted, the sweep sends it.
            log.error("command %s not sent: %s", command_id, exc)
            return "pending"
        try:
            result = send_command(
                database.session_factory(),
                client,
                int(command_id),
                now_ms=now_ms(),
                max_attempts=settings.max_attempts,
                clock_ms=now_ms,
            )
        except RetryableError as exc:
            # The database is unreachable: the row is untouched or leased, the sweep recovers it.
            raise self.retry(countdown=backoff_ms(self.request.retries + 1) / 1000, exc=exc) from exc
        if result.retry_at_ms is not None:
            raise self.retry(countdown=max(0.0, (result.retry_at_ms - now_ms()) / 1000))
        return result.status

    @app.task(name=TASK_CONFIRM_COMMANDS, shared=False)  # type: ignore[untyped-decorator]
    def confirm_commands_task() -> int:
        factory = database.session_factory()
        _confirm_quietly(factory, confirm_timeout_ms)
        with session_scope(factory) as session:
            due = due_command_ids(
                session, now_ms=now_ms(), grace_ms=grace_ms, limit=settings.apply_batch_size
            )
        if due:
            log.info("re-enqueuing %d due commands", len(due))
            # A broker failure is logged there; the next sweep finds the same commands again.
            enqueue_commands(send_commands, due)
        return len(due)

    if settings.reconcile_interval > 0:
        app.conf.beat_schedule["orgsync-reconcile"] = {
            "task": TASK_RECONCILE,
            "schedule": settings.reconcile_interval,
            # A run that waited in the queue past the next one's time is redundant.
            "options": {"expires": settings.reconcile_interval},
        }

    if settings.prune_interval > 0:
        app.conf.beat_schedule["orgsync-prune"] = {
            "task": TASK_PRUNE,
            "schedule": settings.prune_interval,
            "options": {"expires": settings.prune_interval},
        }

    @app.task(name=TASK_PRUNE, shared=False)  # type: ignore[untyped-decorator]
    def prune_task() -> dict[str, Any]:
        # Batches commit as they go: a prune cut short keeps what it did, the next one goes on.
        report = prune(
            database.session_factory(),
            Policy.from_settings(settings, now_ms=now_ms()),
            pacer=Pacer(rows_per_s=settings.prune_rate),
        )
        if report.redacted or any(report.deleted.values()):
            log.info("pruned %s, redacted %d inbox rows", report.deleted, report.redacted)
        return report.as_dict()

    notify_sender = PerProcess(lambda: Sender.from_settings(settings), close=_close_sender)
    if settings.notify_urls or settings.notify_channel:
        app.conf.beat_schedule["orgsync-notify"] = {
            "task": TASK_NOTIFY,
            "schedule": settings.notify_interval,
            "options": {"expires": settings.notify_interval},
        }

    @app.task(name=TASK_NOTIFY, shared=False)  # type: ignore[untyped-decorator]
    def deliver_notifications_task() -> dict[str, Any]:
        """Announce invitations that expired, then deliver the outbox's due rows (one drain at a time)."""
        factory = database.session_factory()
        expired = announce_expired(factory, now_ms=now_ms())
        sender = notify_sender.get() if settings.notify_urls else None
        if sender is None:
            return {"expired_announced": expired}
        report = drain(
            factory,
            sender,
            clock_ms=now_ms,
            dead_after_ms=int(settings.notify_dead_after * 1000),
            retry_base_s=settings.notify_retry_base,
        )
        report.expired_announced = expired
        if report.failed or report.dead:
            log.info(
                "notifications: %d delivered, %d failed, %d dead",
                report.delivered,
                report.failed,
                report.dead,
            )
        return report.as_dict()

    @app.task(name=TASK_RECONCILE, shared=False)  # type: ignore[untyped-decorator]
    def reconcile_task() -> dict[str, Any] | None:
        return reconcile_task_body(database.session_factory(), reconcile_clients, None)

    # One organization's run is short: on a transient failure (Clerk down, its budget spent)
    # it gives up at once and is tried again later by a new message, so the worker slot is
    # free meanwhile instead of sleeping through backoffs inside the task.
    @app.task(name=TASK_RECONCILE_ORG, bind=True, max_retries=settings.max_attempts, shared=False)  # type: ignore[untyped-decorator]
    def reconcile_org_task(self: Any, organization_id: str) -> dict[str, Any] | None:
        countdown = backoff_ms(self.request.retries + 1) / 1000
        try:
            result = reconcile_task_body(
                database.session_factory(), org_clients, str(organization_id), call_attempts=1
            )
        except RetryableError as exc:
            _retry_reconcile(self, organization_id, countdown, exc)
            return None
        if result is not None and result.get("status") == SyncStatus.INTERRUPTED:
            _retry_reconcile(self, organization_id, countdown, None)
        return result

    _connect_process_signals(app, database)
    app.orgsync_settings = settings
    app.orgsync_database = database
    app.orgsync_clerk = clerk
    return app


def _confirm_quietly(factory: sessionmaker[Session], confirm_timeout_ms: int) -> None:
    """Confirm and flag commands; a failure here must never fail the task that applies events."""
    try:
        with session_scope(factory) as session:
            confirmed, flagged = confirm_commands(
                session, now_ms=now_ms(), confirm_timeout_ms=confirm_timeout_ms
            )
    except Exception:
        log.exception("confirming commands failed; the next run tries again")
        return
    if confirmed:
        log.info("commands confirmed: %d", confirmed)
    if flagged:
        # Applied in Clerk but no webhook showed it: a lost webhook, or a change undone since.
        log.warning(
            "%d applied command(s) not confirmed within %d s: see `orgsync commands list --status applied`",
            flagged,
            confirm_timeout_ms // 1000,
        )


def _close_sender(sender: Sender | None) -> None:
    if sender is not None:
        sender.close()


def _send_quietly(app: Celery, task: str) -> None:
    """Enqueue ``task``; a broker failure only delays it to the next beat."""
    try:
        app.send_task(task, retry=False)
    except Exception as exc:
        log.warning("could not enqueue %s (%s); beat runs it later", task, type(exc).__name__)


def _retry(task: Any, ids: list[int], countdown: float, exc: BaseException | None) -> None:
    if task.request.retries >= task.max_retries:
        # The rows stay pending with their next_attempt_at; the sweeper takes them from here.
        log.warning("giving up retrying %d inbox rows in this task; the sweeper will pick them up", len(ids))
        return
    # Celery publishes the retry before raising; if that publish fails it rejects the message
    # without requeueing, and the rows, still pending, are left to the sweeper.
    raise task.retry(args=[list(ids)], countdown=countdown, exc=exc)


def _retry_reconcile(task: Any, organization_id: str, countdown: float, exc: BaseException | None) -> None:
    if task.request.retries >= task.max_retries:
        # The next instance reconciliation (ORGSYNC_RECONCILE_INTERVAL, `orgsync sync`) covers it.
        tries = task.request.retries + 1
        log.warning("giving up reconciling %s for now after %d tries", organization_id, tries)
        return
    log.info("reconciling %s again in %.0f s: %s", organization_id, countdown, exc or "interrupted")
    raise task.retry(args=[str(organization_id)], countdown=countdown, exc=exc)


def _connect_process_signals(app: Celery, database: ProcessDatabase) -> None:
    """Tie the engine's life to the worker's processes; signals are global, so check the app."""

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app and not _is_prefork(sender.pool_cls):
            database.start()

    def on_process_init(**_: Any) -> None:
        if get_current_app() is app:
            database.start()

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        if get_current_app() is app or getattr(sender, "app", None) is app:
            database.stop()
            # This process's live metrics files go; its counts stay for /metrics to sum.
            metrics.mark_dead()

    handlers = (on_worker_init, on_process_init, on_shutdown)
    # Signals hold weak references: keep the handlers alive exactly as long as the app.
    app.orgsync_signal_handlers = handlers
    signals.worker_init.connect(on_worker_init)
    signals.worker_process_init.connect(on_process_init)
    signals.worker_process_shutdown.connect(on_shutdown)
    signals.worker_shutdown.connect(on_shutdown)


def make_sender(celery: Celery) -> Callable[[list[int]], None]:
    """``send(ids)`` enqueues one apply task for these inbox ids; raises at once if the broker is down.

    No publish retries: the rows are already committed, so a failed send loses nothing (the
    sweeper enqueues them later), while a blocking retry would stall the caller.
    """

    def send(ids: list[int]) -> None:
        if ids:
            celery.send_task(TASK_APPLY, args=[[int(value) for value in ids]], retry=False)

    return send


def make_command_sender(celery: Celery) -> Callable[[list[int]], None]:
    """``send(ids)`` enqueues one send task per command id; raises at once if the broker is down.

    The commands are committed first, so a failed send loses nothing: the confirm task's
    sweep enqueues pending commands later.
    """

    def send(ids: list[int]) -> None:
        for command_id in ids:
            celery.send_task(TASK_SEND_COMMAND, args=[int(command_id)], retry=False)

    return send


def make_reconcile_org_sender(celery: Celery) -> Callable[[list[str]], None]:
    """``send(ids)`` enqueues one reconciliation per organization id; raises at once if the broker is down."""

    def send(organization_ids: list[str]) -> None:
        for organization_id in organization_ids:
            celery.send_task(TASK_RECONCILE_ORG, args=[str(organization_id)], retry=False)

    return send


def check_broker(celery: Celery) -> None:
    """Raise ``RetryableError`` quickly unless the broker accepts a connection (for /readyz)."""
    try:
        with celery.connection_for_write(connect_timeout=BROKER_CONNECT_TIMEOUT_S) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2)
    except Exception as exc:
        # The URL may carry a password: name the failure, not the address.
        raise RetryableError(f"broker unavailable: {type(exc).__name__}") from exc
