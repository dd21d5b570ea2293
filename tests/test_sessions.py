"""Clerk session tokens: verified networkless against the PEM key, as Clerk's SDKs do."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest
from conftest import examples
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from emulator.sessions import NOT_BEFORE_MARGIN, SessionIssuer
from models.errors import ConfigError
from models.sessions import (
    DEFAULT_CLOCK_SKEW_SECONDS,
    InvalidSessionTokenError,
    check_session_token,
    load_jwt_key,
    verify_session_token,
)
from models.settings import Settings

USER = "user_2abcdefghijklmnopqrstuvwxyz"
NOW = 1_760_000_000


@pytest.fixture(scope="module")
def issuer() -> SessionIssuer:
    return SessionIssuer.generate()


@pytest.fixture(scope="module")
def other_issuer() -> SessionIssuer:
    return SessionIssuer.generate()


def _settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"ORGSYNC_DATA_DIR": str(tmp_path), **env})


def test_a_token_signs_in_its_subject(issuer: SessionIssuer) -> None:
    token = issuer.mint(USER, now=NOW, org={"id": "org_2x", "rol": "admin", "slg": "acme"})
    session = check_session_token(token, load_jwt_key(issuer.public_pem()), now=NOW + 30)
    assert session.user_id == USER
    assert session.org_id == "org_2x"
    assert session.session_id is not None and session.session_id.startswith("sess_")


def test_verify_with_settings(issuer: SessionIssuer, other_issuer: SessionIssuer, tmp_path: Path) -> None:
    configured = _settings(tmp_path, CLERK_JWT_KEY=issuer.public_pem())
    assert verify_session_token(issuer.mint(USER), configured) == USER
    assert verify_session_token(other_issuer.mint(USER), configured) is None
    assert verify_session_token("not-a-token", configured) is None
    # Member sign-in is off without a key: no token signs anyone in.
    assert verify_session_token(issuer.mint(USER), _settings(tmp_path)) is None


def test_the_key_may_come_on_one_line(issuer: SessionIssuer) -> None:
    """Environment files often carry the PEM on one line, with or without literal ``\\n``."""
    pem = issuer.public_pem()
    token = issuer.mint(USER, now=NOW)
    for variant in (pem.replace("\n", "\\n"), pem.replace("\n", " "), "".join(pem.splitlines()[1:-1])):
        assert check_session_token(token, load_jwt_key(variant), now=NOW).user_id == USER


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----", "is not a PEM public key"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", "is not a PEM public key"),
        ("sk_test_123", "is not a PEM public key"),
    ],
)
def test_a_bad_key_is_a_config_error_naming_the_setting(value: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"CLERK_JWT_KEY {message}") as caught:
        _settings(tmp_path, CLERK_JWT_KEY=value)
    assert value not in str(caught.value)


def test_a_non_rsa_key_is_refused(tmp_path: Path) -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ConfigError, match="CLERK_JWT_KEY is not an RSA public key"):
        _settings(tmp_path, CLERK_JWT_KEY=pem)


def test_authorized_parties_are_origins(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CLERK_AUTHORIZED_PARTIES: entry 2 of 2"):
        _settings(tmp_path, CLERK_AUTHORIZED_PARTIES="https://a.example.com, a.example.com/path")
    parsed = _settings(tmp_path, CLERK_AUTHORIZED_PARTIES="https://a.example.com/ http://localhost:3000")
    assert parsed.clerk_authorized_parties == ("https://a.example.com", "http://localhost:3000")


def test_the_key_stays_out_of_repr(issuer: SessionIssuer, tmp_path: Path) -> None:
    configured = _settings(tmp_path, CLERK_JWT_KEY=issuer.public_pem())
    assert "BEGIN" not in repr(configured)


@pytest.mark.parametrize(
    ("offset", "valid"),
    [
        (-DEFAULT_CLOCK_SKEW_SECONDS, True),
        (0, True),
        (60, True),
        (60 + DEFAULT_CLOCK_SKEW_SECONDS - 1, True),
        (60 + DEFAULT_CLOCK_SKEW_SECONDS, False),
        (-DEFAULT_CLOCK_SKEW_SECONDS - 1, False),
    ],
)
def test_expiry_and_issue_time_allow_a_few_seconds_of_skew(
    issuer: SessionIssuer, offset: int, valid: bool
) -> None:
    token = issuer.mint(USER, now=NOW, lifetime=60)
    key = load_jwt_key(issuer.public_pem())
    if valid:
        assert check_session_token(token, key, now=NOW + offset).user_id == USER
    else:
        with pytest.raises(InvalidSessionTokenError):
            check_session_token(token, key, now=NOW + offset)


def test_not_before_is_checked(issuer: SessionIssuer) -> None:
    token = issuer.mint(USER, now=NOW, extra={"nbf": NOW + 30})
    key = load_jwt_key(issuer.public_pem())
    with pytest.raises(InvalidSessionTokenError, match="nbf"):
        check_session_token(token, key, now=NOW)
    assert check_session_token(token, key, now=NOW + 30 - NOT_BEFORE_MARGIN // 2).user_id == USER


def test_authorized_party_is_checked_when_configured(issuer: SessionIssuer) -> None:
    key = load_jwt_key(issuer.public_pem())
    ours = issuer.mint(USER, now=NOW, authorized_party="https://app.example.com")
    theirs = issuer.mint(USER, now=NOW, authorized_party="https://evil.example.com")
    none = issuer.mint(USER, now=NOW)
    parties = ("https://app.example.com",)
    assert check_session_token(ours, key, authorized_parties=parties, now=NOW).user_id == USER
    for token in (theirs, none):
        with pytest.raises(InvalidSessionTokenError, match="azp"):
            check_session_token(token, key, authorized_parties=parties, now=NOW)
    # Without a list, any party is accepted, as in Clerk's SDKs.
    assert check_session_token(theirs, key, now=NOW).user_id == USER


def test_a_pending_session_signs_no_one_in(issuer: SessionIssuer) -> None:
    token = issuer.mint(USER, now=NOW, extra={"sts": "pending"})
    with pytest.raises(InvalidSessionTokenError, match="not active"):
        check_session_token(token, load_jwt_key(issuer.public_pem()), now=NOW)


def _forge(claims: dict[str, object], alg: str = "none") -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part(claims)}."


def test_algorithm_confusion_is_refused(issuer: SessionIssuer) -> None:
    key = load_jwt_key(issuer.public_pem())
    claims = {"sub": USER, "iat": NOW, "exp": NOW + 60}
    with pytest.raises(InvalidSessionTokenError, match="RS256"):
        check_session_token(_forge(claims), key, now=NOW)
    # HS256 keyed with the public PEM: the classic confusion attack.
    hs = jwt.encode(claims, "secret-not-the-key-" * 3, algorithm="HS256")
    with pytest.raises(InvalidSessionTokenError, match="RS256"):
        check_session_token(hs, key, now=NOW)


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"iat": NOW, "exp": NOW + 60}, "'sub'"),
        ({"sub": USER, "iat": NOW}, "'exp'"),
        ({"sub": "someone", "iat": NOW, "exp": NOW + 60}, "not a Clerk user id"),
        ({"sub": USER, "iat": NOW + 600, "exp": NOW + 660}, "issued in the future"),
        ({"sub": USER, "iat": NOW, "exp": True}, "not a timestamp"),
    ],
)
def test_malformed_claims_are_refused(issuer: SessionIssuer, claims: dict[str, object], message: str) -> None:
    token = jwt.encode(claims, issuer._key, algorithm="RS256")
    with pytest.raises(InvalidSessionTokenError, match=message):
        check_session_token(token, load_jwt_key(issuer.public_pem()), now=NOW)


@hyp_settings(max_examples=examples(50))
@given(position=st.integers(min_value=0), replacement=st.sampled_from("AQgw-_"))
def test_any_changed_character_is_refused(issuer: SessionIssuer, position: int, replacement: str) -> None:
    """Whatever byte of header, claims or signature changes, the token signs no one in."""
    token = issuer.mint(USER, now=NOW)
    index = position % len(token)
    # The last character of a segment carries padding bits that decoding ignores.
    if token[index] in {".", replacement} or index + 1 == len(token) or token[index + 1] == ".":
        return
    tampered = token[:index] + replacement + token[index + 1 :]
    with pytest.raises(InvalidSessionTokenError):
        check_session_token(tampered, load_jwt_key(issuer.public_pem()), now=NOW)


def test_errors_never_quote_the_token(issuer: SessionIssuer, other_issuer: SessionIssuer) -> None:
    token = other_issuer.mint(USER)
    with pytest.raises(InvalidSessionTokenError) as caught:
        check_session_token(token, load_jwt_key(issuer.public_pem()), now=time.time())
    assert token not in str(caught.value)
    assert USER not in str(caught.value)
