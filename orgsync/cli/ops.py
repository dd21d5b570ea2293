"""Operating orgsync: ``prune`` old rows, ``status`` on one screen, ``doctor`` for the setup.

``status`` and ``doctor`` only read. Their exit codes make them fit for a cron job or a
container health check: 0 all is well, EXIT_ATTENTION when something needs a person,
EXIT_CONFIG for bad settings, EXIT_UNAVAILABLE when the database cannot be reached.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

import models.settings
from models.clock import now_ms
from models.db import create_db_engine, make_session_factory
from models.errors import ConfigError, OrgsyncError, RetryableError
from models.migrate import redact_url, require_database_file, schema_revisions
from models.redact import redact as redact_text
from models.retention import (
    DEFAULT_DUTY,
    REDACTION,
    TABLES,
    Pacer,
    Policy,
    PruneReport,
    count_prunable,
    prune,
)
from models.settings import Settings, parse_signing_secrets
from models.status import DEFAULT_MAX_LAG_S, collect_status
from models.tables import InboxEvent
from orgsync.cli.base import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE, open_database, reading, runtime
from orgsync.render import render_table

# Distinct from every other exit status: the command worked and found something a person must see.
EXIT_ATTENTION = 6

OPS_EPILOG = f"""\b
Exit status (status, doctor):
  {EXIT_OK}  all is well
  {EXIT_ATTENTION}  something needs a person (listed under "attention" / findings that failed)
  {EXIT_CONFIG}  a setting is malformed, or the database needs `orgsync db upgrade`
  {EXIT_UNAVAILABLE}  the database cannot be reached
