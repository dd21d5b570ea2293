"""Clerk's error body for the read API: ``{"errors": [{message, long_message, code, meta}], ...}``."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Response, jsonify

from models.errors import PermanentError


class ApiError(PermanentError):
    """One answer in Clerk's error shape; raised by views and parameter parsing."""

    def __init__(
        self, status: int, code: str, message: str, long_message: str, *, meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code}: {long_message}")
        self.status = status
        self.code = code
        self.message = message
        self.long_message = long_message
        self.meta = meta or {}

    def response(self) -> Response:
        response = jsonify(
            {
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
        )
        response.status_code = self.status
        return response


def unauthorized(reason: str) -> ApiError:
    return ApiError(401, "authentication_invalid", "Unauthorized request", reason)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(
        404,
        "resource_not_found",
        "not found",
        f"No {what} was found with id {ident}",
        meta={"param_name": what, "value": ident},
    )


def invalid(param: str, detail: str) -> ApiError:
    return ApiError(
        422, "form_param_value_invalid", "is invalid", f"{param} {detail}", meta={"param_name": param}
    )


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(
        422,
        "form_param_value_invalid",
        "is not supported by this mirror",
        f"{param} cannot be answered from the mirror: {why}",
        meta={"param_name": param},
    )
