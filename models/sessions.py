"""Clerk session tokens, verified without a network call, as Clerk's SDKs do with ``jwtKey``.

A member of the application signs in to the console with the session Clerk's frontend gave
them: a short-lived RS256 JWT (about a minute), carried in the ``__session`` cookie on the
application's own origin or in an ``Authorization: Bearer`` header. Clerk signs it with the
instance's private key; the instance's public key (Dashboard > API keys > JWT public key, the
PEM that Clerk's SDKs read from ``CLERK_JWT_KEY``) is enough to check it here, so no request
to Clerk is made per page.

The checks are those of Clerk's ``verifyToken``: the signature with RS256 only (never the
algorithm the token names, never ``none``), ``exp`` and ``nbf`` with a few seconds of clock
skew, an ``iat`` not in the future, ``azp`` among the authorized parties when they are
configured (a session cookie that leaked to another subdomain must not sign anyone in), and,
for version 2 claims, a session whose status (``sts``) is ``active`` rather than ``pending``.

Verification failures are ``InvalidSessionTokenError`` with a reason fit for a log line; the
reason never quotes the token or a claim's value other than times.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_der_public_key

from models.errors import ConfigError, PermanentError

if TYPE_CHECKING:
    from models.settings import Settings

# Clerk's SDKs allow five seconds of skew between Clerk's clock and the verifier's.
DEFAULT_CLOCK_SKEW_SECONDS = 5
# The only algorithm Clerk signs session tokens with.
ALGORITHM = "RS256"
_PEM_LINE = re.compile(r"-----(BEGIN|END) [A-Z ]+-----")
_USER_ID = re.compile(r"user_[A-Za-z0-9]+")


class InvalidSessionTokenError(PermanentError):
    """A session token that does not sign anyone in; the message says why, never the token."""


@dataclass(frozen=True)
class Session:
    """What a verified session token says about who is signed in."""

    user_id: str
    session_id: str | None
    # The active organization of the session, when the user has chosen one (``o.id``/``org_id``).
    org_id: str | None
    expires_at: int


@functools.lru_cache(maxsize=4)
def load_jwt_key(raw: str, name: str = "CLERK_JWT_KEY") -> RSAPublicKey:
    """Read the instance's PEM public key; a ``ConfigError`` naming ``name`` if it is not one.

    Like Clerk's SDKs, the header lines and line breaks are optional (an environment variable
    often carries the PEM on one line, sometimes with literal ``\\n``), so only the base64 body
    of the DER SubjectPublicKeyInfo matters.
    """
    body = _PEM_LINE.sub("", raw.replace("\\n", "\n"))
    body = re.sub(r"\s+", "", body)
    if not body:
        raise ConfigError(f"{name} is empty: paste the PEM public key from Clerk's Dashboard (API keys)")
    try:
        der = base64.b64decode(body, validate=True)
        key = load_der_public_key(der)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{name} is not a PEM public key (-----BEGIN PUBLIC KEY----- ...): copy the "
            "'PEM public key' of the instance from Clerk's Dashboard (API keys)"
        ) from None
    if not isinstance(key, RSAPublicKey):
        raise ConfigError(f"{name} is not an RSA public key: Clerk signs session tokens with RS256")
    return key


def parse_authorized_parties(raw: str, name: str = "CLERK_AUTHORIZED_PARTIES") -> tuple[str, ...]:
    """Split a list of origins (``https://app.example.com``); each must be a bare origin."""
    entries = tuple(part.rstrip("/") for part in re.split(r"[\s,]+", raw.strip()) if part)
    for position, origin in enumerate(entries, start=1):
        if not re.fullmatch(r"https?://[^/?#\s]+", origin):
            raise ConfigError(
                f"{name}: entry {position} of {len(entries)} is not an origin such as "
                f"https://app.example.com, got {origin!r}"
            )
    return entries


def check_session_token(
    token: str,
    key: RSAPublicKey,
    *,
    authorized_parties: Iterable[str] = (),
    clock_skew: int = DEFAULT_CLOCK_SKEW_SECONDS,
    now: float | None = None,
) -> Session:
    """Verify ``token`` against ``key``; the ``Session`` it proves, or ``InvalidSessionTokenError``."""
    if not token or len(token) > 16_384:
        raise InvalidSessionTokenError("the session token is empty or too long")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError:
        raise InvalidSessionTokenError("the session token is not a JWT") from None
    if header.get("alg") != ALGORITHM:
        raise InvalidSessionTokenError(f"the session token is not signed with {ALGORITHM}")
    moment = time.time() if now is None else now
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            # Times are checked below against ``moment`` so that tests can pin the clock.
            options={
                "require": ["sub", "exp", "iat"],
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise InvalidSessionTokenError("the session token's signature does not verify") from None
    except jwt.MissingRequiredClaimError as error:
        raise InvalidSessionTokenError(f"the session token has no {error.claim!r} claim") from None
    except jwt.InvalidTokenError:
        raise InvalidSessionTokenError("the session token is malformed") from None
    expires_at = _time_claim(claims, "exp")
    issued_at = _time_claim(claims, "iat")
    if expires_at + clock_skew <= moment:
        raise InvalidSessionTokenError(f"the session token expired at {expires_at}")
    if "nbf" in claims and _time_claim(claims, "nbf") - clock_skew > moment:
        raise InvalidSessionTokenError("the session token is not valid yet (nbf)")
    if issued_at - clock_skew > moment:
        raise InvalidSessionTokenError("the session token was issued in the future (iat)")
    parties = tuple(authorized_parties)
    azp = claims.get("azp")
    if parties and azp not in parties:
        # Clerk omits azp when the browser sent no Origin; with a list configured, that is refused.
        raise InvalidSessionTokenError("the session token's authorized party (azp) is not allowed")
    # Version 2 claims: a pending session (a required task not done yet) is signed out.
    status = claims.get("sts")
    if status is not None and status != "active":
        raise InvalidSessionTokenError("the session is not active (sts)")
    subject = claims["sub"]
    if not isinstance(subject, str) or not _USER_ID.fullmatch(subject):
        raise InvalidSessionTokenError("the session token's subject is not a Clerk user id")
    session_id = claims.get("sid")
    return Session(
        user_id=subject,
        session_id=session_id if isinstance(session_id, str) else None,
        org_id=_active_org(claims),
        expires_at=expires_at,
    )


def verify_session_token(token: str, settings: Settings) -> str | None:
    """The Clerk user id a session token signs in, or None when it signs no one in.

    None also when ``CLERK_JWT_KEY`` is not configured: member sign-in is then off.
    """
    if settings.clerk_jwt_key is None:
        return None
    try:
        session = check_session_token(
            token,
            load_jwt_key(settings.clerk_jwt_key),
            authorized_parties=settings.clerk_authorized_parties,
        )
    except InvalidSessionTokenError:
        return None
    return session.user_id


def _time_claim(claims: dict[str, Any], name: str) -> int:
    value = claims[name]
    # bool is an int in Python; a JSON true is no timestamp.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSessionTokenError(f"the session token's {name!r} claim is not a timestamp")
    return int(value)


def _active_org(claims: dict[str, Any]) -> str | None:
    """The active organization: ``o.id`` in version 2 claims, ``org_id`` in version 1."""
    compact = claims.get("o")
    if isinstance(compact, dict) and isinstance(compact.get("id"), str):
        return str(compact["id"])
    org_id = claims.get("org_id")
    return org_id if isinstance(org_id, str) else None
