"""Bearer tokens from ORGSYNC_API_TOKENS: compared in constant time, named by position, never logged."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


class TokenCheck:
    """Which of the configured tokens an ``Authorization`` header carries (1-based), if any."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("the API needs at least one token")
        self._expected = [f"Bearer {token}".encode() for token in tokens]

    def match(self, header: str | None) -> int | None:
        if not header:
            return None
        given = header.encode()
        found: int | None = None
        # Every token is compared, matched or not, so the time taken does not tell which one.
        for position, candidate in enumerate(self._expected, start=1):
            if hmac.compare_digest(given, candidate) and found is None:
                found = position
        return found


def requester(position: int) -> str:
    """What commands record as ``requested_by`` for the token at ``position``: never the token."""
    return f"api:token-{position}"
