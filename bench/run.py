"""orgsync's benchmark: intake, apply and freshness on PostgreSQL + Redis, each beside a baseline.

    python bench/run.py [--quick] [--out bench/results/latest.json]

Every figure is measured in the same run for orgsync and for the baseline of design.md, "a
plain handler that verifies and writes each event inside the request" (bench/baseline_app.py;
for apply, one event per transaction), and printed as a ratio beside the design target.

* intake: ``orgsync serve`` (the real app under its embedded gunicorn) and the baseline app
  under the same gunicorn settings, on free loopback ports; pre-signed ~1 KB membership events
  with unique svix ids, sent over keep-alive connections by a lean raw-socket client. First
  closed-loop (as fast as the server answers: the throughput), then paced at the target rate
  (the sustained p99, measured from each request's scheduled time so a server that falls
  behind is charged for it). The client runs on the same two cores as the servers.
* freshness: events offered at a fixed rate over HTTP with a real ``orgsync worker`` running;
  a poller reads the mirror every few milliseconds: latency = first seen - sent.
* apply: a backlog of membership events (many organizations and users; created, updated and
  deleted mixed) bulk-copied into the inbox, drained by ``worker.apply.apply_inbox`` in
  batches of ``apply_batch_size`` in this process, then by real Celery worker processes.
* memory: VmRSS (from /proc) of the web and worker processes after their load.

A fresh PostgreSQL database is created per run and dropped afterwards; the Redis database used
is flushed after the run; every process started is stopped with its process group.
"""

from __future__ import annotations

import argparse
import array
import base64
import contextlib
import cProfile
import io
import json
import multiprocessing
import os
import platform
import pstats
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from svix.webhooks import Webhook

