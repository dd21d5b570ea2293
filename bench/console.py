"""The console's page time on a large organization, beside the HTTP read API's for the same page.

    python bench/console.py [--quick] [--members 10000] [--database-url postgresql://...]

An organization of ``members`` memberships (10,000 by default) is written into the mirror
through ``models.mirror.apply_events``; then the real app (``orgsync.web.create_app``, with
the console and the ``/v1`` read API both on) answers, in this process through Flask's test
client, so that the time measured is the server's alone (routing, sign-in check, SQL,
rendering) without the network or the load client:

* the console's members page, 100 a page: the first page, a page in the middle, a role filter
  and a search, as an operator;
* the same 100 memberships from ``GET /v1/organizations/{id}/memberships`` (Clerk's JSON);
* the console's organizations list.

Each page is timed ``requests`` times after a warm-up, the pages taken in turns so that they
all see the same machine; the report gives p50/p99 in ms per page (and this process's CPU
time), and the console's p99 beside the read API's as a ratio. ``bench/run.py`` runs it on its
PostgreSQL database after the apply phase (the mirror then also holds that phase's 100,000
memberships); alone it creates and drops a database of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flask.testing import FlaskClient  # noqa: E402
from sqlalchemy import Engine  # noqa: E402

from bench.report import figure, latency_summary  # noqa: E402
from emulator.payloads import (  # noqa: E402
    membership_data,
    organization_data,
    role_data,
    user_public_data,
    webhook_body,
)
from models.db import create_db_engine, make_session_factory, session_scope  # noqa: E402
from models.events import parse_event  # noqa: E402
from models.mirror import apply_events  # noqa: E402
from models.settings import Settings  # noqa: E402

TARGET_CONSOLE_PAGE_MS = 100.0
ORG_ID = "org_benchconsole"
ADMIN_TOKEN = "bench-console-admin-token-0123456789"
API_TOKEN = "bench-console-api-token-0123456789"
SECRET_KEY = "bench-console-secret-key-0123456789abcdef"
PAGE = 100
BATCH = 1000


def seed_organization(engine: Engine, members: int) -> None:
    """One organization with ``members`` members (one in ten an admin), written as webhooks would."""
    start = int(time.time() * 1000) - 86_400_000
    org = organization_data(ORG_ID, name="Bench Console", slug="bench-console", max_allowed_memberships=0)
    factory = make_session_factory(engine)
    now = int(time.time() * 1000)
    setup = [("organization.created", org)] + [
        ("role.created", role_data(f"role_benchc_{key[4:]}", key, name=key[4:].title(), created_at=start))
        for key in ("org:admin", "org:member")
    ]
    with session_scope(factory) as session:
        apply_events(
            session,
            [
                parse_event(f"msg_bench_console_setup_{n}", webhook_body(kind, data, start))
                for n, (kind, data) in enumerate(setup)
            ],
            now_ms=now,
        )
    for first in range(0, members, BATCH):
        events = []
        for index in range(first, min(first + BATCH, members)):
            user_id = f"user_benchc{index:06d}"
            data = membership_data(
                f"orgmem_benchc{index:06d}",
                org,
                user_id,
                role="org:admin" if index % 10 == 0 else "org:member",
                public_user_data=user_public_data(
                    user_id,
                    first_name=f"First{index}",
                    last_name=f"Last{index}",
                    identifier=f"m{index}@bench.test",
                ),
                created_at=start + index,
            )
            body = webhook_body("organizationMembership.created", data, start + index)
            events.append(parse_event(f"msg_bench_console_{index}", body))
        with session_scope(factory) as session:
            apply_events(session, events, now_ms=now)


@dataclass(frozen=True)
class Target:
    name: str
    client: FlaskClient
    path: str
    headers: dict[str, str]

    def get(self) -> int:
        response = self.client.get(self.path, headers=self.headers)
        if response.status_code != 200:
            raise RuntimeError(f"GET {self.path} answered {response.status_code}")
        return len(response.data)


def time_interleaved(targets: Sequence[Target], count: int) -> dict[str, dict[str, Any]]:
    """``count`` timed GETs of each target after three untimed ones, taken in turns.

    In turns, so that every page sees the same machine: other work on the two CPUs comes and
    goes during a run, and timing one page after the other would charge it to whichever ran
    then. Wall time (this process and the database) and this process's CPU time are kept.
    """
    for target in targets:
        for _ in range(3):
            target.get()
    timings: dict[str, list[float]] = {target.name: [] for target in targets}
    cpu: dict[str, float] = dict.fromkeys(timings, 0.0)
    sizes: dict[str, int] = dict.fromkeys(timings, 0)
    for _ in range(count):
        for target in targets:
            began, began_cpu = time.perf_counter(), time.process_time()
            sizes[target.name] = target.get()
            timings[target.name].append((time.perf_counter() - began) * 1000)
            cpu[target.name] += time.process_time() - began_cpu
    return {
        target.name: {
            "path": target.path,
            "requests": count,
            "bytes": sizes[target.name],
            "process_cpu_ms_mean": round(cpu[target.name] * 1000 / count, 2),
            **latency_summary(sorted(timings[target.name])),
        }
        for target in targets
    }


def operator_client(app: Any) -> FlaskClient:
    client: FlaskClient = app.test_client()
    client.get("/console/login")
    with client.session_transaction("/console/") as session:
        token = session["csrf_token"]
    response = client.post("/console/login", data={"token": ADMIN_TOKEN, "csrf_token": token})
    if response.status_code != 303:
        raise RuntimeError(f"console sign-in answered {response.status_code}")
    return client


def bench_console(database_url: str, data_dir: Path, *, members: int, requests: int) -> dict[str, Any]:
    """Seed, then time the console's pages and the read API's page of the same memberships."""
    from orgsync.web import create_app, get_state

    engine = create_db_engine(database_url)
    try:
        began = time.perf_counter()
        seed_organization(engine, members)
        seed_s = time.perf_counter() - began
        settings = Settings(
            database_url=database_url,
            broker_url=f"sqla+sqlite:///{data_dir / 'broker.db'}",
            data_dir=data_dir,
            webhook_secrets=("whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",),
            api_tokens=(API_TOKEN,),
            admin_tokens=(ADMIN_TOKEN,),
            secret_key=SECRET_KEY,
        )
        app = create_app(settings, engine=engine)
        try:
            console = operator_client(app)
            api = app.test_client()
            bearer = {"Authorization": f"Bearer {API_TOKEN}"}
            middle = max(1, members // PAGE // 2)
            members_path = f"/console/organizations/{ORG_ID}/members?page_size={PAGE}"
            api_path = f"/v1/organizations/{ORG_ID}/memberships?limit={PAGE}&order_by=-created_at"
            targets = [
                Target("console_members_first", console, members_path, {}),
                Target("read_api_members_first", api, api_path, bearer),
                Target("console_members_middle", console, f"{members_path}&page={middle}", {}),
                Target("read_api_members_middle", api, f"{api_path}&offset={(middle - 1) * PAGE}", bearer),
                Target("console_members_role_filter", console, f"{members_path}&role=org:admin", {}),
                Target("console_members_search", console, f"{members_path}&q=m{members // 2}%40", {}),
                Target("console_organizations", console, "/console/organizations?page_size=100", {}),
            ]
            timed = time_interleaved(targets, requests)
        finally:
            get_state(app).close()
    finally:
        engine.dispose()
    return {"members": members, "page_size": PAGE, "requests": requests, "seed_s": round(seed_s, 2), **timed}


def console_figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The console's page p99 beside the read API's for the same 100 memberships."""
    members = result["members"]
    return [
        figure(
            "console_members_page_p99_ms",
            "ms",
            result["console_members_first"]["p99_ms"],
            result["read_api_members_first"]["p99_ms"],
            better="lower",
            target=TARGET_CONSOLE_PAGE_MS,
            detail=f"server time of the console's members page, {PAGE} of {members:,} members "
            "(baseline: GET /v1/organizations/{id}/memberships, the same page as JSON)",
        ),
        figure(
            "console_members_middle_p99_ms",
            "ms",
            result["console_members_middle"]["p99_ms"],
            result["read_api_members_middle"]["p99_ms"],
            better="lower",
            target=TARGET_CONSOLE_PAGE_MS,
            detail="the same, a page in the middle (offset paging in SQL)",
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    from bench.procs import PG_ADMIN_DSN, PG_HOST_URL, fresh_database

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 members, 20 requests a page")
    parser.add_argument("--members", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--database-url", default=None, help="an existing mirror database (not dropped)")
    args = parser.parse_args(argv)
    members = args.members or (1_000 if args.quick else 10_000)
    requests = args.requests or (20 if args.quick else 200)
    with tempfile.TemporaryDirectory(prefix="orgsync-bench-console-") as tmp:
        if args.database_url:
            result = bench_console(args.database_url, Path(tmp), members=members, requests=requests)
        else:
            with fresh_database(
                "orgsync_bench_console", pg_admin=PG_ADMIN_DSN, pg_url=PG_HOST_URL
            ) as database:
                result = bench_console(database.url, Path(tmp), members=members, requests=requests)
    print(json.dumps({"result": result, "figures": console_figures(result)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
