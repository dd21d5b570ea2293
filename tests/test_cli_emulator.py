"""``orgsync emulator``: options checked and mapped onto the emulator's config, and a real start and stop."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import TEST_SIGNING_SECRET, free_port
from helpers import assert_no_secrets
from stack import ROOT, START_BOUND_S, STOP_BOUND_S, log_tail

import emulator
from emulator import DEFAULT_SECRET_KEY, DEFAULT_SIGNING_SECRET, EmulatorConfig, Outage
from emulator.testing import Receiver
from models.settings import Settings
from orgsync.cli import cli
from orgsync.cli.base import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_USAGE, Runtime

OTHER_SECRET = "whsec_b3RoZXItc2lnbmluZy1zZWNyZXQtZm9yLXRlc3Rz"
KEY = "sk_test_cli_emulator_key"


def invoke(*args: str, environ: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(
        cli, ["emulator", *args], obj=Runtime(environ=environ or {}), catch_exceptions=False
    )


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[EmulatorConfig]:
    """Replace the server with a recorder of the config it would have been started with."""
    configs: list[EmulatorConfig] = []

    def record(config: EmulatorConfig, **_: Any) -> None:
        configs.append(config)

    monkeypatch.setattr(emulator, "run_emulator", record)
    return configs


def test_options_map_onto_the_emulator_config(started: list[EmulatorConfig]) -> None:
    result = invoke(
        "--host", "0.0.0.0", "--port", "0", "--secret-key", KEY,
        "--webhook-url", "http://127.0.0.1:8000/webhooks/clerk",
        "--webhook-url", "https://hooks.example/clerk?x=1",
        "--signing-secret", OTHER_SECRET, "--rate-limit", "0",
        "--seed-orgs", "3", "--seed-members", "7", "--seed", "42", "--announce-defaults",
        "--duplicate-rate", "0.2", "--reorder-window", "1.5", "--delay-rate", "0.1", "--max-delay", "3",
        "--drop-rate", "0.05", "--outage", "5:20", "--outage", "30:31.5", "--chaos-seed", "9",
        "--time-scale", "0.001",
    )  # fmt: skip
    assert result.exit_code == EXIT_OK, result.output
    (config,) = started
    assert (config.host, config.port, config.secret_key, config.signing_secret) == (
        "0.0.0.0",
        0,
        KEY,
        OTHER_SECRET,
    )
    assert config.webhook_urls == ("http://127.0.0.1:8000/webhooks/clerk", "https://hooks.example/clerk?x=1")
    assert (config.rate_limit, config.seed_orgs, config.seed_members, config.seed) == (0, 3, 7, 42)
    assert config.announce_defaults
    chaos = config.chaos
    assert (chaos.seed, chaos.duplicate_rate, chaos.reorder_window) == (9, 0.2, 1.5)
    assert (chaos.delay_rate, chaos.max_delay, chaos.drop_rate) == (0.1, 3.0, 0.05)
    assert chaos.outages == (Outage(5.0, 20.0), Outage(30.0, 31.5))
    assert config.time_scale == 0.001
    # Which secrets are used is said; their values never are.
    assert "secret key from --secret-key" in result.stderr
    assert "signing secret from --signing-secret" in result.stderr
    assert KEY not in result.output
    assert OTHER_SECRET.removeprefix("whsec_") not in result.output


def test_defaults(started: list[EmulatorConfig]) -> None:
    result = invoke("--seed-orgs", "2")
    assert result.exit_code == EXIT_OK, result.output
    (config,) = started
    assert (config.host, config.port, config.webhook_urls) == ("127.0.0.1", 8765, ())
    assert (config.secret_key, config.signing_secret) == (DEFAULT_SECRET_KEY, DEFAULT_SIGNING_SECRET)
    assert (config.seed_orgs, config.seed_members, config.seed) == (2, 5, None)
    assert not config.chaos.enabled
    assert "public development secret key and the public development signing secret" in result.stderr


def test_secrets_default_to_orgsyncs_own_variables(started: list[EmulatorConfig]) -> None:
    environ = {
        "CLERK_SECRET_KEY": KEY,
        "CLERK_WEBHOOK_SIGNING_SECRET": f"{TEST_SIGNING_SECRET} {OTHER_SECRET}",
    }
    result = invoke(environ=environ)
    assert result.exit_code == EXIT_OK, result.output
    (config,) = started
    # Several secrets is a rotation in progress: signing with the first satisfies orgsync.
    assert (config.secret_key, config.signing_secret) == (KEY, TEST_SIGNING_SECRET)
    assert "from CLERK_SECRET_KEY and the signing secret from CLERK_WEBHOOK_SIGNING_SECRET" in result.stderr
    assert TEST_SIGNING_SECRET.removeprefix("whsec_") not in result.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port", "70000"], "'--port'"),
        (["--port", "http"], "'--port'"),
        (["--rate-limit", "-1"], "'--rate-limit'"),
        (["--seed-orgs", "-2"], "'--seed-orgs'"),
        (["--seed-orgs", "2", "--seed-members", "0"], "'--seed-members'"),
        (["--seed", "abc"], "'--seed'"),
        (["--duplicate-rate", "1.5"], "'--duplicate-rate'"),
        (["--duplicate-rate", "nan"], "'--duplicate-rate'"),
        (["--delay-rate", "-0.1"], "'--delay-rate'"),
        (["--drop-rate", "often"], "'--drop-rate'"),
        (["--reorder-window", "-1"], "'--reorder-window'"),
        (["--max-delay", "inf"], "'--max-delay'"),
        (["--time-scale", "-0.5"], "'--time-scale'"),
        (["--outage", "5"], "'--outage'"),
        (["--outage", "20:5"], "'--outage'"),
        (["--outage", "a:b"], "'--outage'"),
        (["--chaos-seed", "1.5"], "'--chaos-seed'"),
        (["--webhook-url", "ftp://hooks.example/x"], "'--webhook-url'"),
        (["--webhook-url", "localhost:8000/webhooks"], "'--webhook-url'"),
        (["--webhook-url", "http://127.0.0.1:99999/x"], "'--webhook-url'"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_option(
    started: list[EmulatorConfig], args: list[str], named: str
) -> None:
    result = invoke(*args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert named in result.stderr
    assert "Traceback" not in result.output
    assert not started


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed-members", "3"], "--seed-members needs --seed-orgs"),
        (["--delay-rate", "0.5"], "--delay-rate needs --max-delay"),
        (["--secret-key", "pk_test_publishable"], "--secret-key must start with 'sk_'"),
        (["--secret-key", "sk_test with space"], "--secret-key must start with 'sk_'"),
        (["--signing-secret", "sk_test_notawebhooksecret"], "--signing-secret: entry 1 of 1 does not start"),
        (
            ["--signing-secret", "whsec_!!!not-base64!!!"],
            "--signing-secret: entry 1 of 1 is not valid base64",
        ),
        (["--signing-secret", "whsec_c2hvcnQ="], "--signing-secret: entry 1 of 1 is too short"),
        (["--signing-secret", f"{TEST_SIGNING_SECRET},{OTHER_SECRET}"], "--signing-secret takes exactly one"),
    ],
)
def test_inconsistent_or_malformed_values_are_named_never_shown(
    started: list[EmulatorConfig], args: list[str], message: str
) -> None:
    result = invoke(*args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stderr.startswith(f"orgsync: error: {message}")
    for secret in args[1].split(","):
        if secret.startswith(("sk_", "whsec_", "pk_")):
            assert secret not in result.output
            assert secret.removeprefix("whsec_") not in result.output
    assert not started


def test_a_malformed_variable_is_a_configuration_error(started: list[EmulatorConfig]) -> None:
    for environ, variable in (
        ({"CLERK_WEBHOOK_SIGNING_SECRET": "whsec_c2hvcnQ="}, "CLERK_WEBHOOK_SIGNING_SECRET"),
        ({"CLERK_SECRET_KEY": "pk_test_oops"}, "CLERK_SECRET_KEY"),
    ):
        result = invoke(environ=environ)
        assert result.exit_code == EXIT_CONFIG, result.output
        assert result.stderr.startswith(f"orgsync: error: {variable}")
        assert next(iter(environ.values())) not in result.output
    assert not started


def test_a_session_key_file_is_made_once_and_a_bad_one_is_refused(
    started: list[EmulatorConfig], tmp_path: Path
) -> None:
    path = tmp_path / "session-key.pem"
    assert invoke("--session-key-file", str(path)).exit_code == EXIT_OK
    assert started[-1].session_key_file == path
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    path.write_text("not a key")
    result = invoke("--session-key-file", str(path))
    assert result.exit_code == EXIT_USAGE
    assert "--session-key-file" in result.output and "does not hold" in result.output
    assert not started[1:]


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = invoke("--port", str(port))
    assert result.exit_code == EXIT_FAILED, result.output
    assert f"orgsync: error: cannot listen on 127.0.0.1:{port}: " in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_a_real_emulator_serves_delivers_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    out, err = tmp_path / "emulator.out", tmp_path / "emulator.err"
    with Receiver(OTHER_SECRET) as receiver, out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "orgsync", "emulator", "--port", str(port),
                "--secret-key", KEY, "--signing-secret", OTHER_SECRET, "--webhook-url", receiver.url,
                "--seed-orgs", "2", "--seed-members", "3", "--seed", "1",
            ],
            cwd=ROOT,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + START_BOUND_S
            listening = f"Clerk emulator listening on http://127.0.0.1:{port}"
            # The admin to sign in as comes last of the start-up lines.
            while listening not in out.read_text() or "to sign in as:" not in out.read_text():
                assert process.poll() is None, log_tail(err)
                assert time.monotonic() < deadline, f"no listening line:\n{log_tail(out)}\n{log_tail(err)}"
                time.sleep(0.1)
            assert "Seeded 2 organizations, 6 memberships" in out.read_text()
            # The public key of its session tokens, on one line that Settings takes as it is.
            (key_line,) = [x for x in out.read_text().splitlines() if x.startswith("CLERK_JWT_KEY=")]
            pem = key_line.removeprefix("CLERK_JWT_KEY=").strip("'")
            assert Settings.from_env({"CLERK_JWT_KEY": pem}).clerk_jwt_key == pem
            assert re.search(r"An admin of org_\w+ to sign in as: user_\w+", out.read_text())

            url = f"http://127.0.0.1:{port}/v1/organizations?limit=10"
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert json.loads(response.read())["total_count"] == 2
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=10)
            assert refused.value.code == 401
            refused.value.close()

            # Seeding emitted users, organizations, memberships and invitations: every one of them
            # reaches the --webhook-url signed with --signing-secret.
            while len({r.msg_id for r in receiver.accepted()}) < 2 + 2 * 3 + 2 * 3 + 2:
                assert process.poll() is None, log_tail(err)
                assert time.monotonic() < deadline, f"{len(receiver.received)} deliveries only"
                time.sleep(0.1)
            assert all(r.verified for r in receiver.received)

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=STOP_BOUND_S) == 0, log_tail(err)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "received SIGTERM; emulator stopped" in err.read_text()
    assert_no_secrets(out.read_text() + err.read_text(), KEY, OTHER_SECRET)
