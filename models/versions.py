"""The one layout of a mirrored row's version string, shared by webhook writes and listings.

A version is fixed width, digits and lowercase hex only, so it sorts the same as a Python
``str`` and under every database collation::

    [created_at(15)] updated_at(15) rank(1) envelope_ms(15) tie(16)

``created_at`` leads for memberships only (a re-added member is a new generation that must
outrank the old one's tombstone). ``rank`` orders kinds of writes with the same ``updated_at``
(created < updated < deleted). The envelope timestamp and the tie (the first 16 hex digits of
the SHA-256 of the delivery's ``svix-id``) only break ties, deterministically. A write without a
delivery (a listing, a tombstone from reconciliation) has the all-zero tie, below every delivery.
"""

from __future__ import annotations

import hashlib

STAMP_WIDTH = 15
MAX_STAMP = 10**STAMP_WIDTH - 1
TIE_WIDTH = 16
NO_DELIVERY = "0" * TIE_WIDTH


def stamp(value: int) -> str:
    """An epoch-ms timestamp as fixed-width digits, clamped into the representable range."""
    return f"{min(max(value, 0), MAX_STAMP):0{STAMP_WIDTH}d}"


def delivery_hash(svix_id: str) -> str:
    return hashlib.sha256(svix_id.encode()).hexdigest()[:TIE_WIDTH]


def row_version(
    *,
    updated_at: int,
    rank: int,
    timestamp_ms: int,
    svix_id: str | None,
    created_at: int | None = None,
) -> str:
    """The version string; ``created_at`` only for memberships, ``svix_id`` None without a delivery."""
    if not 0 <= rank <= 9:
        raise ValueError(f"rank must be one digit, got {rank}")
    head = "" if created_at is None else stamp(created_at)
    tie = NO_DELIVERY if svix_id is None else delivery_hash(svix_id)
    return head + stamp(updated_at) + str(rank) + stamp(timestamp_ms) + tie