"""

# Deliveries whose instance ``doctor`` compares: enough to see a second instance, cheap to parse.
INSTANCE_SAMPLE = 200

# -- prune -----------------------------------------------------------------------------------


def _prune_rows(report: PruneReport, settings: Settings) -> list[dict[str, Any]]:
    days = {
        "inbox_events": settings.retain_inbox_days,
        "api_calls": settings.retain_api_calls_days,
        "commands": settings.retain_commands_days,
        "sync_runs": settings.retain_sync_runs_days,
        "notifications": settings.retain_notifications_days,
    }
    rows: list[dict[str, Any]] = [
        {"table": name, "action": "delete", "rows": report.deleted[name], "older_than_days": days[name]}
        for name in TABLES
    ]
    rows.append(
        {
            "table": "inbox_events",
            "action": "redact",
            "rows": report.redacted,
            "older_than_days": settings.redact_after_days,
        }
    )
    return rows


@click.command("prune", epilog=OPS_EPILOG)
@click.option("--dry-run", is_flag=True, help="Count what would be removed; change nothing.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, models.settings.MAX_PRUNE_BATCH_SIZE),
    default=None,
    help="Rows per transaction (default ORGSYNC_PRUNE_BATCH_SIZE).",
)
@click.option(
    "--duty",
    type=click.FloatRange(0, 1, min_open=True),
    default=DEFAULT_DUTY,
    show_default=True,
    help="Share of the time spent pruning; it rests between batches the rest (1: full speed).",
)
@click.option(
    "--rate",
    type=click.IntRange(1),
    default=None,
    help="Rows deleted or redacted per second at most (default ORGSYNC_PRUNE_RATE).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
@click.pass_context
def prune_command(
    ctx: click.Context, *, dry_run: bool, batch_size: int | None, duty: float, rate: int | None, as_json: bool
) -> None:
    """Delete rows past their retention and redact personal data in old inbox payloads.

    Pending inbox rows are never removed; a delivery id is kept ORGSYNC_RETAIN_INBOX_DAYS, well
    past Svix's last retry, so a retried delivery is still recognised. Each batch is its own
    short transaction: safe while webhooks arrive. Beat runs this every ORGSYNC_PRUNE_INTERVAL.
    """
    settings = runtime(ctx).settings()
    policy = Policy.from_settings(settings, now_ms=now_ms(), batch_size=batch_size)
    with open_database(settings) as engine:
        factory = make_session_factory(engine)
        if dry_run:
            report = count_prunable(factory, policy)
        else:

            def progress(name: str, done: int) -> None:
                verb = "redacted" if name == REDACTION else "deleted"
                click.echo(f"orgsync: prune: {name}: {done:,} {verb}", err=True)

            pacer = Pacer(duty, rows_per_s=rate or settings.prune_rate)
            report = prune(factory, policy, progress=progress, pacer=pacer)
    if as_json:
        click.echo(json.dumps({**report.as_dict(), "rows": _prune_rows(report, settings)}, indent=2))
        return
    columns = [
        ("table", "table"),
        ("action", "action"),
        ("rows", "rows"),
        ("older than (days)", "older_than_days"),
    ]
    click.echo(render_table(columns, _prune_rows(report, settings)))
    if dry_run:
        click.echo("dry run: nothing was changed (run without --dry-run to prune)")


# -- status ----------------------------------------------------------------------------------


def _status_text(status: Mapping[str, Any]) -> str:
    inbox, commands = status["inbox"], status["commands"]
    run = status["reconciliation"]
    if run is None:
        sync_line = "none yet (`orgsync sync` runs the first, the backfill)"
    else:
        sync_line = f"run {run['id']} ({run['scope']}) {run['status']}, drift {run['drift']:,}"
    stopped = status["rules"]["stopped"]
    notified = status["notifications"]
    lines = [
        f"inbox:          {inbox['pending']:,} pending, lag {inbox['lag_s']:.1f} s, {inbox['dead']:,} dead",
        f"commands:       {commands['open']:,} open, {commands['failed_24h']:,} failed (24 h), "
        f"{commands['unconfirmed']:,} unconfirmed",
        f"reconciliation: {sync_line}",
        f"rules:          {', '.join(stopped) + ' stopped' if stopped else 'none stopped'}",
        f"notifications:  {notified['pending']:,} pending ({notified['failing']:,} failing), "
        f"oldest {notified['oldest_pending_age_s']:.1f} s, {notified['dead']:,} dead",
    ]
    if status["attention"]:
        lines.append("needs attention:")
        lines.extend(f"  - {item}" for item in status["attention"])
    else:
        lines.append("all is well")
    return "\n".join(lines)


@click.command("status", epilog=OPS_EPILOG)
@click.option(
    "--max-lag",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_MAX_LAG_S,
    show_default=True,
    help="Seconds the oldest pending inbox event may wait before it needs attention.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object with stable keys.")
@click.pass_context
def status(ctx: click.Context, max_lag: float, as_json: bool) -> None:
    """One screen of health: inbox depth and lag, dead events, commands, reconciliation, rules.

    Exits EXIT_ATTENTION when something needs a person, so it can back a health check.
    """
    settings = runtime(ctx).settings()
    with reading(settings) as session:
        result = collect_status(session, settings, now=now_ms(), max_lag_s=max_lag)
    click.echo(json.dumps(result, indent=2) if as_json else _status_text(result))
    if not result["ok"]:
        raise click.exceptions.Exit(EXIT_ATTENTION)


# -- doctor ----------------------------------------------------------------------------------

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Finding:
    check: str
    result: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "result": self.result, "detail": self.detail, "fix": self.fix}


def known_setting_names() -> set[str]:
    """Every variable the settings module reads, from its own source: never a second list to keep."""
    source = inspect.getsource(models.settings)
    return set(re.findall(r'"((?:ORGSYNC|CLERK)_[A-Z0-9_]+)"', source)) | {"DATABASE_URL", "BROKER_URL"}


def check_settings(environ: Mapping[str, str]) -> tuple[Settings | None, list[Finding]]:
    findings: list[Finding] = []
    known = known_setting_names()
    unknown = sorted(
        name for name in environ if name.startswith(("ORGSYNC_", "CLERK_")) and name not in known
    )
    if unknown:
        findings.append(
            Finding(
                "settings",
                WARN,
                f"unknown variable(s) ignored: {', '.join(unknown)}",
                "check the spelling against `orgsync --help` and the README's table",
            )
        )
    try:
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        # Each variable alone, so every malformed one is named, not only the first.
        bad: list[str] = []
        for name in sorted(known & set(environ)):
            try:
                Settings.from_env({name: environ[name]})
            except ConfigError as single:
                bad.append(redact_text(str(single)))
        for message in bad or [redact_text(str(exc))]:
            findings.append(Finding("settings", FAIL, message, "correct the variable named, or unset it"))
        return None, findings
    findings.append(Finding("settings", OK, "every setting parsed"))
    return settings, findings


def check_signing_secret(environ: Mapping[str, str]) -> Finding:
    raw = environ.get("CLERK_WEBHOOK_SIGNING_SECRET", "")
    if not raw.strip():
        return Finding(
            "signing secret",
            WARN,
            "CLERK_WEBHOOK_SIGNING_SECRET is not set: `serve` and `run` refuse to start",
            "copy it from the Clerk dashboard: Webhooks > your endpoint > Signing Secret",
        )
    try:
        secrets = parse_signing_secrets(raw)
    except ConfigError as exc:
        return Finding("signing secret", FAIL, str(exc), "paste the whole whsec_... value from the dashboard")
    return Finding("signing secret", OK, f"{len(secrets)} whsec_ secret(s), well formed")


def check_database(settings: Settings) -> list[Finding]:
    where = redact_url(settings.database_url)
    try:
        require_database_file(settings.database_url)
    except ConfigError as exc:
        return [Finding("database", FAIL, str(exc), "run `orgsync db upgrade`")]
    engine = create_db_engine(settings.database_url)
    try:
        current, heads = schema_revisions(engine)
    except RetryableError as exc:
        return [
            Finding(
                "database",
                FAIL,
                f"{where}: {redact_text(str(exc))}",
                "start the database, or correct DATABASE_URL (host, port, credentials)",
            )
        ]
    finally:
        engine.dispose()
    found = [Finding("database", OK, f"{where} reachable")]
    if current == heads:
        found.append(Finding("migrations", OK, f"at head ({', '.join(sorted(heads))})"))
    else:
        at = ", ".join(sorted(current)) or "no schema"
        found.append(
            Finding(
                "migrations",
                FAIL,
                f"database at {at}, this orgsync expects {', '.join(sorted(heads))}",
                "run `orgsync db upgrade` (after upgrading orgsync everywhere, when the database is newer)",
            )
        )
    return found


def check_broker(settings: Settings) -> Finding:
    url = settings.broker_url
    if url.startswith("sqla+sqlite"):
        path = make_url(url[len("sqla+") :]).database
        if path and not Path(path).exists():
            return Finding(
                "broker", WARN, "the embedded broker's file does not exist yet", "it is created by `run`"
            )
        return Finding("broker", OK, "embedded SQLite broker")
    from celery import Celery  # noqa: PLC0415  (Celery only for this check)

    from worker.app import check_broker as reach_broker  # noqa: PLC0415

    app = Celery("orgsync-doctor", broker=url)
    try:
        reach_broker(app)
    except RetryableError as exc:
        return Finding("broker", FAIL, redact_text(str(exc)), "start the broker, or correct BROKER_URL")
    return Finding("broker", OK, f"{redact_url(url)} reachable")


def check_clerk_key(settings: Settings) -> Finding:
    key = settings.clerk_secret_key
    if key is None:
        return Finding(
            "clerk secret key",
            WARN,
            "CLERK_SECRET_KEY is not set: commands and `orgsync sync` cannot call the Backend API",
            "copy the secret key from the Clerk dashboard: Configure > API keys",
        )
    from worker.clerk import ClerkApiError, ClerkClient  # noqa: PLC0415
    from worker.ratelimit import RateLimiter  # noqa: PLC0415

    kind = "production" if key.startswith("sk_live_") else "development"
    limiter = RateLimiter("memory://", settings.rate_limit, settings.membership_rate_limit)
    client = ClerkClient.from_settings(settings, limiter)
    try:
        # The cheapest authenticated call: one role, no organization data.
        client.list_roles(limit=1, purpose="check")
    except ClerkApiError as exc:
        if exc.status in (401, 403):
            return Finding(
                "clerk secret key",
                FAIL,
                f"refused by {settings.clerk_api_url} ({exc.status} {exc.code})",
                "copy the secret key of the instance again (Configure > API keys); check CLERK_API_URL",
            )
        return Finding(
            "clerk secret key",
            FAIL,
            f"{settings.clerk_api_url} did not answer the check: {redact_text(str(exc))}",
            "check CLERK_API_URL and the network; try again later",
        )
    finally:
        client.close()
    return Finding("clerk secret key", OK, f"accepted by {settings.clerk_api_url} ({kind} instance key)")


def delivered_instances(session: Session) -> list[str]:
    inbox = InboxEvent.__table__
    bodies = session.scalars(select(inbox.c.body).order_by(inbox.c.id.desc()).limit(INSTANCE_SAMPLE))
    found: set[str] = set()
    for body in bodies:
        try:
            value = json.loads(body).get("instance_id")
        except (ValueError, AttributeError, RecursionError):
            continue
        if isinstance(value, str):
            found.add(value)
    return sorted(found)


def check_instance(settings: Settings, instances: list[str]) -> Finding:
    expected = settings.instance_id
    if not instances:
        return Finding("instance", OK, "no deliveries yet to compare")
    if expected is not None:
        others = [value for value in instances if value != expected]
        if others:
            return Finding(
                "instance",
                FAIL,
                f"recent deliveries come from {', '.join(others)}, not {expected}",
                "point the instance's webhook endpoint here, or correct CLERK_INSTANCE_ID",
            )
        return Finding("instance", OK, f"recent deliveries all come from {expected}")
    if len(instances) > 1:
        return Finding(
            "instance",
            FAIL,
            f"recent deliveries come from several instances: {', '.join(instances)}",
            "one orgsync mirrors one instance: remove the other endpoints, then set CLERK_INSTANCE_ID",
        )
    return Finding(
        "instance",
        OK,
        f"recent deliveries come from {instances[0]}",
        f"set CLERK_INSTANCE_ID={instances[0]} to have doctor hold it to that",
    )


def check_rules(settings: Settings) -> Finding:
    if settings.rules_file is None:
        return Finding("rules", OK, "no rules file (ORGSYNC_RULES_FILE unset)")
    from worker.rules_format import load_rules  # noqa: PLC0415

    try:
        ruleset = load_rules(settings.rules_file)
    except ConfigError as exc:
        return Finding("rules", FAIL, str(exc), "fix the file; `orgsync rules check` validates it")
    return Finding("rules", OK, f"{settings.rules_file}: {len(ruleset.rules)} rule(s), valid")


def run_doctor(environ: Mapping[str, str]) -> tuple[list[Finding], int]:
    """Every check that applies, and the exit status they call for."""
    settings, findings = check_settings(environ)
    findings.append(check_signing_secret(environ))
    if settings is None:
        return findings, EXIT_CONFIG
    database = check_database(settings)
    findings.extend(database)
    findings.append(check_broker(settings))
    findings.append(check_clerk_key(settings))
    if all(finding.result == OK for finding in database):
        try:
            with reading(settings) as session:
                findings.append(check_instance(settings, delivered_instances(session)))
        except OrgsyncError as exc:
            findings.append(Finding("instance", WARN, redact_text(str(exc)), "see the database finding"))
    findings.append(check_rules(settings))
    failed = any(finding.result == FAIL for finding in findings)
    return findings, EXIT_ATTENTION if failed else EXIT_OK


@click.command("doctor", epilog=OPS_EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as a JSON array.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check the setup: settings, database and migrations, broker, Clerk key, instance, rules.

    Each finding that is not ok comes with its fix. Secrets are never printed.
    """
    rt = runtime(ctx)
    findings, code = run_doctor(rt.environ)
    if as_json:
        click.echo(json.dumps([finding.as_dict() for finding in findings], indent=2))
    else:
        marks = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
        for finding in findings:
            click.echo(f"[{marks[finding.result]}] {finding.check}: {finding.detail}")
            if finding.fix and finding.result != OK:
                click.echo(f"       fix: {finding.fix}")
            elif finding.fix:
                click.echo(f"       hint: {finding.fix}")
    if code != EXIT_OK:
        raise click.exceptions.Exit(code)
