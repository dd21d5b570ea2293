"""Session tokens for the emulator's users, signed like Clerk's so orgsync verifies them unchanged.

Clerk's frontend hands a signed-in user a short-lived RS256 JWT (the ``__session`` cookie),
signed with the instance's private key; applications verify it with the public half, which
Clerk shows as a PEM (``CLERK_JWT_KEY``) and serves as a JWKS at ``GET /v1/jwks``. The emulator
has no frontend: ``SessionIssuer`` holds a key pair (generated at start, or read from a PEM
file so the public key survives restarts) and mints tokens for any of its users on request,
with Clerk's version 2 claims (``sub``, ``sid``, ``azp``, ``iss``, ``iat``/``nbf``/``exp``,
``v``, ``sts`` and ``o`` for an active organization).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# Clerk's session tokens live sixty seconds, refreshed by its frontend; a person clicking
# through the emulator's console has no frontend to refresh them, so the default is longer.
DEFAULT_TOKEN_LIFETIME = 3600
# Clerk sets nbf a few seconds before iat to absorb clock skew.
NOT_BEFORE_MARGIN = 10
ISSUER = "https://orgsync-emulator.clerk.accounts.dev"


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class SessionIssuer:
    """An RS256 key pair and the tokens it signs. Thread-safe: it holds no mutable state."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._key = private_key
        numbers = private_key.public_key().public_numbers()
        # Clerk names the key after the instance; a digest of the key keeps ids stable per key.
        self.key_id = "ins_" + hashlib.sha256(str(numbers.n).encode()).hexdigest()[:27]
        self._jwk = {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.key_id,
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }

    @classmethod
    def generate(cls) -> SessionIssuer:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def from_file(cls, path: Path) -> SessionIssuer:
        """Read the private key from ``path``, writing a new one there first if it does not exist."""
        if not path.exists():
            issuer = cls.generate()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(issuer.private_pem())
            path.chmod(0o600)
            return issuer
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA private key")
        return cls(key)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> str:
        """The public key as Clerk's Dashboard shows it: what ``CLERK_JWT_KEY`` is set to."""
        return (
            self._key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
        )

    def jwks(self) -> dict[str, Any]:
        """The body of ``GET /v1/jwks``."""
        return {"keys": [dict(self._jwk)]}

    def mint(
        self,
        user_id: str,
        *,
        lifetime: int = DEFAULT_TOKEN_LIFETIME,
        authorized_party: str | None = None,
        org: dict[str, Any] | None = None,
        now: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """A session token for ``user_id``; ``org`` is the compact ``o`` claim of an active org."""
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "sub": user_id,
            "sid": "sess_2" + secrets.token_hex(13),
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
