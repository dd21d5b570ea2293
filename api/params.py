"""Query parameters as Clerk's API takes them: integers, booleans, repeated lists, unsupported filters."""

from __future__ import annotations

from flask import request

from api.errors import invalid, unsupported

# Filters of Clerk's endpoints about data the mirror does not hold: refused with the reason
# rather than silently answered as if nobody matched.
NOT_MIRRORED = {
    "phone_number": "it holds no phone numbers",
    "phone_number_query": "it holds no phone numbers",
    "web3_wallet": "it holds no web3 wallets",
    "last_active_at_before": "it holds no session activity",
    "last_active_at_after": "it holds no session activity",
    "last_active_at_since": "it holds no session activity",
    "last_sign_in_at_before": "it holds no sign-ins",
    "last_sign_in_at_after": "it holds no sign-ins",
    "external_id": "it holds no external ids",
    "provider": "it holds no external accounts",
    "provider_user_id": "it holds no external accounts",
    "banned": "it holds no ban status",
    "starting_after": "it pages by offset only",
}


def integer(name: str, default: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise invalid(name, f"must be an integer, got {raw[:40]!r}") from None


def window() -> tuple[int, int]:
    """``limit`` (default 10) and ``offset`` (default 0); ranges are checked by the read layer."""
    limit = integer("limit", 10)
    offset = integer("offset", 0)
    assert limit is not None and offset is not None
    return limit, offset


def flag(name: str) -> bool:
    raw = request.args.get(name, "").strip().lower()
    if raw in ("", "false", "0"):
        return False
    if raw in ("true", "1"):
        return True
    raise invalid(name, f"must be true or false, got {raw[:40]!r}")


def optional_flag(name: str) -> bool | None:
    """``true`` or ``false``, or None when the parameter is absent (no filter)."""
    if request.args.get(name) is None:
        return None
    return flag(name)


def given(name: str) -> str | None:
    """The value as sent, empty included, for filters where an empty value is an error."""
    return request.args.get(name)


def text(name: str) -> str | None:
    value = request.args.get(name)
    return value if value else None


def values(name: str) -> list[str]:
    """A list parameter: repeated ``name=a&name=b`` (the SDKs) or ``name[]=`` (Clerk's docs)."""
    return [v for v in request.args.getlist(name) + request.args.getlist(f"{name}[]") if v]


def refuse_unmirrored(*names: str) -> None:
    for name in names:
        if values(name):
            raise unsupported(name, NOT_MIRRORED[name])
