"""A benchmark run's processes and servers: PostgreSQL and Redis, orgsync and the emulator, /proc readings."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from models.db import db_schema
from models.migrate import upgrade
from models.settings import Settings
from models.tables import Base

ROOT = Path(__file__).resolve().parent.parent
# The same variables, and the same defaults, as the tests' fixtures (tests/conftest.py).
PG_ADMIN_ENV = "ORGSYNC_TEST_PG_ADMIN"
PG_ADMIN_DSN = os.environ.get(PG_ADMIN_ENV, "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_HOST_URL = os.environ.get("ORGSYNC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_HOST_URL = os.environ.get("ORGSYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379")
START_TIMEOUT_S = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- /proc readings --------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: fields start after it.
    return [stat[stat.find("(") + 1 : stat.rfind(")")], *stat[stat.rfind(")") + 2 :].split()]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[2]) == pid:
                found.append(int(entry))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (0 once it is gone)."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else (int(fields[12]) + int(fields[13])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process, its children and grandchildren (web workers and Celery pools)."""
    total = cpu_seconds(pid)
    for child in children_of(pid):
        total += cpu_seconds(child) + sum(cpu_seconds(grandchild) for grandchild in children_of(child))
    return total


def own_cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


# -- child processes -------------------------------------------------------------------------


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
        # Whatever is left of its group (web workers, pool children).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)
        self.process = None


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    try:
        yield service.start()
    finally:
        service.stop()


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


def wait_until(
    condition: Callable[[], bool], timeout: float, service: Service, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        service.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:.0f} s:\n{service.log_tail()}")
        time.sleep(interval)


EMULATOR_LISTENING = re.compile(r"Backend API: (\S+)\)")
EMULATOR_START_TIMEOUT_S = 300.0


@contextlib.contextmanager
def emulator_process(*, orgs: int, members: int, rate_limit: int, seed: int = 1) -> Iterator[tuple[str, int]]:
    """The emulator in its own process (its HTTP server must not share our GIL): (API URL, pid)."""
    command = [
        sys.executable, "-m", "orgsync", "emulator", "--port", "0", "--seed", str(seed),
        "--seed-orgs", str(orgs), "--seed-members", str(members), "--rate-limit", str(rate_limit),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Seeding 100,000 members takes a while before the server listens.
        deadline = time.monotonic() + EMULATOR_START_TIMEOUT_S
        assert process.stdout is not None
        while True:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                raise RuntimeError(f"the emulator exited with {process.returncode}")
            found = EMULATOR_LISTENING.search(line)
            if found:
                yield found.group(1), process.pid
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the emulator did not start in time")
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait()


# -- PostgreSQL and Redis --------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """A database created for one run: its name, SQLAlchemy URL and libpq DSN (None for SQLite)."""

    name: str
    url: str
    dsn: str | None


@contextlib.contextmanager
def fresh_database(
    prefix: str, *, pg_admin: str = PG_ADMIN_DSN, pg_url: str = PG_HOST_URL, kind: str = "postgres"
) -> Iterator[Database]:
    """A new, migrated database, dropped afterwards (PostgreSQL), or a SQLite file in a temporary one."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as directory:
            url = f"sqlite:///{directory}/orgsync.db"
            upgrade(url)
            yield Database(url.removeprefix("sqlite:///"), url, None)
        return
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = f"{pg_url.rstrip('/')}/{name}"
            upgrade(url)
            # Raw connections (bulk loads, probes) see orgsync's tables as its engines do.
            dsn = psycopg.conninfo.make_conninfo(
                pg_admin, dbname=name, options=f"-c search_path={db_schema()}"
            )
            yield Database(name, url, dsn)
        finally:
            with contextlib.suppress(psycopg.Error):
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pick_redis_db(base: str = REDIS_HOST_URL) -> str:
    """An empty Redis database of the server (tests pick theirs at random among 1..15)."""
    base = base.rstrip("/")
    client = redis.Redis.from_url(f"{base}/0", socket_connect_timeout=3)
    client.ping()
    for index in range(15, 0, -1):
        if redis.Redis.from_url(f"{base}/{index}").dbsize() == 0:
            return f"{base}/{index}"
    raise RuntimeError(f"no empty Redis database on {base}: pass --redis-url")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@dataclass
class Stack:
    """What orgsync's processes of one run share: database, broker, log directory, signing secret."""

    database_url: str
    pg_dsn: str
    broker_url: str
    data_dir: Path
    secret: str

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

    def web_service(self, port: int, *, workers: int, threads: int) -> Service:
        argv = [sys.executable, "-m", "orgsync", "serve", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--workers", str(workers), "--threads", str(threads)]
        return Service("orgsync-web", argv, self.process_env(), self.data_dir)

    def baseline_service(self, port: int, *, workers: int, threads: int) -> Service:
        argv = [sys.executable, str(ROOT / "bench" / "baseline_app.py"), "--port", str(port)]
        argv += ["--workers", str(workers), "--threads", str(threads)]
        return Service("baseline-web", argv, self.process_env(), self.data_dir)

    def worker_service(self, *, concurrency: int, tag: str) -> Service:
        argv = [sys.executable, "-m", "orgsync", "worker", "--concurrency", str(concurrency)]
        argv += ["--hostname", f"bench-{tag}@%h"]
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
