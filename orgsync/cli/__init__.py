"""The ``orgsync`` command line: the composition root for every process orgsync runs.

``base`` holds what every command shares and imports none of the modules beside it; each
feature module imports only ``base``; this module composes them into one command group.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from orgsync.cli import commands, emulate, mirror, notifications, ops, processes, rules, sync
from orgsync.cli.base import EPILOG, OrgsyncGroup, invitations, members, runtime


@click.group(cls=OrgsyncGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orgsync", prog_name="orgsync")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """A local mirror of a Clerk instance's organizations, memberships, invitations and roles."""
    runtime(ctx)


for command in (
    processes.run,
    processes.serve,
    processes.worker,
    processes.beat,
    processes.db,
    emulate.emulator,
    emulate.session_token,
    mirror.orgs,
    members,
    invitations,
    mirror.roles,
    mirror.events,
    commands.commands,
    rules.rules,
    sync.sync,
    notifications.notifications_group,
    ops.prune_command,
    ops.status,
    ops.doctor,
):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> None:
    """Console script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="orgsync")


__all__ = ["cli", "main"]
