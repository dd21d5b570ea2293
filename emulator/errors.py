"""Clerk-style API errors raised by the emulator's state and rendered by its HTTP layer."""

from __future__ import annotations

import uuid
from typing import Any


class ClerkError(Exception):
    """One Clerk error: the HTTP status and the ``errors[0]`` entry of Clerk's error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        long_message: str | None = None,
        *,
        meta: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {long_message or message}")
        self.status = status
        self.code = code
        self.message = message
        self.long_message = long_message or message
        self.meta = meta or {}
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "errors": [
                {
                    "message": self.message,
                    "long_message": self.long_message,
                    "code": self.code,
                    "meta": self.meta,
                }
            ],
            "meta": {},
            "clerk_trace_id": uuid.uuid4().hex,
        }


def not_found(what: str, ident: str) -> ClerkError:
    return ClerkError(
        404,
        "resource_not_found",
        "not found",
        f"No {what} was found with id {ident}",
        meta={"param_name": what, "value": ident},
    )


def param_invalid(name: str, detail: str) -> ClerkError:
    return ClerkError(
        422,
        "form_param_value_invalid",
        "is invalid",
        f"{name} {detail}",
        meta={"param_name": name},
    )


def param_missing(name: str) -> ClerkError:
    return ClerkError(
        422,
        "form_param_missing",
        f"{name} must be included",
        f"{name} must be included",
        meta={"param_name": name},
    )


def param_format(name: str, detail: str) -> ClerkError:
    return ClerkError(
        422,
        "form_param_format_invalid",
        "is invalid",
        f"{name} {detail}",
        meta={"param_name": name},
    )


def identifier_exists(name: str, value: str) -> ClerkError:
    return ClerkError(
        422,
        "form_identifier_exists",
        "That value is taken. Please try another.",
        f"{name} {value!r} is already taken",
        meta={"param_name": name},
    )


def too_many_requests(retry_after: int) -> ClerkError:
    return ClerkError(
        429,
        "too_many_requests",
        "Too many requests",
        "Too many requests, retry later",
        retry_after=retry_after,
    )
