"""Sessions and session tokens for the emulator's users, signed like Clerk's.

Clerk's frontend hands a signed-in user a short-lived RS256 JWT (the ``__session`` cookie),
signed with the instance's private key; applications verify it with the public half, which
Clerk shows as a PEM (``CLERK_JWT_KEY``) and serves as a JWKS at ``GET /v1/jwks``. For tests,
Clerk's Backend API also opens a session for a user (``POST /v1/sessions``, development
instances only) and signs a token for it (``POST /v1/sessions/{id}/tokens``).

The emulator has no frontend, so those two endpoints are how its users get a token:
``SessionIssuer`` holds the key pair (generated, or read from a PEM file so that the public
key, and with it ``CLERK_JWT_KEY``, survives restarts), the sessions it opened, and signs
tokens with Clerk's version 2 claims (``sub``, ``sid``, ``azp``, ``iss``, ``iat``/``nbf``/``exp``,
``v``, ``sts``, and ``o`` for the session's active organization).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# Clerk's session tokens live sixty seconds, refreshed by its frontend every fifty; a person
# pasting an emulator token into the console has no frontend to refresh it, so it lives longer.
DEFAULT_TOKEN_LIFETIME = 3600
# Clerk's bounds on expires_in_seconds for POST /sessions/{id}/tokens.
MIN_TOKEN_LIFETIME = 30
MAX_TOKEN_LIFETIME = 315_360_000
# Clerk sets nbf a few seconds before iat to absorb clock skew.
NOT_BEFORE_MARGIN = 10
ISSUER = "https://orgsync-emulator.clerk.accounts.dev"
_DAY_MS = 86_400_000


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _load_or_create(path: Path) -> rsa.RSAPrivateKey:
    """The private key in ``path``, written there first (mode 600) if the file does not exist."""
    if not path.exists():
        key = _new_key()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
        return key
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path} does not hold an unencrypted PEM private key") from None
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ValueError(f"{path} does not hold an RSA private key")
    return loaded


@dataclass(frozen=True)
class EmulatedSession:
    """A session as ``POST /v1/sessions`` opens it: active until the emulator stops."""

    id: str
    client_id: str
    user_id: str
    org: dict[str, Any] | None
    created_at: int

    def body(self) -> dict[str, Any]:
        """Clerk's Session object, with the fields a client reads."""
        return {
            "object": "session",
            "id": self.id,
            "client_id": self.client_id,
            "user_id": self.user_id,
            "status": "active",
            "last_active_organization_id": self.org["id"] if self.org else None,
            "actor": None,
            "last_active_at": self.created_at,
            "expire_at": self.created_at + 7 * _DAY_MS,
            "abandon_at": self.created_at + 30 * _DAY_MS,
            "created_at": self.created_at,
            "updated_at": self.created_at,
        }


class SessionIssuer:
    """An RS256 key pair, the sessions opened with it, and the tokens it signs for them.

    The key is made (or read) on first use: every ``Emulator`` has an issuer and most never
    sign anything, while generating a 2048-bit key takes a noticeable moment.
    """

    def __init__(self, private_key: rsa.RSAPrivateKey | None = None, *, key_file: Path | None = None) -> None:
        self._key_value = private_key
        self._key_file = key_file
        self._lock = threading.Lock()
        self._sessions: dict[str, EmulatedSession] = {}

    @classmethod
    def generate(cls) -> SessionIssuer:
        return cls(_new_key())

    @property
    def _key(self) -> rsa.RSAPrivateKey:
        with self._lock:
            if self._key_value is None:
                self._key_value = _load_or_create(self._key_file) if self._key_file else _new_key()
            return self._key_value

    @property
    def key_id(self) -> str:
        # Clerk names its key after the instance; a digest of the key keeps the id stable per key.
        modulus = self._key.public_key().public_numbers().n
        return "ins_" + hashlib.sha256(str(modulus).encode()).hexdigest()[:27]

    def public_pem(self) -> str:
        """The public key as Clerk's Dashboard shows it: what ``CLERK_JWT_KEY`` is set to."""
        return (
            self._key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
        )

    def jwks(self) -> dict[str, Any]:
        """The body of ``GET /v1/jwks``."""
        numbers = self._key.public_key().public_numbers()
        key = {
            "use": "sig",
            "kty": "RSA",
            "kid": self.key_id,
            "alg": "RS256",
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }
        return {"keys": [key]}

    def open_session(self, user_id: str, org: dict[str, Any] | None = None) -> EmulatedSession:
        """A new active session for ``user_id``; ``org`` is the ``o`` claim of its active organization."""
        session = EmulatedSession(
            id="sess_2" + secrets.token_hex(13),
            client_id="client_2" + secrets.token_hex(13),
            user_id=user_id,
            org=dict(org) if org else None,
            created_at=int(time.time() * 1000),
        )
        with self._lock:
            self._sessions[session.id] = session
        return session

    def session(self, session_id: str) -> EmulatedSession | None:
        with self._lock:
            return self._sessions.get(session_id)

    def token_for(self, session: EmulatedSession, *, lifetime: int = DEFAULT_TOKEN_LIFETIME) -> str:
        """A session token for an open session."""
        return self.mint(session.user_id, lifetime=lifetime, org=session.org, session_id=session.id)

    def mint(
        self,
        user_id: str,
        *,
        lifetime: int = DEFAULT_TOKEN_LIFETIME,
        authorized_party: str | None = None,
        org: dict[str, Any] | None = None,
        now: float | None = None,
        session_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A token for ``user_id`` whatever sessions are open: tests use it to forge edge cases."""
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "sub": user_id,
            "sid": session_id or "sess_2" + secrets.token_hex(13),
            "iss": ISSUER,
            "iat": issued,
            "nbf": issued - NOT_BEFORE_MARGIN,
            "exp": issued + lifetime,
            "v": 2,
            "sts": "active",
            "fva": [0, -1],
        }
        if authorized_party:
            claims["azp"] = authorized_party
        if org:
            claims["o"] = org
        if extra:
            claims.update(extra)
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.key_id})
