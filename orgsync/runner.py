"""``orgsync run``: the web server, the workers and beat as child processes, supervised together.

The children are ``python -m orgsync serve|worker --queue apply|worker --queue clerk|beat``
with the same environment, each in its own process group: a Ctrl-C in the terminal reaches
only the supervisor, which then stops every child in order, so no child sees a signal before
the supervisor knows it is shutting down. When any child dies on its own, the others are
stopped and ``run`` fails. ``orgsync worker`` supervises its two pools the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: Sequence[str]


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes]

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Supervisor:
    """Start children, wait for one to die or for a stop signal, then stop the rest."""

    specs: Sequence[ChildSpec]
    env: Mapping[str, str] | None = None
    stop_timeout: float = 30.0
    poll_interval: float = 0.2
    out: Callable[[str], None] = print
    # False: the children stay in our process group, so a signal or a kill sent to the group
    # (a service manager stopping ``orgsync worker``) reaches them all at once.
    own_groups: bool = True
    children: list[Child] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    forced: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        """Signal handler: the first signal stops gracefully, a second one kills at once."""
        if self.stopping.is_set():
            self.forced.set()
            return
        self.stop_reason = signal.Signals(signum).name
        self.stopping.set()

    def start(self) -> None:
        for spec in self.specs:
            process = subprocess.Popen(
                list(spec.argv),
                env=None if self.env is None else dict(self.env),
                process_group=0 if self.own_groups else None,
                preexec_fn=die_with_parent,  # noqa: PLW1509  (single-threaded here; see die_with_parent)
            )
            self.children.append(Child(spec, process))
            log.info("started %s (pid %d)", spec.name, process.pid)

    def dead_child(self) -> Child | None:
        for child in self.children:
            if child.process.poll() is not None:
                return child
        return None

    def wait(self, until: Callable[[], bool] | None = None) -> Child | None:
        """Block until a stop is requested, a child dies, or ``until()`` is true; returns a dead child."""
        while not self.stopping.is_set():
            dead = self.dead_child()
            if dead is not None:
                return dead
            if until is not None and until():
                return None
            self.stopping.wait(self.poll_interval)
        return None

    def stop(self) -> None:
        """SIGTERM every live child, then SIGKILL whatever outlives the timeout, grandchildren included.

        Only the leader gets SIGTERM: granian's main process and Celery's main process stop their
        own workers gracefully, which a signal to the whole group would cut short.
        """
        for child in self.children:
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + self.stop_timeout
        while any(child.process.poll() is None for child in self.children):
            if self.forced.is_set() or time.monotonic() > deadline:
                for child in self.children:
                    if child.process.poll() is None:
                        log.warning("killing %s (pid %d)", child.name, child.process.pid)
                        if self.own_groups:
                            signal_group(child.process, signal.SIGKILL)
                        else:
                            child.process.kill()
                        child.process.wait()
                break
            self.forced.wait(self.poll_interval)
        # A leader that died abruptly can leave its workers behind in its process group.
        if self.own_groups:
            for child in self.children:
                signal_group(child.process, signal.SIGKILL)

    def run(self, ready: Callable[[], bool] | None = None, on_ready: Callable[[], None] | None = None) -> int:
        """Supervise until told to stop (0) or until a child dies (1)."""
        previous = {signum: signal.signal(signum, self.request_stop) for signum in STOP_SIGNALS}
        try:
            try:
                self.start()
            except BaseException:
                self.stop()
                raise
            dead = self.wait(until=ready) if ready is not None else None
            if dead is None and not self.stopping.is_set() and on_ready is not None:
                on_ready()
            if dead is None:
                dead = self.wait()
            if dead is not None:
                code = dead.process.returncode
                self.out(
                    f"orgsync: error: {dead.name} exited with {describe_exit(code)}; stopping the others"
                )
            else:
                log.info("received %s; stopping", self.stop_reason)
            self.stop()
            return 1 if dead is not None else 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    # The group id is the leader's pid (process_group=0); it outlives the leader while members remain.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies without stopping us (SIGKILL, OOM)."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        # Best effort: without it an orphaned child keeps running until stopped by hand.
        pass


def web_ready(host: str, port: int) -> Callable[[], bool]:
    """True once the web server answers /healthz: an open port alone could belong to someone else."""

    def check() -> bool:
        connection = http.client.HTTPConnection(host, port, timeout=1.0)
        try:
            connection.request("GET", "/healthz")
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    return check


def worker_specs(*, concurrency: int | None = None, hostname: str | None = None) -> list[ChildSpec]:
    """One ``orgsync worker --queue ROLE`` per queue: applying events has processes of its own."""
    specs = []
    for role in ("apply", "clerk"):
        argv = [sys.executable, "-m", "orgsync", "worker", "--queue", role]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        if hostname:
            argv += ["--hostname", hostname]
        specs.append(ChildSpec(f"{role}-worker", argv))
    return specs


def child_specs(host: str, port: int, *, web_workers: int = 1, web_threads: int = 8) -> list[ChildSpec]:
    base = [sys.executable, "-m", "orgsync"]
    return [
        ChildSpec(
            "web",
            [
                *base,
                "serve",
                "--host",
                host,
                "--port",
                str(port),
                "--workers",
                str(web_workers),
                "--threads",
                str(web_threads),
            ],
        ),
        *worker_specs(),
        ChildSpec("beat", [*base, "beat"]),
    ]


def connect_host(host: str) -> str:
    """Where to probe a server bound to ``host``: a wildcard bind is reachable on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
