"""Settings come from the environment once; bad values are named, secrets never shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_SIGNING_SECRET

from models.errors import ConfigError
from models.settings import Settings, normalize_database_url, parse_signing_secrets

OTHER = "whsec_YW5vdGhlci1zZWNyZXQtZm9yLXRoZS1yb3RhdGlvbg=="


def test_embedded_default_without_servers(tmp_path: Path) -> None:
    settings = Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path / 'orgsync.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    assert settings.embedded
    assert settings.webhook_secrets == ()
    assert settings.clerk_api_url == "https://api.clerk.com/v1"
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.rate_limit_storage == "memory://"


def test_production_urls() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgres://u:p@db/orgsync",
            "BROKER_URL": "redis://redis:6379/0",
            "CLERK_SECRET_KEY": "sk_live_abc",
            "CLERK_API_URL": "http://127.0.0.1:8765/v1/",
        }
    )
    assert settings.database_url == "postgresql+psycopg://u:p@db/orgsync"
    assert not settings.embedded
    assert settings.rate_limit == 1000
    assert settings.rate_limit_storage == "redis://redis:6379/0"
    assert settings.clerk_api_url == "http://127.0.0.1:8765/v1"
    assert normalize_database_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("separator", [" ", ",", ", ", "\n"])
def test_several_secrets_for_rotation(separator: str) -> None:
    assert parse_signing_secrets(f"{TEST_SIGNING_SECRET}{separator}{OTHER}") == (TEST_SIGNING_SECRET, OTHER)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "is not set"),
        ("   ", "is not set"),
        ("sk_test_123", "entry 1 of 1 does not start with 'whsec_'"),
        (f"{TEST_SIGNING_SECRET} whsec_***notbase64", "entry 2 of 2 is not valid base64"),
        ("whsec_c2hvcnQ=", "entry 1 of 1 is too short"),
    ],
)
def test_bad_signing_secret_is_a_clear_startup_error(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        Settings.from_env({"CLERK_WEBHOOK_SIGNING_SECRET": raw}, require_webhook_secret=True)
    for part in raw.split():
        if len(part) > 8:
            assert part not in str(caught.value)


def test_secret_required_only_where_asked() -> None:
    assert Settings.from_env({}).webhook_secrets == ()
    with pytest.raises(ConfigError, match="CLERK_WEBHOOK_SIGNING_SECRET is not set"):
        Settings.from_env({}, require_webhook_secret=True)


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings.from_env(
        {"CLERK_WEBHOOK_SIGNING_SECRET": TEST_SIGNING_SECRET, "CLERK_SECRET_KEY": "sk_test_hidden"}
    )
    assert "whsec_" not in repr(settings)
    assert "sk_test_hidden" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ORGSYNC_MAX_BODY_BYTES": "big"}, "ORGSYNC_MAX_BODY_BYTES must be a whole number"),
        ({"ORGSYNC_APPLY_BATCH_SIZE": "0"}, "ORGSYNC_APPLY_BATCH_SIZE must be at least 1"),
        ({"ORGSYNC_SWEEP_INTERVAL": "-1"}, "ORGSYNC_SWEEP_INTERVAL must be positive"),
        ({"ORGSYNC_LOG_LEVEL": "LOUD"}, "ORGSYNC_LOG_LEVEL"),
        ({"CLERK_SECRET_KEY": "pk_test_x"}, "CLERK_SECRET_KEY does not start with 'sk_'"),
        ({"CLERK_API_URL": "ftp://x"}, "CLERK_API_URL must be an http"),
        ({"ORGSYNC_DRY_RUN": "maybe"}, "ORGSYNC_DRY_RUN must be true or false"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_reconcile_share_and_interval() -> None:
    defaults = Settings.from_env({})
    assert (defaults.reconcile_share, defaults.reconcile_interval) == (0.5, 0.0)
    chosen = Settings.from_env({"ORGSYNC_RECONCILE_SHARE": "0.25", "ORGSYNC_RECONCILE_INTERVAL": "3600"})
    assert (chosen.reconcile_share, chosen.reconcile_interval) == (0.25, 3600.0)
    for bad in ("0", "1.5", "half"):
        with pytest.raises(ConfigError, match="ORGSYNC_RECONCILE_SHARE"):
            Settings.from_env({"ORGSYNC_RECONCILE_SHARE": bad})
    with pytest.raises(ConfigError, match="ORGSYNC_RECONCILE_INTERVAL"):
        Settings.from_env({"ORGSYNC_RECONCILE_INTERVAL": "-1"})


PASSWORD = "pa55word-never-shown"
BAD_URLS = [
    (
        "DATABASE_URL",
        f"postgresql://orgsync:{PASSWORD}@db:fivefourthreetwo/orgsync",
        "its port is not a number",
    ),
    (
        "DATABASE_URL",
        f"postgresql://orgsync:{PASSWORD}@[::1:5432/orgsync",
        "its IPv6 host has no closing ']'",
    ),
    ("DATABASE_URL", f"mysql://orgsync:{PASSWORD}@db/orgsync", "the unsupported scheme 'mysql'"),
    ("DATABASE_URL", f"postgresql://orgsync:{PASSWORD}@db:70000/orgsync", "its port is not a number"),
    ("DATABASE_URL", "db.example.com/orgsync", "is not a URL"),
    ("BROKER_URL", f"redis://:{PASSWORD}@redis:six/0", "its port is not a number"),
    ("BROKER_URL", f"redis://:{PASSWORD}@[::1:6379/0", "its IPv6 host has no closing ']'"),
    ("BROKER_URL", f"ftp://user:{PASSWORD}@files/queue", "the unsupported scheme 'ftp'"),
    ("BROKER_URL", f"sqla+mysql://user:{PASSWORD}@db/broker", "the unsupported scheme 'sqla+mysql'"),
    ("BROKER_URL", f"sqla+postgresql://user:{PASSWORD}@db:x/broker", "its port is not a number"),
    ("BROKER_URL", "redis.example.com:6379", "is not a URL"),
]


@pytest.mark.parametrize(("name", "url", "message"), BAD_URLS)
def test_malformed_urls_are_a_configuration_error_naming_the_setting(
    name: str, url: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: url})
    assert str(caught.value).startswith(f"{name} ")
    assert message in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    "env",
    [
        {"DATABASE_URL": "postgres://u:p@[::1]:5432/orgsync"},
        {"DATABASE_URL": "postgresql+psycopg://u:p%5B@db/orgsync"},
        {"DATABASE_URL": "sqlite:///relative.db"},
        {"BROKER_URL": "rediss://:p@[::1]:6380/0"},
        {"BROKER_URL": "redis+socket:///run/redis.sock"},
        {"BROKER_URL": "amqp://guest:guest@rabbit:5672//"},
        {"BROKER_URL": "sqla+postgresql+psycopg://u:p@db/broker"},
    ],
)
def test_well_formed_urls_are_accepted(env: dict[str, str]) -> None:
    Settings.from_env(env)


EXIT_CONFIG = 3


def run_orgsync(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The real command line, in a process of its own, with only these settings."""
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "ORGSYNC_DATA_DIR": str(tmp_path),
        "CLERK_WEBHOOK_SIGNING_SECRET": TEST_SIGNING_SECRET,
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "orgsync", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("name", "url", "message"), BAD_URLS[:3] + BAD_URLS[5:8])
def test_the_command_line_exits_with_the_configuration_code(
    name: str, url: str, message: str, tmp_path: Path
) -> None:
    result = run_orgsync(["worker"], {name: url}, tmp_path)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"orgsync: error: {name} " in result.stderr
    assert message in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args", [["run"], ["serve"], ["beat"], ["db", "upgrade"], ["sync"], ["events", "list"], ["orgs", "list"]]
)
@pytest.mark.parametrize(
    ("name", "url"),
    [("DATABASE_URL", BAD_URLS[1][1]), ("BROKER_URL", BAD_URLS[7][1])],
    ids=["database", "broker"],
)
def test_every_entry_point_refuses_a_malformed_url_before_starting(
    args: list[str], name: str, url: str, tmp_path: Path
) -> None:
    result = run_orgsync(args, {name: url}, tmp_path)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert f"orgsync: error: {name} " in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    # Nothing was started or created on the way to the error.
    assert not any(tmp_path.iterdir())


def test_the_console_cookie_key_and_clerks_secret_key_stay_apart(tmp_path: Path) -> None:
    """ORGSYNC_SECRET_KEY signs the console's cookies; it never stands in for CLERK_SECRET_KEY."""
    cookie_key = "a-console-cookie-signing-key-of-some-length"
    env = {"ORGSYNC_DATA_DIR": str(tmp_path), "ORGSYNC_SECRET_KEY": cookie_key}
    both = Settings.from_env({**env, "CLERK_SECRET_KEY": "sk_test_one"})
    assert (both.clerk_secret_key, both.secret_key) == ("sk_test_one", cookie_key)
    alone = Settings.from_env(env)
    assert (alone.clerk_secret_key, alone.secret_key) == (None, cookie_key)