from models.db import create_db_engine, make_session_factory, session_scope
from models.events import parse_event
from models.migrate import upgrade
from models.mirror import apply_events
from models.settings import Settings
from models.tables import Base
from worker.app import create_celery, make_sender
from worker.apply import apply_inbox

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_PATH = "/webhooks/clerk"
PG_ADMIN_DSN = os.environ.get(
    "ORGSYNC_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
PG_HOST_URL = os.environ.get("ORGSYNC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_HOST_URL = os.environ.get("ORGSYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379")
START_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.005

# design.md, "Performance targets".
TARGET_INTAKE_RATE = 1000.0
TARGET_INTAKE_P99_MS = 50.0
TARGET_APPLY_RATE = 3000.0
TARGET_FRESHNESS_P99_MS = 1000.0
TARGET_WEB_RSS_MB = 120.0
TARGET_WORKER_RSS_MB = 200.0


@dataclass(frozen=True)
class Params:
    """How much of everything a run does; ``--quick`` shrinks it to a few seconds of load."""

    intake_requests: int = 20_000
    intake_max_seconds: float = 45.0
    intake_warmup: int = 300
    paced_rate: float = TARGET_INTAKE_RATE
    paced_seconds: float = 10.0
    client_processes: int = 2
    client_threads: int = 4
    web_workers: int = 2
    web_threads: int = 8
    freshness_rate: float = 300.0
    freshness_seconds: float = 15.0
    freshness_timeout_s: float = 30.0
    # Pool size of ``orgsync worker`` (its default on two CPUs), then other sizes for freshness.
    worker_concurrency: int = 2
    freshness_other_concurrency: tuple[int, ...] = (1,)
    apply_events: int = 100_000
    apply_baseline_events: int = 5_000
    apply_celery_events: int = 100_000
    apply_timeout_s: float = 300.0
    organizations: int = 2_000
    users: int = 40_000
    seed: int = 20_240_601


QUICK = Params(
    intake_requests=400,
    intake_max_seconds=15.0,
    intake_warmup=50,
    paced_seconds=0.5,
    freshness_seconds=1.0,
    freshness_timeout_s=20.0,
    freshness_other_concurrency=(),
    apply_events=2_000,
    apply_baseline_events=200,
    apply_celery_events=1_000,
    apply_timeout_s=60.0,
    organizations=50,
    users=500,
)


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- workload: realistic organizationMembership histories ------------------------------------

ROLES = (
    ("org:member", "Member", ["org:sys_memberships:read"]),
    (
        "org:admin",
        "Admin",
        ["org:sys_memberships:read", "org:sys_memberships:manage", "org:sys_profile:manage"],
    ),
    ("org:billing", "Billing manager", ["org:sys_memberships:read", "org:sys_billing:manage"]),
)
IMAGE = "https://img.clerk.com/eyJ0eXBlIjoicHJveHkiLCJzcmMiOiJ"


def _clerk_id(prefix: str, rng: random.Random) -> str:
    return prefix + "".join(
        rng.choices("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", k=27)
    )


class Workload:
    """Membership events from one plausible history: adds, role changes, removals and re-adds.

    Many organizations and users; each removal carries the full membership with its last
    ``updated_at`` (as Clerk sends it), and a re-add gets a new ``orgmem_`` id.
    """

    def __init__(self, rng: random.Random, organizations: int, users: int, start_ms: int) -> None:
        self.rng = rng
        self.clock = start_ms
        self.orgs = [self._organization(n, start_ms) for n in range(organizations)]
        self.users = [self._user(n) for n in range(users)]
        self.live: dict[tuple[int, int], dict[str, Any]] = {}
        self.keys: list[tuple[int, int]] = []
        self.index: dict[tuple[int, int], int] = {}
        self.instance = _clerk_id("ins_", rng)

    def _organization(self, n: int, start_ms: int) -> dict[str, Any]:
        created = start_ms - 86_400_000 * (1 + n % 300)
        return {
            "object": "organization",
            "id": _clerk_id("org_", self.rng),
            "name": f"Organization {n}",
            "slug": f"organization-{n}",
            "image_url": IMAGE + "b3JnLWxvZ28ifQ",
            "has_image": n % 3 == 0,
            "max_allowed_memberships": 0,
            "admin_delete_enabled": True,
            "created_by": _clerk_id("user_", self.rng),
            "public_metadata": {"plan": ("free", "team", "enterprise")[n % 3]},
            "private_metadata": {},
            "created_at": created,
            "updated_at": created,
        }

    def _user(self, n: int) -> dict[str, Any]:
        return {
            "user_id": _clerk_id("user_", self.rng),
            "identifier": f"person.{n}@example{n % 97}.com",
            "first_name": f"First{n}",
            "last_name": f"Last{n}",
            "image_url": IMAGE + "dXNlci1hdmF0YXIifQ",
            "has_image": n % 2 == 0,
        }

    def _add(self, key: tuple[int, int]) -> None:
        self.index[key] = len(self.keys)
        self.keys.append(key)

    def _remove(self, key: tuple[int, int]) -> None:
        position = self.index.pop(key)
        last = self.keys.pop()
        if last != key:
            self.keys[position] = last
            self.index[last] = position
        del self.live[key]

    def _membership(self, key: tuple[int, int], role: int) -> dict[str, Any]:
        role_key, role_name, permissions = ROLES[role]
        return {
            "object": "organization_membership",
            "id": _clerk_id("orgmem_", self.rng),
            "role": role_key,
            "role_name": role_name,
            "permissions": permissions,
            "public_metadata": {},
            "private_metadata": {},
            "organization": self.orgs[key[0]],
            "public_user_data": self.users[key[1]],
            "created_at": self.clock,
            "updated_at": self.clock,
        }

    def next_event(self) -> tuple[str, dict[str, Any], int]:
        """(type, data, envelope timestamp in ms) of the next event of the history."""
        self.clock += self.rng.randint(1, 40)
        draw = self.rng.random()
        if self.keys and draw >= 0.55:
            key = self.keys[self.rng.randrange(len(self.keys))]
            membership = self.live[key]
            if draw < 0.85:
                role = (ROLES.index(next(r for r in ROLES if r[0] == membership["role"])) + 1) % len(ROLES)
                membership = dict(
                    membership,
                    role=ROLES[role][0],
                    role_name=ROLES[role][1],
                    permissions=ROLES[role][2],
                    updated_at=self.clock,
                )
                self.live[key] = membership
                return "organizationMembership.updated", membership, self.clock
            self._remove(key)
            return "organizationMembership.deleted", membership, self.clock
        while True:
            key = (self.rng.randrange(len(self.orgs)), self.rng.randrange(len(self.users)))
            if key not in self.live:
                break
        membership = self._membership(key, 0 if self.rng.random() < 0.8 else 1)
        self.live[key] = membership
        self._add(key)
        return "organizationMembership.created", membership, self.clock

    def body(self, event_type: str, data: dict[str, Any], timestamp_ms: int) -> str:
        return json.dumps(
            {
                "data": data,
                "event_attributes": {
                    "http_request": {
                        "client_ip": "203.0.113.7",
                        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0",
                    }
                },
                "instance_id": self.instance,
                "object": "event",
                "timestamp": timestamp_ms,
                "type": event_type,
            }
        )

    def bodies(self, count: int) -> list[str]:
        return [self.body(*self.next_event()) for _ in range(count)]

    def created_for_new_users(self, count: int, tag: str) -> tuple[list[str], list[str]]:
        """Bodies adding ``count`` brand-new users (so each one is a new mirror row), and their ids."""
        bodies, user_ids = [], []
        for n in range(count):
            self.clock += 1
            user = dict(self.users[n % len(self.users)], user_id=f"user_{tag}{n:08d}")
            org = self.orgs[n % len(self.orgs)]
            data = dict(self._membership((0, 0), 0), organization=org, public_user_data=user)
            bodies.append(self.body("organizationMembership.created", data, self.clock))
            user_ids.append(user["user_id"])
        return bodies, user_ids


class MessageIds:
    """Unique svix ids for the whole run (every phase draws from the same counter)."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:10]
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"msg_{self.tag}{self.count:017d}"


def signed_requests(secret: str, ids: MessageIds, bodies: Sequence[str], port: int) -> list[bytes]:
    """Complete HTTP/1.1 requests, signed now (Svix accepts 5 minutes of skew), ready to write."""
    webhook = Webhook(secret)
    now = datetime.now(tz=UTC)
    stamp = str(int(now.timestamp()))
    out = []
    for body in bodies:
        msg_id = ids.next()
        raw = body.encode()
        head = (
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
            f"svix-id: {msg_id}\r\nsvix-timestamp: {stamp}\r\n"
            f"svix-signature: {webhook.sign(msg_id, now, body)}\r\n\r\n"
        )
        out.append(head.encode() + raw)
    return out


# -- a lean HTTP client ---------------------------------------------------------------------


class Connection:
    """One keep-alive connection: writes prebuilt requests, reads responses by Content-Length."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reconnects = 0
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def roundtrip(self, request: bytes) -> int:
        try:
            return self._roundtrip(request)
        except (ConnectionError, TimeoutError):
            # The server closed an idle keep-alive connection; a resent delivery is at worst a
            # duplicate, which both servers acknowledge.
            self.close()
            self.reconnects += 1
            self._connect()
            return self._roundtrip(request)

    def _roundtrip(self, request: bytes) -> int:
        self.sock.sendall(request)
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._fill()
        head = self.buf[:end].decode("latin-1")
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            lowered = name.strip().lower()
            if lowered == "content-length":
                length = int(value)
            elif lowered == "connection" and value.strip().lower() == "close":
                close = True
        total = end + 4 + length
        while len(self.buf) < total:
            self._fill()
        self.buf = self.buf[total:]
        if close:
            self.close()
            self._connect()
        return status

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk


@dataclass
class LoadResult:
    """Per request (by index): status (0 = not sent), scheduled, sent and answered times in ns."""

    status: list[int]
    scheduled_ns: list[int]
    sent_ns: list[int]
    done_ns: list[int]
    start_ns: int
    reconnects: int = 0
    client_cpu_s: float = 0.0

    @property
    def completed(self) -> list[int]:
        return [i for i, status in enumerate(self.status) if status]

    def ok_count(self) -> int:
        return sum(1 for status in self.status if 200 <= status < 300)

    def rate(self) -> float:
        done = self.completed
        if not done:
            return 0.0
        elapsed = max(self.done_ns[i] for i in done) - self.start_ns
        return len(done) / (elapsed / 1e9) if elapsed > 0 else 0.0

    def latencies_ms(self, *, from_schedule: bool) -> list[float]:
        origin = self.scheduled_ns if from_schedule else self.sent_ns
        return sorted((self.done_ns[i] - origin[i]) / 1e6 for i in self.completed)


@dataclass(frozen=True)
class Plan:
    """When and where the client threads send: ``interval_ns`` 0 means closed loop."""

    port: int
    start_ns: int
    interval_ns: int
    deadline_ns: int


def _client_thread(
    plan: Plan,
    work: list[tuple[int, bytes]],
    out: dict[int, tuple[int, int, int, int]],
    reconnects: list[int],
) -> None:
    connection = Connection(plan.port)
    try:
        for position, (index, request) in enumerate(work):
            scheduled = plan.start_ns + position * plan.interval_ns
            now = time.perf_counter_ns()
            if now > plan.deadline_ns:
                break
            if scheduled > now:
                time.sleep((scheduled - now) / 1e9)
            sent = time.perf_counter_ns()
            try:
                status = connection.roundtrip(request)
            except OSError:
                status = -1
            out[index] = (status, scheduled if plan.interval_ns else sent, sent, time.perf_counter_ns())
    finally:
        reconnects.append(connection.reconnects)
        connection.close()


def _client_process(plan: Plan, work: list[list[tuple[int, bytes]]], pipe: Any) -> None:
    out: dict[int, tuple[int, int, int, int]] = {}
    reconnects: list[int] = []
    threads = [threading.Thread(target=_client_thread, args=(plan, part, out, reconnects)) for part in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    indexes = array.array("q", out.keys())
    columns = [array.array("q", (row[k] for row in out.values())) for k in range(4)]
    header = [sum(reconnects), time.process_time(), indexes.tobytes().hex()]
    pipe.send_bytes(json.dumps(header).encode())
    for column in columns:
        pipe.send_bytes(column.tobytes())
    pipe.close()


class Load:
    """Requests spread over client processes x threads, each thread on its own connection.

    ``rate`` None: closed loop, each thread sends its next request when the last is answered.
    ``rate`` set: each thread follows a fixed schedule adding up to ``rate`` requests/s.
    """

    def __init__(
        self,
        port: int,
        requests: Sequence[bytes],
        *,
        processes: int,
        threads: int,
        rate: float | None,
        max_seconds: float,
    ) -> None:
        lanes = processes * threads
        self.lanes = lanes
        self.count = len(requests)
        parts: list[list[tuple[int, bytes]]] = [[] for _ in range(lanes)]
        for index, request in enumerate(requests):
            parts[index % lanes].append((index, request))
        self.interval_ns = int(lanes * 1e9 / rate) if rate else 0
        # Time for the processes to start and connect before the first request.
        self.start_ns = time.perf_counter_ns() + 400_000_000
        deadline = self.start_ns + int(max_seconds * 1e9)
        context = multiprocessing.get_context("fork")
        self.procs = []
        self.pipes = []
        for p in range(processes):
            receiver, sender = context.Pipe(duplex=False)
            work = parts[p * threads : (p + 1) * threads]
            plan = Plan(port, self.start_ns, self.interval_ns, deadline)
            proc = context.Process(target=_client_process, args=(plan, work, sender))
            proc.start()
            sender.close()
            self.procs.append(proc)
            self.pipes.append(receiver)

    def scheduled_ns(self, index: int, lanes: int) -> int:
        return self.start_ns + (index // lanes) * self.interval_ns

    def wait(self) -> LoadResult:
        size = self.count
        result = LoadResult([0] * size, [0] * size, [0] * size, [0] * size, self.start_ns)
        try:
            for pipe in self.pipes:
                reconnects, cpu_s, hex_indexes = json.loads(pipe.recv_bytes())
                result.client_cpu_s += cpu_s
                indexes = array.array("q", bytes.fromhex(hex_indexes))
                columns = []
                for _ in range(4):
                    column = array.array("q")
                    column.frombytes(pipe.recv_bytes())
                    columns.append(column)
                result.reconnects += reconnects
                for row, index in enumerate(indexes):
                    result.status[index] = columns[0][row]
                    result.scheduled_ns[index] = columns[1][row]
                    result.sent_ns[index] = columns[2][row]
                    result.done_ns[index] = columns[3][row]
        finally:
            for proc in self.procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        return result


def run_load(
    port: int, requests: Sequence[bytes], params: Params, *, rate: float | None, max_seconds: float
) -> LoadResult:
    load = Load(
        port,
        requests,
        processes=params.client_processes,
        threads=params.client_threads,
        rate=rate,
        max_seconds=max_seconds,
    )
    return load.wait()


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    position = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return float(sorted_values[position])


def latency_summary(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50_ms": percentile(values, 0.50),
        "p90_ms": percentile(values, 0.90),
        "p99_ms": percentile(values, 0.99),
        "max_ms": percentile(values, 1.0),
    }


# -- processes ------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[2]) == pid:
                found.append(int(entry))
    return found


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: fields start after it.
    return [stat[stat.find("(") + 1 : stat.rfind(")")], *stat[stat.rfind(")") + 2 :].split()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (0 once it is gone)."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else (int(fields[12]) + int(fields[13])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process, its children and grandchildren (gunicorn and Celery pools)."""
    total = cpu_seconds(pid)
    for child in children_of(pid):
        total += cpu_seconds(child) + sum(cpu_seconds(grandchild) for grandchild in children_of(child))
    return total


def postgres_cpu_seconds() -> float:
    """CPU time of every PostgreSQL process of the machine (others' sessions included)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] == "postgres":
                total += (int(fields[12]) + int(fields[13])) / CLOCK_TICKS
    return total


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Service:
    """A child process in a session of its own, so that it is stopped with all its children."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.argv = argv
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.peak_rss: dict[str, float] = {}

    def start(self) -> Service:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def sample_rss(self) -> dict[str, float]:
        """VmRSS of the main process and of its biggest child; the peaks are kept."""
        main = rss_mb(self.pid) or 0.0
        kids = [value for value in (rss_mb(child) for child in children_of(self.pid)) if value is not None]
        sample = {"main_mb": main, "child_max_mb": max(kids, default=0.0), "total_mb": main + sum(kids)}
        for key, value in sample.items():
            self.peak_rss[key] = max(self.peak_rss.get(key, 0.0), value)
        return sample

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                progress(f"{self.name} did not stop on SIGTERM within 20 s; killing it")
        # Whatever is left of its group (gunicorn workers, pool children).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)
        self.process = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http_ok(service: Service, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        service.check_alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{service.name} not answering after {START_TIMEOUT_S:.0f} s:\n{service.log_tail()}"
            )
        time.sleep(0.1)


# -- the environment of one run -------------------------------------------------------------


@dataclass
class Env:
    database_url: str
    pg_dsn: str
    broker_url: str
    data_dir: Path
    secret: str
    params: Params
    ids: MessageIds = field(default_factory=MessageIds)

    def process_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("ORGSYNC_", "CLERK_"))}
        env.update(
            DATABASE_URL=self.database_url,
            BROKER_URL=self.broker_url,
            CLERK_WEBHOOK_SIGNING_SECRET=self.secret,
            ORGSYNC_DATA_DIR=str(self.data_dir),
            ORGSYNC_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        return env

    def settings(self) -> Settings:
        return Settings.from_env(self.process_env(), require_webhook_secret=True)

    def reset(self) -> None:
        """Empty every table and the broker's database between phases."""
        names = ", ".join(table.name for table in reversed(Base.metadata.sorted_tables))
        with psycopg.connect(self.pg_dsn, autocommit=True) as connection:
            connection.execute(f"TRUNCATE {names} RESTART IDENTITY")
            connection.execute("VACUUM ANALYZE")
        redis.Redis.from_url(self.broker_url).flushdb()

    def web(self, port: int) -> Service:
        p = self.params
        argv = [sys.executable, "-m", "orgsync", "serve", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--workers", str(p.web_workers), "--threads", str(p.web_threads)]
        return Service("orgsync-web", argv, self.process_env(), self.data_dir)

    def baseline_web(self, port: int) -> Service:
        p = self.params
        argv = [sys.executable, str(ROOT / "bench" / "baseline_app.py"), "--port", str(port)]
        argv += ["--workers", str(p.web_workers), "--threads", str(p.web_threads)]
        return Service("baseline-web", argv, self.process_env(), self.data_dir)

    def worker(self, concurrency: int | None = None) -> Service:
        argv = [
            sys.executable,
            "-m",
            "orgsync",
            "worker",
            "--concurrency",
            str(concurrency or self.params.worker_concurrency),
        ]
        argv += ["--hostname", f"bench-{self.ids.tag}@%h"]
        return Service("orgsync-worker", argv, self.process_env(), self.data_dir)

    def any_pending(self) -> bool:
        # EXISTS, not count(*): counting a 100,000-row backlog ten times a second would cost
        # PostgreSQL a noticeable share of the CPUs the drain being measured needs.
        with psycopg.connect(self.pg_dsn, autocommit=True) as connection:
            row = connection.execute(
                "SELECT EXISTS (SELECT 1 FROM inbox_events WHERE status = 'pending')"
            ).fetchone()
        return bool(row and row[0])

    def status_counts(self) -> dict[str, int]:
        with psycopg.connect(self.pg_dsn, autocommit=True) as connection:
            rows = connection.execute("SELECT status, count(*) FROM inbox_events GROUP BY status").fetchall()
        return {str(status): int(count) for status, count in rows}


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    try:
        yield service.start()
    finally:
        service.stop()


def workload(env: Env, salt: int) -> Workload:
    p = env.params
    return Workload(
        random.Random(p.seed + salt), p.organizations, p.users, time.time_ns() // 1_000_000 - 86_400_000
    )


# -- phases ---------------------------------------------------------------------------------


def measure_intake(env: Env, service: Service, port: int, label: str) -> dict[str, Any]:
    """Closed-loop throughput and latency, then latency at the target rate, on a running server."""
    p = env.params
    load = workload(env, 1)
    warm = signed_requests(env.secret, env.ids, load.bodies(p.intake_warmup), port)
    run_load(port, warm, p, rate=None, max_seconds=30)
    bodies = load.bodies(p.intake_requests)
    progress(
        f"{label}: {len(bodies)} requests, closed loop, {p.client_processes}x{p.client_threads} connections"
    )
    requests = signed_requests(env.secret, env.ids, bodies, port)
    cpu_before = (tree_cpu_seconds(service.pid), postgres_cpu_seconds())
    result = run_load(port, requests, p, rate=None, max_seconds=p.intake_max_seconds)
    service.check_alive()
    server_cpu = tree_cpu_seconds(service.pid) - cpu_before[0]
    postgres_cpu = postgres_cpu_seconds() - cpu_before[1]
    done = max(1, len(result.completed))
    wall = (
        (max(result.done_ns[i] for i in result.completed) - result.start_ns) / 1e9
        if result.completed
        else 0.0
    )
    closed_cpu = {
        "wall_s": wall,
        "server_cpu_s": server_cpu,
        "postgres_cpu_s": postgres_cpu,
        "client_cpu_s": result.client_cpu_s,
        "server_cpu_ms_per_request": 1000 * server_cpu / done,
        "postgres_cpu_ms_per_request": 1000 * postgres_cpu / done,
        "client_cpu_ms_per_request": 1000 * result.client_cpu_s / done,
    }
    closed = {
        "requests": len(bodies),
        "completed": len(result.completed),
        "ok": result.ok_count(),
        "reconnects": result.reconnects,
        "rate_per_s": result.rate(),
        **latency_summary(result.latencies_ms(from_schedule=False)),
        "cpu": closed_cpu,
    }
    progress(
        f"{label}: CPU per request: server {closed_cpu['server_cpu_ms_per_request']:.2f} ms, "
        f"PostgreSQL {closed_cpu['postgres_cpu_ms_per_request']:.2f} ms, "
        f"client {closed_cpu['client_cpu_ms_per_request']:.2f} ms"
    )
    progress(
        f"{label}: {closed['rate_per_s']:.0f}/s, p50 {closed['p50_ms']:.1f} ms, p99 {closed['p99_ms']:.1f} ms"
    )
    paced_count = max(1, int(p.paced_rate * p.paced_seconds))
    progress(f"{label}: {paced_count} requests paced at {p.paced_rate:.0f}/s")
    paced_requests = signed_requests(env.secret, env.ids, load.bodies(paced_count), port)
    # Bounded in time: a server that cannot keep up is not waited for. Requests still unanswered
    # at the end count with the time they had waited so far, so p99 is then a lower bound.
    loader = Load(
        port,
        paced_requests,
        processes=p.client_processes,
        threads=p.client_threads,
        rate=p.paced_rate,
        max_seconds=p.paced_seconds + 5,
    )
    paced = loader.wait()
    ended = time.perf_counter_ns()
    latencies = paced.latencies_ms(from_schedule=True)
    unanswered = [i for i, status in enumerate(paced.status) if not status]
    latencies += [(ended - loader.scheduled_ns(i, loader.lanes)) / 1e6 for i in unanswered]
    service.check_alive()
    paced_figures = {
        "offered_per_s": p.paced_rate,
        "requests": paced_count,
        "completed": len(paced.completed),
        "ok": paced.ok_count(),
        "unanswered": len(unanswered),
        "achieved_per_s": paced.rate(),
        **latency_summary(sorted(latencies)),
        "latencies_are_lower_bounds": bool(unanswered),
    }
    achieved, p99 = paced_figures["achieved_per_s"], paced_figures["p99_ms"]
    progress(f"{label}: paced achieved {achieved:.0f}/s, p99 {p99:.1f} ms")
    rss = service.sample_rss()
    return {"closed_loop": closed, "paced": paced_figures, "rss": rss}


def measure_freshness(env: Env, port: int, label: str, services: Sequence[Service]) -> dict[str, Any]:
    """Offer new memberships at a fixed rate over HTTP; poll the mirror for each one."""
    p = env.params
    load = workload(env, 2)
    tag = uuid.uuid4().hex[:8]
    warm_bodies, warm_users = load.created_for_new_users(50, f"w{tag}")
    run_load(port, signed_requests(env.secret, env.ids, warm_bodies, port), p, rate=None, max_seconds=30)
    wait_visible(env, warm_users, timeout=p.freshness_timeout_s, services=services)
    count = max(1, int(p.freshness_rate * p.freshness_seconds))
    bodies, users = load.created_for_new_users(count, f"f{tag}")
    requests = signed_requests(env.secret, env.ids, bodies, port)
    progress(f"{label}: freshness, {count} events at {p.freshness_rate:.0f}/s")
    # One client process: at this rate the client's cost is small, and the poller shares it.
    loader = Load(
        port, requests, processes=1, threads=2, rate=p.freshness_rate, max_seconds=p.freshness_seconds * 3 + 5
    )
    cpu_before = {service.name: tree_cpu_seconds(service.pid) for service in services}
    began = time.perf_counter()
    seen, polls = poll_mirror(
        env, loader, users, services, timeout_s=p.freshness_seconds + p.freshness_timeout_s
    )
    result = loader.wait()
    elapsed = time.perf_counter() - began
    # CPUs used by each process tree meanwhile (1.0 = one CPU busy the whole time).
    cpu_share = {
        service.name: (tree_cpu_seconds(service.pid) - cpu_before[service.name]) / elapsed
        for service in services
    }
    latencies = sorted((seen[i] - result.sent_ns[i]) / 1e6 for i in seen if result.status[i])
    missing = count - len(seen)
    figures = {
        "offered_per_s": p.freshness_rate,
        "events": count,
        "acknowledged": result.ok_count(),
        "visible": len(seen),
        "missing": missing,
        "poll_interval_ms": POLL_INTERVAL_S * 1000,
        "polls": polls,
        **latency_summary(latencies),
        # Server-side cross-check, no poller involved: when the applying transaction started.
        "inbox_handled_minus_received": handled_minus_received(env),
        "cpu_share": cpu_share,
        "ack": latency_summary(result.latencies_ms(from_schedule=False)),
    }
    if missing:
        progress(f"{label}: {missing} events never became visible within {p.freshness_timeout_s:.0f} s")
        figures["p99_ms"] = None
    progress(f"{label}: freshness p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms")
    return figures


def poll_mirror(
    env: Env, loader: Load, users: Sequence[str], services: Sequence[Service], *, timeout_s: float
) -> tuple[dict[int, int], int]:
    """First time each user's membership is visible, by index; only scheduled, unseen ones are asked.

    The poller shares the CPUs with what it measures: it waits at least four times as long as
    its last query took, so that a system falling behind is not pushed further by the poller.
    """
    lanes = loader.lanes
    count = len(users)
    seen: dict[int, int] = {}
    due: list[int] = []
    scheduled = 0
    polls = 0
    deadline = loader.start_ns + int(timeout_s * 1e9)
    with psycopg.connect(env.pg_dsn, autocommit=True) as connection:
        while len(seen) < count and time.perf_counter_ns() < deadline:
            now = time.perf_counter_ns()
            while scheduled < count and loader.scheduled_ns(scheduled, lanes) <= now:
                due.append(scheduled)
                scheduled += 1
            pause = POLL_INTERVAL_S
            if due:
                asked = [users[i] for i in due]
                began = time.perf_counter_ns()
                rows = connection.execute("SELECT user_id FROM memberships WHERE user_id = ANY(%s)", (asked,))
                found = {user_id for (user_id,) in rows.fetchall()}
                stamp = time.perf_counter_ns()
                polls += 1
                for i in due:
                    if users[i] in found:
                        seen[i] = stamp
                due = [i for i in due if i not in seen]
                pause = max(pause, 4 * (stamp - began) / 1e9)
                if polls % 50 == 0:
                    for service in services:
                        service.sample_rss()
            time.sleep(pause)
    return seen, polls


def handled_minus_received(env: Env) -> dict[str, Any]:
    """From the inbox alone: received -> start of the applying task, and how many tasks applied them.

    ``handled_at`` is the ``now_ms`` of the task that applied a row, so rows sharing one are
    (nearly always) one transaction: their count tells the average batch the worker got.
    """
    with psycopg.connect(env.pg_dsn, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT handled_at - received_at FROM inbox_events WHERE handled_at IS NOT NULL ORDER BY 1"
        ).fetchall()
        batches = connection.execute(
            "SELECT count(DISTINCT handled_at) FROM inbox_events WHERE handled_at IS NOT NULL"
        ).fetchone()
    summary: dict[str, Any] = latency_summary([float(row[0]) for row in rows])
    transactions = int(batches[0]) if batches else 0
    summary["apply_transactions"] = transactions
    summary["events_per_transaction"] = len(rows) / transactions if transactions else None
    return summary


def wait_visible(env: Env, users: Sequence[str], *, timeout: float, services: Sequence[Service]) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(env.pg_dsn, autocommit=True) as connection:
        while True:
            row = connection.execute(
                "SELECT count(*) FROM memberships WHERE user_id = ANY(%s)", (list(users),)
            ).fetchone()
            if row and row[0] >= len(users):
                return
            for service in services:
                service.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up events not visible after {timeout:.0f} s")
            time.sleep(0.05)


def bench_web(env: Env) -> dict[str, Any]:
    """Intake and freshness for orgsync (with a worker for freshness), then for the baseline."""
    out: dict[str, Any] = {}
    env.reset()
    port = free_port()
    with running(env.web(port)) as web:
        wait_http_ok(web, port)
        out["orgsync_intake"] = measure_intake(env, web, port, "orgsync intake")
        # Freshness starts from an empty inbox and queue: the intake backlog is not its business.
        env.reset()
        with running(env.worker()) as worker:
            out["orgsync_freshness"] = measure_freshness(env, port, "orgsync", [web, worker])
            worker.sample_rss()
            out["orgsync_worker_rss"] = dict(worker.peak_rss)
        # The same with other pool sizes: mirror writes are serialised, so more processes do
        # not add throughput, only transactions.
        out["orgsync_freshness_by_concurrency"] = {}
        for concurrency in env.params.freshness_other_concurrency:
            env.reset()
            with running(env.worker(concurrency)) as worker:
                label = f"orgsync, worker --concurrency {concurrency}"
                out["orgsync_freshness_by_concurrency"][str(concurrency)] = measure_freshness(
                    env, port, label, [web, worker]
                )
        out["orgsync_web_rss"] = dict(web.peak_rss)
    env.reset()
    port = free_port()
    with running(env.baseline_web(port)) as web:
        wait_http_ok(web, port)
        out["baseline_intake"] = measure_intake(env, web, port, "baseline intake")
        out["baseline_freshness"] = measure_freshness(env, port, "baseline", [web])
        out["baseline_web_rss"] = dict(web.peak_rss)
    return out


def copy_inbox(env: Env, bodies: Sequence[str]) -> list[int]:
    """Bulk-load pending inbox rows as the web process would have stored them."""
    received = time.time_ns() // 1_000_000
    with psycopg.connect(env.pg_dsn) as connection:
        with (
            connection.cursor() as cursor,
            cursor.copy(
                "COPY inbox_events (svix_id, event_type, status, attempts, body, received_at) FROM STDIN"
            ) as copy,
        ):
            for body in bodies:
                event_type = json.loads(body)["type"]
                copy.write_row((env.ids.next(), event_type, "pending", 0, body, received))
        connection.commit()
        connection.execute("ANALYZE inbox_events")
        rows = connection.execute(
            "SELECT id FROM inbox_events WHERE status = 'pending' ORDER BY id"
        ).fetchall()
    return [int(row[0]) for row in rows]


def bench_apply(env: Env, profile_path: Path | None) -> dict[str, Any]:
    p = env.params
    settings = env.settings()
    engine = create_db_engine(env.database_url)
    factory = make_session_factory(engine)
    out: dict[str, Any] = {}
    try:
        env.reset()
        load = workload(env, 3)
        bodies = load.bodies(p.apply_events)
        sizes = [len(body.encode()) for body in bodies]
        out["body_bytes_mean"] = sum(sizes) / len(sizes)
        ids = copy_inbox(env, bodies)
        progress(
            f"apply: draining {len(ids)} inbox rows with apply_inbox, batches of {settings.apply_batch_size}"
        )
        profiler = cProfile.Profile() if profile_path else None
        applied = 0
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        for start in range(0, len(ids), settings.apply_batch_size):
            report = apply_inbox(
                factory,
                ids[start : start + settings.apply_batch_size],
                now_ms=time.time_ns() // 1_000_000,
                max_attempts=settings.max_attempts,
            )
            applied += report.applied
        elapsed = time.perf_counter() - started
        if profiler and profile_path:
            profiler.disable()
            profiler.dump_stats(str(profile_path))
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
            progress(f"apply profile written to {profile_path}\n{text.getvalue()}")
        statuses = env.status_counts()
        out["orgsync"] = {
            "events": len(ids),
            "applied": applied,
            "statuses": statuses,
            "seconds": elapsed,
            "rate_per_s": applied / elapsed,
            "batch_size": settings.apply_batch_size,
        }
        progress(f"apply: {applied} events in {elapsed:.1f} s = {applied / elapsed:.0f}/s")

        env.reset()
        sample = bodies[: p.apply_baseline_events]
        progress(f"apply baseline: {len(sample)} events, one transaction each")
        started = time.perf_counter()
        for body in sample:
            event = parse_event(env.ids.next(), body)
            with session_scope(factory) as session:
                apply_events(session, [event], now_ms=time.time_ns() // 1_000_000)
        elapsed = time.perf_counter() - started
        out["baseline"] = {"events": len(sample), "seconds": elapsed, "rate_per_s": len(sample) / elapsed}
        progress(f"apply baseline: {len(sample) / elapsed:.0f}/s")
    finally:
        engine.dispose()
    out["celery"] = bench_apply_celery(env, bodies[: p.apply_celery_events], settings)
    return out


def bench_apply_celery(env: Env, bodies: Sequence[str], settings: Settings) -> dict[str, Any]:
    """The same backlog drained by a real ``orgsync worker`` (prefork) fed through Redis."""
    env.reset()
    celery = create_celery(settings)
    send = make_sender(celery)
    out: dict[str, Any] = {}
    try:
        with running(env.worker()) as worker:
            # Warm-up: the worker is consuming once this one row is applied.
            warm = copy_inbox(env, bodies[:1])
            send(warm)
            wait_until(lambda: not env.any_pending(), env.params.apply_timeout_s, worker, "worker warm-up")
            ids = copy_inbox(env, bodies)
            progress(
                f"apply via Celery: {len(ids)} rows, tasks of {settings.apply_batch_size}, "
                f"{env.params.worker_concurrency} worker processes"
            )
            started = time.perf_counter()
            for start in range(0, len(ids), settings.apply_batch_size):
                send(ids[start : start + settings.apply_batch_size])

            def drained() -> bool:
                worker.sample_rss()
                return not env.any_pending()

            wait_until(drained, env.params.apply_timeout_s, worker, "the backlog drained", interval=0.25)
            elapsed = time.perf_counter() - started
            statuses = env.status_counts()
            applied = statuses.get("applied", 0) - len(warm)
            out = {
                "events": len(ids),
                "applied": applied,
                "statuses": statuses,
                "seconds": elapsed,
                "rate_per_s": applied / elapsed,
                "worker_processes": env.params.worker_concurrency,
                "rss": dict(worker.peak_rss),
            }
            progress(f"apply via Celery: {applied} events in {elapsed:.1f} s = {applied / elapsed:.0f}/s")
    finally:
        celery.close()
    return out


def wait_until(
    condition: Callable[[], bool], timeout: float, service: Service, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        service.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:.0f} s:\n{service.log_tail()}")
        time.sleep(interval)


# -- report ---------------------------------------------------------------------------------


def figure(
    name: str,
    unit: str,
    orgsync: float | None,
    baseline: float | None,
    *,
    better: str,
    target: float | None,
    detail: str,
) -> dict[str, Any]:
    ratio = orgsync / baseline if orgsync is not None and baseline else None
    met: bool | None = None
    if target is not None and orgsync is not None:
        met = orgsync >= target if better == "higher" else orgsync <= target
    elif target is not None:
        met = False
    target_text = None if target is None else f"{'>=' if better == 'higher' else '<='} {target:g} {unit}"
    return {
        "name": name,
        "unit": unit,
        "orgsync": orgsync,
        "baseline": baseline,
        "ratio": ratio,
        "better": better,
        "target": target,
        "target_text": target_text,
        "met": met,
        "detail": detail,
    }


def build_figures(web: dict[str, Any], apply: dict[str, Any]) -> dict[str, dict[str, Any]]:
    oi, bi = web["orgsync_intake"], web["baseline_intake"]
    of, bf = web["orgsync_freshness"], web["baseline_freshness"]
    figures = [
        figure(
            "intake_rate",
            "events/s",
            oi["closed_loop"]["rate_per_s"],
            bi["closed_loop"]["rate_per_s"],
            better="higher",
            target=TARGET_INTAKE_RATE,
            detail="closed loop, signed webhooks over HTTP",
        ),
        figure(
            "intake_p50_ms",
            "ms",
            oi["closed_loop"]["p50_ms"],
            bi["closed_loop"]["p50_ms"],
            better="lower",
            target=None,
            detail="acknowledgement latency, closed loop",
        ),
        figure(
            "intake_p99_ms",
            "ms",
            oi["closed_loop"]["p99_ms"],
            bi["closed_loop"]["p99_ms"],
            better="lower",
            target=None,
            detail="acknowledgement latency, closed loop (at saturation)",
        ),
        figure(
            "intake_paced_rate",
            "events/s",
            oi["paced"]["achieved_per_s"],
            bi["paced"]["achieved_per_s"],
            better="higher",
            target=None,
            detail=f"achieved when offered {oi['paced']['offered_per_s']:g}/s",
        ),
        figure(
            "intake_paced_p99_ms",
            "ms",
            oi["paced"]["p99_ms"],
            bi["paced"]["p99_ms"],
            better="lower",
            target=TARGET_INTAKE_P99_MS,
            detail=f"acknowledgement p99 at {oi['paced']['offered_per_s']:g}/s offered, from scheduled send",
        ),
        figure(
            "apply_rate",
            "events/s",
            apply["orgsync"]["rate_per_s"],
            apply["baseline"]["rate_per_s"],
            better="higher",
            target=TARGET_APPLY_RATE,
            detail=f"{apply['orgsync']['events']} event backlog, apply_inbox in-process; "
            f"baseline one transaction per event on {apply['baseline']['events']}",
        ),
        figure(
            "apply_celery_rate",
            "events/s",
            apply["celery"]["rate_per_s"],
            apply["baseline"]["rate_per_s"],
            better="higher",
            target=TARGET_APPLY_RATE,
            detail=f"{apply['celery']['events']} event backlog, {apply['celery']['worker_processes']} Celery "
            "worker processes fed through Redis",
        ),
        figure(
            "freshness_p50_ms",
            "ms",
            of["p50_ms"],
            bf["p50_ms"],
            better="lower",
            target=None,
            detail=f"receive -> visible in the mirror at {of['offered_per_s']:g}/s offered",
        ),
        figure(
            "freshness_p99_ms",
            "ms",
            of["p99_ms"],
            bf["p99_ms"],
            better="lower",
            target=TARGET_FRESHNESS_P99_MS,
            detail=f"receive -> visible in the mirror at {of['offered_per_s']:g}/s offered",
        ),
        figure(
            "web_rss_mb",
            "MB",
            web["orgsync_web_rss"].get("child_max_mb"),
            web["baseline_web_rss"].get("child_max_mb"),
            better="lower",
            target=TARGET_WEB_RSS_MB,
            detail="peak VmRSS of one gunicorn worker process",
        ),
        figure(
            "worker_rss_mb",
            "MB",
            max(
                web["orgsync_worker_rss"].get("child_max_mb", 0.0),
                apply["celery"]["rss"].get("child_max_mb", 0.0),
            ),
            None,
            better="lower",
            target=TARGET_WORKER_RSS_MB,
            detail="peak VmRSS of one Celery pool process (the baseline has no worker)",
        ),
    ]
    return {entry["name"]: entry for entry in figures}


def render_table(figures: dict[str, dict[str, Any]]) -> str:
    def number(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"

    header = ("figure", "orgsync", "baseline", "ratio", "design target", "met?")
    rows = [header]
    for entry in figures.values():
        ratio = entry["ratio"]
        met = entry["met"]
        rows.append(
            (
                f"{entry['name']} ({entry['unit']})",
                number(entry["orgsync"]),
                number(entry["baseline"]),
                "-" if ratio is None else f"{ratio:.2f}x",
                entry["target_text"] or "-",
                "-" if met is None else ("yes" if met else "NO"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
            )
        )
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def machine_info(dsn: str, broker_url: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        version = connection.execute("SHOW server_version").fetchone()
        sync = connection.execute("SHOW synchronous_commit").fetchone()
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres_version": version[0] if version else None,
        "postgres_synchronous_commit": sync[0] if sync else None,
        "redis_version": redis.Redis.from_url(broker_url).info("server").get("redis_version"),
        "load_average_at_start": list(os.getloadavg()),
        "note": "load client, poller, servers, PostgreSQL and Redis all share these CPUs; other "
        "work on the machine (a test suite running meanwhile) lowers every figure",
    }


# -- set-up and tear-down of one run ---------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def pick_redis_db(base: str) -> str:
    """An empty Redis database of the server (tests pick theirs at random among 1..15)."""
    base = base.rstrip("/")
    client = redis.Redis.from_url(f"{base}/0", socket_connect_timeout=3)
    client.ping()
    for index in range(15, 0, -1):
        if redis.Redis.from_url(f"{base}/{index}").dbsize() == 0:
            return f"{base}/{index}"
    raise RuntimeError(f"no empty Redis database on {base}: pass --redis-url")


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run of a few seconds (the smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--pg-admin", default=PG_ADMIN_DSN, help="libpq DSN of a database to create the run's in"
    )
    parser.add_argument(
        "--pg-url", default=PG_HOST_URL, help="SQLAlchemy URL of the server, without database"
    )
    parser.add_argument(
        "--redis-url", default=None, help="Redis database to use (flushed); default: an empty one"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="cProfile the in-process apply into this file"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (printed path)")
    args = parser.parse_args(argv)
    # SIGTERM (a test's timeout, a CI cancel) must still run the clean-up below.
    signal.signal(signal.SIGTERM, _terminate)
    params = QUICK if args.quick else Params()
    began = time.time()

    name = f"orgsync_bench_{uuid.uuid4().hex[:12]}"
    data_dir = Path(tempfile.mkdtemp(prefix="orgsync-bench-"))
    broker_url = args.redis_url or pick_redis_db(REDIS_HOST_URL)
    admin = psycopg.connect(args.pg_admin, autocommit=True, connect_timeout=5)
    created = False
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        created = True
        database_url = f"{args.pg_url.rstrip('/')}/{name}"
        pg_dsn = psycopg.conninfo.make_conninfo(args.pg_admin, dbname=name)
        progress(f"database {name}, broker {broker_url}, logs in {data_dir}")
        upgrade(database_url)
        env = Env(database_url, pg_dsn, broker_url, data_dir, new_secret(), params)
        machine = machine_info(pg_dsn, broker_url)
        web = bench_web(env)
        apply = bench_apply(env, args.profile)
        figures = build_figures(web, apply)
        result = {
            "started_at": datetime.fromtimestamp(began, tz=UTC).isoformat(),
            "duration_s": time.time() - began,
            "quick": args.quick,
            "machine": machine,
            "parameters": {
                **asdict(params),
                "apply_batch_size": env.settings().apply_batch_size,
                "body_bytes_mean": apply["body_bytes_mean"],
                "client": "raw-socket HTTP/1.1 keep-alive client in "
                f"{params.client_processes} processes x {params.client_threads} threads, on the same machine",
                "server": f"gunicorn gthread, {params.web_workers} workers x {params.web_threads} threads, "
                "for orgsync and the baseline alike",
            },
            "figures": figures,
            "raw": {"web": web, "apply": {key: value for key, value in apply.items()}},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(render_table(figures))
        print(
            f"\n{machine['nproc']} CPUs shared by the load client, the servers, PostgreSQL and Redis; "
            f"load average at start {', '.join(f'{v:.2f}' for v in machine['load_average_at_start'])}. "
            f"JSON: {args.out}"
        )
        return 0
    finally:
        if created:
            with contextlib.suppress(psycopg.Error):
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(broker_url).flushdb()
        if args.keep_logs:
            progress(f"logs kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
