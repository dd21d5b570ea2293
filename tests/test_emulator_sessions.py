"""The emulator opens sessions and signs their tokens as Clerk does; orgsync verifies them."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from clerk_backend_api import Clerk
from clerk_backend_api.models import ClerkBaseError
from clerk_backend_api.utils.retries import BackoffStrategy, RetryConfig
from click.testing import CliRunner

from emulator import Emulator, EmulatorConfig
from emulator.sessions import SessionIssuer
from models.sessions import check_session_token, load_jwt_key, verify_session_token
from models.settings import Settings
from orgsync.cli import cli
from orgsync.cli.base import EXIT_FAILED, EXIT_OK, Runtime

SECRET_KEY = "sk_test_emulator_sessions"
NO_RETRIES = RetryConfig("none", BackoffStrategy(1, 1, 1.0, 1), retry_connection_errors=False)


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    emulator = Emulator(EmulatorConfig(port=0, secret_key=SECRET_KEY, rate_limit=0)).start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def people(emu: Emulator) -> dict[str, str]:
    """An organization with an admin, and a user outside it."""
    admin = emu.state.create_user(email_address="ada@example.com", first_name="Ada")["id"]
    outsider = emu.state.create_user(email_address="olga@example.com")["id"]
    org = emu.state.create_organization(name="Acme", slug="acme", created_by=admin)["id"]
    return {"admin": admin, "outsider": outsider, "org": org}


def _clerk(emu: Emulator) -> Clerk:
    return Clerk(bearer_auth=SECRET_KEY, server_url=emu.api_url, retry_config=NO_RETRIES)


def _settings(emu: Emulator, tmp_path: Path) -> Settings:
    return Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path), "CLERK_JWT_KEY": emu.sessions.public_pem()})


def test_a_session_token_from_the_sdk_verifies(emu: Emulator, people: dict[str, str], tmp_path: Path) -> None:
    clerk = _clerk(emu)
    session = clerk.sessions.create(request={"user_id": people["admin"], "active_organization_id": "acme"})
    assert session.status == "active" and session.user_id == people["admin"]
    token = clerk.sessions.create_token(session_id=session.id, expires_in_seconds=120).jwt
    assert token is not None
    assert verify_session_token(token, _settings(emu, tmp_path)) == people["admin"]
    verified = check_session_token(token, load_jwt_key(emu.sessions.public_pem()))
    assert verified.session_id == session.id
    assert verified.org_id == people["org"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["o"] == {"id": people["org"], "slg": "acme", "rol": "admin"}
    assert claims["exp"] - claims["iat"] == 120


def test_the_jwks_holds_the_same_key(emu: Emulator, people: dict[str, str]) -> None:
    jwks: dict[str, Any] = _clerk(emu).jwks.get_jwks().model_dump(by_alias=True)
    token = emu.sessions.mint(people["admin"])
    (key,) = jwks["keys"]
    assert key["kid"] == jwt.get_unverified_header(token)["kid"]
    public = jwt.PyJWK({k: v for k, v in key.items() if v is not None}).key
    assert jwt.decode(token, public, algorithms=["RS256"])["sub"] == people["admin"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"user_id": "user_2nobody"}, 404, "resource_not_found"),
        ({"user_id": "user_2nobody", "active_organization_id": "acme"}, 404, "resource_not_found"),
        ({"user_id": "outsider", "active_organization_id": "acme"}, 404, "resource_not_found"),
    ],
)
def test_a_session_for_no_one_is_refused(
    emu: Emulator, people: dict[str, str], body: dict[str, str], status: int, code: str
) -> None:
    if body.get("user_id") == "outsider":
        body = {**body, "user_id": people["outsider"]}
    with pytest.raises(ClerkBaseError) as caught:
        _clerk(emu).sessions.create(request=body)  # type: ignore[arg-type]
    assert caught.value.status_code == status
    assert code in caught.value.body


@pytest.mark.parametrize(("session_id", "lifetime", "status"), [("sess_2unknown", 60, 404), ("", 29, 422)])
def test_a_token_for_no_session_or_a_bad_lifetime_is_refused(
    emu: Emulator, people: dict[str, str], session_id: str, lifetime: int, status: int
) -> None:
    clerk = _clerk(emu)
    session_id = session_id or clerk.sessions.create(request={"user_id": people["admin"]}).id
    with pytest.raises(ClerkBaseError) as caught:
        clerk.sessions.create_token(session_id=session_id, expires_in_seconds=lifetime)
    assert caught.value.status_code == status


def test_the_key_file_keeps_the_key_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "session.pem"
    first = SessionIssuer(key_file=path).public_pem()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SessionIssuer(key_file=path).public_pem() == first
    path.write_text("not a key")
    with pytest.raises(ValueError, match="does not hold"):
        SessionIssuer(key_file=path).public_pem()


def test_the_command_line_prints_a_token_that_signs_in(
    emu: Emulator, people: dict[str, str], tmp_path: Path
) -> None:
    environ = {
        "ORGSYNC_DATA_DIR": str(tmp_path),
        "CLERK_API_URL": emu.api_url,
        "CLERK_SECRET_KEY": SECRET_KEY,
    }

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, ["session-token", *args], obj=Runtime(environ=environ))

    result = run(people["admin"], "--org", people["org"])
    assert result.exit_code == EXIT_OK, result.output
    token = result.output.strip()
    assert verify_session_token(token, _settings(emu, tmp_path)) == people["admin"]

    refused = run(people["outsider"], "--org", people["org"])
    assert refused.exit_code == EXIT_FAILED
    assert "Clerk refused the session (404)" in refused.output
    assert "No organization membership was found" in refused.output
