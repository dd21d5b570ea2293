"""Real orgsync processes for end-to-end tests: ``orgsync serve``, ``worker`` and ``beat`` as subprocesses.

Each process runs in a process group of its own with its output in a log file, so that a
failure message can show what the processes said and teardown can always stop everything
they started (web workers, Celery pool children), however the test ended.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import free_port
from helpers import signed_headers

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# Bounds on waiting for real processes, only to turn a hang into a failure with the logs:
# no assertion depends on how fast anything is.
START_BOUND_S = 90.0
SETTLE_BOUND_S = 180.0
STOP_BOUND_S = 30.0
# pytest's own timeout for a test that runs processes: above a start, two settles and the stops
# (90 + 2 * 180 + 3 * 30 = 540 s), so that a bounded wait above fails first, with the logs.
TEST_BOUND_S = 600.0
# The sweeper runs often in tests, so that a broker outage ends in seconds, not minutes.
FAST_SWEEPS = {"ORGSYNC_SWEEP_INTERVAL": "0.5", "ORGSYNC_SWEEP_GRACE": "0.5"}


def hermetic_env(
    *, database_url: str, broker_url: str, data_dir: Path, signing_secret: str | None = None, **extra: str
) -> dict[str, str]:
    """The caller's environment without any orgsync, Clerk, database or broker setting, plus these."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ORGSYNC_", "CLERK_", "DATABASE_", "BROKER_"))
    }
    env.update(
        DATABASE_URL=database_url,
        BROKER_URL=broker_url,
        ORGSYNC_DATA_DIR=str(data_dir),
        PYTHONUNBUFFERED="1",
    )
    if signing_secret is not None:
        env["CLERK_WEBHOOK_SIGNING_SECRET"] = signing_secret
    env.update(extra)
    return env


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:])


def stop_process(process: subprocess.Popen[bytes], *, bound: float = STOP_BOUND_S) -> None:
    """SIGTERM the leader (granian and Celery stop their own children), then SIGKILL its whole group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=bound)
    # Whatever is left in the group: children of a leader that died abruptly, or one that hung.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=bound)


def request(
    port: int,
    method: str,
    path: str,
    body: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    status, _, content = exchange(port, method, path, body, headers, timeout=timeout)
    return status, content


def exchange(
    port: int,
    method: str,
    path: str,
    body: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request; the status, the response headers (names in lower case) and the body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        content = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, content
    finally:
        connection.close()


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Stack:
    """orgsync's processes on one environment: start what a test needs, ``stop()`` ends them all."""

    env: dict[str, str]
    log_dir: Path
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/clerk"

    def spawn(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "orgsync", *args],
                cwd=ROOT,
                env=dict(env if env is not None else self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    def start_web(self, *, threads: int = 8, env: Mapping[str, str] | None = None) -> None:
        """``orgsync serve`` (granian, one worker) on the loopback port; waits for /healthz.

        On ``env`` if given (another database URL, say), else the stack's.
        """
        self.spawn(
            "web",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--threads",
            str(threads),
            env=env,
        )

        def healthy() -> bool | None:
            with suppress(OSError, http.client.HTTPException):
                if request(self.port, "GET", "/healthz", timeout=2.0)[0] == 200:
                    return True
            return None

        self.wait_for("the web server's /healthz", healthy, START_BOUND_S)

    def start_worker(
        self, *, beat: bool = False, concurrency: int = 2, env: Mapping[str, str] | None = None
    ) -> None:
        """``orgsync worker`` (and ``orgsync beat`` if asked), on ``env`` if given, else the stack's."""
        # A node name of its own: other tests' workers may share the Redis server.
        hostname = f"e2e-{uuid.uuid4().hex[:8]}@%h"
        self.spawn("worker", "worker", "--concurrency", str(concurrency), "--hostname", hostname, env=env)
        if beat:
            self.spawn("beat", "beat", env=env)

    def kill(self, name: str) -> None:
        """SIGKILL the process group of process ``name``: it and every child at once, with no
        chance to clean up. It is forgotten (its log stays), so that it can be started again."""
        proc = next(p for p in reversed(self.procs) if p.name == name)
        with suppress(ProcessLookupError):
            os.killpg(proc.process.pid, signal.SIGKILL)
        proc.process.wait(timeout=STOP_BOUND_S)
        self.procs.remove(proc)

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.process.poll() is not None:
                pytest.fail(f"{proc.name} exited with {proc.process.returncode}:\n{self.output()}")

    def wait_for(
        self, what: str, probe: Callable[[], T | None], bound: float = SETTLE_BOUND_S, *, every: float = 0.2
    ) -> T:
        """Poll ``probe`` until it returns a value; fail with every process's output if a process
        dies or ``bound`` seconds pass."""
        deadline = time.monotonic() + bound
        while True:
            self.check_alive()
            value = probe()
            if value is not None:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"gave up waiting for {what} after {bound:.0f} s:\n{self.output()}")
            time.sleep(every)

    def output(self, lines: int = 40) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path})\n{log_tail(p.log_path, lines)}" for p in self.procs)

    def post(self, body: str, secret: str, *, msg_id: str | None = None) -> int:
        """POST a Svix-signed delivery to the webhook endpoint; returns the status."""
        headers = signed_headers(secret, body, msg_id=msg_id)
        return request(self.port, "POST", "/webhooks/clerk", body, headers)[0]

    def orgsync(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One ``orgsync`` command on the stack's environment, e.g. ``members list --json``."""
        return subprocess.run(
            [sys.executable, "-m", "orgsync", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def stop(self) -> None:
        # In reverse order of start: the web server, started first, keeps answering until last.
        for proc in reversed(self.procs):
            stop_process(proc.process)


@contextmanager
def running_stack(env: dict[str, str], log_dir: Path) -> Iterator[Stack]:
    """A ``Stack`` whose processes are stopped, killed if need be, however the block ends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(env, log_dir)
    try:
        yield stack
    finally:
        stack.stop()
