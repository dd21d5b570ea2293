"""``orgsync rules check|plan|apply``: validate the provisioning rules, preview them, run them on demand.

``plan`` and ``apply`` evaluate every membership of the mirror (``worker.rules``): ``plan``
writes nothing, ``apply`` records the commands (``planned`` under dry run), commits, and then
hands the pending ones to the workers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
from sqlalchemy.orm import Session

from models.clock import now_ms
from models.db import make_session_factory, session_scope
from models.errors import ConfigError, RetryableError
from models.migrate import NotMigratedError
from models.settings import Settings
from models.submission import enqueue_commands
from models.tables import RuleState
from orgsync.cli.base import (
    EPILOG,
    json_option,
    open_database,
    reading,
    report_enqueue,
    runtime,
    warn,
)
from orgsync.render import Column, render_table, to_json
from worker.rules import (
    CHANGE,
    STOP,
    Decision,
    RuleSet,
    apply_rules,
    evaluate,
    known_role_keys,
    load_rules,
    stopped_states,
)
from worker.rules_format import describe_conditions

log = logging.getLogger("orgsync")

RULE_COLUMNS: list[Column] = [
    ("#", "index"),
    ("name", "name"),
    ("mode", "mode"),
    ("role", "role"),
    ("dry run", "dry_run"),
    ("when", "when"),
]
CHANGE_COLUMNS: list[Column] = [
    ("rule", "rule"),
    ("mode", "mode"),
    ("organization", "organization"),
    ("user", "user"),
    ("current", "current_role"),
    ("desired", "desired_role"),
    ("action", "summary"),
]
APPLIED_COLUMNS: list[Column] = [
    ("command", "command_id"),
    ("status", "status"),
    *CHANGE_COLUMNS[:-1],
    ("action", "summary"),
]
STOPPED_COLUMNS: list[Column] = [
    ("rule", "rule"),
    ("organization", "organization_id"),
    ("user", "user_id"),
    ("reversals", "reversals"),
    ("stopped at", "stopped_at"),
    ("reason", "reason"),
]

file_option = click.option(
    "--file",
    "rules_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Rules file to use instead of ORGSYNC_RULES_FILE.",
)


def resolve_rules_path(settings: Settings, given: Path | None) -> Path:
    path = given or settings.rules_file
    if path is None:
        raise ConfigError("no rules file: set ORGSYNC_RULES_FILE or pass --file")
    return path


def rule_dict(ruleset: RuleSet) -> list[dict[str, Any]]:
    return [
        {
            "index": rule.index,
            "name": rule.name,
            "mode": rule.mode,
            "role": rule.role,
            "dry_run": rule.dry_run,
            "when": describe_conditions(rule.when),
        }
        for rule in ruleset.rules
    ]


def stopped_dict(state: RuleState) -> dict[str, Any]:
    return {
        "action": "stopped",
        "rule": state.rule_name,
        "organization_id": state.organization_id,
        "user_id": state.user_id,
        "membership_id": state.membership_id,
        "reversals": state.reversals,
        "stopped_at": state.stopped_at,
        "reason": state.stopped_reason,
    }


def summary(decision: Decision) -> str:
    if decision.action == CHANGE:
        return "plan only (dry run)" if decision.dry_run else "set role"
    if decision.action == STOP:
        return f"stop the rule ({decision.reversal} reversals)"
    return decision.reason


def change_dict(decision: Decision) -> dict[str, Any]:
    row = decision.to_dict()
    target = decision.target
    row["organization"] = target.organization_slug or target.organization_id
    row["user"] = target.identifier or target.user_id
    row["summary"] = summary(decision)
    return row


def emit_stopped(states: list[RuleState]) -> None:
    if states:
        click.echo("")
        click.echo(f"stopped enforcement ({len(states)}): the role kept drifting back; fix it by hand")
        click.echo(render_table(STOPPED_COLUMNS, [stopped_dict(state) for state in states]))


def load_checked(path: Path, session: Session) -> RuleSet:
    return load_rules(path, known_roles=known_role_keys(session))


@click.group(epilog=EPILOG)
def rules() -> None:
    """Provisioning rules: check the file, preview the changes, apply them.

    The file is ORGSYNC_RULES_FILE (or --file); ORGSYNC_DRY_RUN makes every rule a dry run and
    ORGSYNC_ENFORCE_MAX_REVERSALS (default 3) bounds how often an enforce rule corrects one
    membership. The worker runs the same rules after each batch of webhooks it applies.
    """


@rules.command("check", epilog=EPILOG)
@file_option
@json_option
@click.pass_context
def rules_check(ctx: click.Context, rules_file: Path | None, as_json: bool) -> None:
    """Validate the rules file and report stopped enforcement.

    Role keys are checked against the mirrored roles. Without a reachable, migrated
    database the file is still validated, with a warning that role keys were not checked.
    """
    settings = runtime(ctx).settings()
    path = resolve_rules_path(settings, rules_file)
    ruleset = load_rules(path)  # the file's own errors first, even with no database at all
    warnings: list[str] = []
    stopped: list[RuleState] = []
    roles_checked = False
    try:
        with reading(settings) as session:
            roles = known_role_keys(session)
            if roles is None:
                warnings.append("the mirror holds no roles yet: role keys not checked")
            else:
                ruleset.check_roles(roles)
                roles_checked = True
            stopped = stopped_states(session, ruleset)
    except (RetryableError, NotMigratedError) as exc:
        warnings.append(f"role keys not checked against the mirror: {exc}")
    if as_json:
        click.echo(
            to_json(
                [
                    {
                        "file": str(path),
                        "valid": True,
                        "roles_checked": roles_checked,
                        "rules": rule_dict(ruleset),
                        "stopped": [stopped_dict(state) for state in stopped],
                        "warnings": warnings,
                    }
                ]
            )
        )
        return
    for message in warnings:
        warn(message)
    click.echo(f"{path}: {len(ruleset.rules)} rule(s), valid")
    if ruleset.rules:
        click.echo(render_table(RULE_COLUMNS, rule_dict(ruleset)))
    emit_stopped(stopped)


@rules.command("plan", epilog=EPILOG)
@file_option
@json_option
@click.pass_context
def rules_plan(ctx: click.Context, rules_file: Path | None, as_json: bool) -> None:
    """Show the changes the rules would make now (changes nothing).

    Every membership of the mirror is evaluated, as `apply` would. Rows whose action is
    a refusal (the last admin-level member) or a stop (too many reversals) are changes the
    rules would not make; stopped rules are listed after them.
    """
    settings = runtime(ctx).settings()
    path = resolve_rules_path(settings, rules_file)
    with reading(settings) as session:
        ruleset = load_checked(path, session)
        decisions = evaluate(
            session,
            ruleset,
            now_ms=now_ms(),
            max_reversals=settings.enforce_max_reversals,
            dry_run_default=settings.dry_run,
            confirm_timeout_ms=int(settings.confirm_timeout * 1000),
        )
        stopped = stopped_states(session, ruleset)
    rows = [change_dict(decision) for decision in decisions]
    if as_json:
        click.echo(to_json([*rows, *(stopped_dict(state) for state in stopped)]))
        return
    click.echo(render_table(CHANGE_COLUMNS, rows, empty_message="(no changes)"))
    changes = sum(1 for decision in decisions if decision.action == CHANGE)
    if rows:
        click.echo(f"{changes} change(s) of {len(rows)} decision(s)")
    emit_stopped(stopped)


@rules.command("apply", epilog=EPILOG)
@file_option
@json_option
@click.pass_context
def rules_apply(ctx: click.Context, rules_file: Path | None, as_json: bool) -> None:
    """Run the rules over the whole mirror now and send their commands.

    Commands of dry-run rules (or with ORGSYNC_DRY_RUN) are recorded as planned, never sent.
    Refusals and stops are reported on stderr; they do not fail the command.
    """
    rt = runtime(ctx)
    settings = rt.settings()
    path = resolve_rules_path(settings, rules_file)
    with open_database(settings) as engine, session_scope(make_session_factory(engine)) as session:
        ruleset = load_checked(path, session)
        stamp = now_ms()
        report = apply_rules(
            session,
            ruleset,
            now_ms=stamp,
            max_reversals=settings.enforce_max_reversals,
            dry_run_default=settings.dry_run,
            confirm_timeout_ms=int(settings.confirm_timeout * 1000),
        )
        rows = []
        for decision, command in report.commands:
            row = change_dict(decision)
            row.update(command_id=command.id, status=command.status)
            rows.append(row)
        for decision in report.stopped:
            rows.append(dict(change_dict(decision), command_id=None, status="stopped"))
        for decision, message in report.refused:
            rows.append(dict(change_dict(decision), command_id=None, status="refused", summary=message))
    # After the commit above: a worker must find the rows when their ids arrive.
    report_enqueue(report.pending, enqueue_commands(rt.command_sender(settings), report.pending))
    if as_json:
        click.echo(to_json(rows))
        return
    click.echo(render_table(APPLIED_COLUMNS, rows, empty_message="(no changes)"))
    if report.planned:
        click.echo(
            f"orgsync: dry run: {len(report.planned)} command(s) recorded as planned, nothing sent", err=True
        )
    for decision, message in report.refused:
        warn(
            f"rule {decision.rule.name!r} for {decision.target.user_id} "
            f"in {decision.target.organization_id}: {message}"
        )
    for decision in report.stopped:
        warn(f"rule {decision.rule.name!r} stopped for {decision.target.user_id}: {decision.reason}")
