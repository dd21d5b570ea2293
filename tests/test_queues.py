"""Which queue each task goes to: applying events has one of its own, Clerk work the other."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.settings import Settings
from worker.app import (
    QUEUE_APPLY,
    QUEUE_CLERK,
    TASK_APPLY,
    TASK_CONFIRM_COMMANDS,
    TASK_NOTIFY,
    TASK_PRUNE,
    TASK_RECONCILE,
    TASK_RECONCILE_ORG,
    TASK_SEND_COMMAND,
    TASK_SWEEP,
    create_celery,
)

EXPECTED = {
    TASK_APPLY: QUEUE_APPLY,
    TASK_SWEEP: QUEUE_APPLY,
    TASK_SEND_COMMAND: QUEUE_CLERK,
    TASK_CONFIRM_COMMANDS: QUEUE_CLERK,
    TASK_RECONCILE: QUEUE_CLERK,
    TASK_RECONCILE_ORG: QUEUE_CLERK,
    TASK_PRUNE: QUEUE_CLERK,
    TASK_NOTIFY: QUEUE_CLERK,
}


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/0", None])
def test_every_task_is_routed_to_its_queue(tmp_path: Path, broker: str | None) -> None:
    env = {"ORGSYNC_DATA_DIR": str(tmp_path), "ORGSYNC_RECONCILE_INTERVAL": "60"}
    if broker is not None:
        env["BROKER_URL"] = broker
    app = create_celery(Settings.from_env(env))
    orgsync_tasks = {name for name in app.tasks if name.startswith("orgsync.")}
    # A new task must be given a queue here on purpose.
    assert orgsync_tasks == set(EXPECTED)
    router = app.amqp.router
    for name, queue in EXPECTED.items():
        route = router.route({}, name, args=(), kwargs={})
        assert route["queue"].name == queue, name
    # Beat's schedule goes through the same routes: only the sweeper feeds the apply workers.
    scheduled = {entry["task"] for entry in app.conf.beat_schedule.values()}
    assert scheduled == {TASK_SWEEP, TASK_CONFIRM_COMMANDS, TASK_RECONCILE, TASK_PRUNE}
    # A worker started without -Q (celery -A worker.main worker) consumes both.
    assert {queue.name for queue in app.conf.task_queues} == {QUEUE_APPLY, QUEUE_CLERK}
