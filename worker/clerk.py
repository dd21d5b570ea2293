"""The Backend API as orgsync uses it: the official SDK with our retry policy, rate limits and audit trail.

The SDK's own retries are off: by default it retries POSTs on 5xx for up to an hour (creating
duplicates) and never retries 429. Here a 429 is waited out through the shared limiter and
tried again (the request was refused, so repeating it is safe); everything else is raised as
``ClerkApiError`` for the caller, who knows whether repeating the request is safe. Every HTTP
attempt is reported to the ``recorder``: purpose, method, path, status, error code, Clerk's
trace id, duration and Retry-After.

Writes go through the SDK. Reads (lists and GETs) are plain GETs over the SDK's own HTTP client,
with the URL, headers and timeout it would use, answered as JSON: the SDK's request building
and response models cost several times the CPU of the call, which bounds a reconciliation
run by CPU instead of by the rate limit. Both paths share the limiter, the recorder and the
error translation.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from clerk_backend_api import Clerk
from clerk_backend_api._hooks.types import BeforeRequestContext, HookContext
from clerk_backend_api.models import ClerkBaseError, ListOrganizationInvitationsQueryParamStatus
from clerk_backend_api.models import ResponseValidationError as SdkValidationError
from clerk_backend_api.utils.retries import BackoffStrategy, RetryConfig
from pydantic import BaseModel

from models import metrics
from models.clock import now_ms
from models.errors import ConfigError, OrgsyncError, PermanentError, RetryableError
from models.settings import Settings
from models.tables import ApiCall
from worker.ratelimit import RateLimiter

T = TypeVar("T")
Json = dict[str, Any]
Params = dict[str, str | int | list[str]]

NO_RETRIES = RetryConfig("none", BackoffStrategy(1, 1, 1.0, 1), retry_connection_errors=False)
PAGE_LIMIT = 500
MAX_MESSAGE_CHARS = 500
# Clerk's JS SDK reads the trace id from the error body and falls back to Cloudflare's ray id.
TRACE_HEADERS = ("x-clerk-trace-id", "cf-ray")


@dataclass(frozen=True)
class CallRecord:
    """One HTTP attempt, as the ``api_calls`` table keeps it."""

    purpose: str
    method: str
    path: str
    status_code: int | None
    error_code: str | None
    error_message: str | None
    clerk_trace_id: str | None
    retry_after: float | None
    duration_ms: int
    started_at: int

    def to_row(self, command_id: int | None = None) -> ApiCall:
        """The ``api_calls`` row of this attempt (of a command, or of reconciliation when None)."""
        return ApiCall(
            command_id=command_id,
            purpose=self.purpose[:32],
            method=self.method,
            path=self.path[:512],
            status_code=self.status_code,
            error_code=self.error_code[:128] if self.error_code else None,
            error_message=self.error_message[:MAX_MESSAGE_CHARS] if self.error_message else None,
            clerk_trace_id=self.clerk_trace_id,
            retry_after=self.retry_after,
            duration_ms=self.duration_ms,
            started_at=self.started_at,
        )


Recorder = Callable[[CallRecord], None]


class ClerkApiError(OrgsyncError):
    """A failed Backend API call. Raised as ``ClerkTransientError`` or ``ClerkRefusalError``.

    ``status`` is None when no response came (timeout, connection error). ``ambiguous``: the
    request may have been carried out although no success was seen (a timeout after sending,
    a 5xx, a dropped connection), so repeating a create needs a look at the state first.
    """

    retryable = False

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        *,
        trace_id: str | None = None,
        retry_after: float | None = None,
        ambiguous: bool = False,
    ) -> None:
        super().__init__(f"{code}: {message}" if status is None else f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.trace_id = trace_id
        self.retry_after = retry_after
        self.ambiguous = ambiguous

    @staticmethod
    def create(
        status: int | None,
        code: str,
        message: str,
        *,
        trace_id: str | None = None,
        retry_after: float | None = None,
        ambiguous: bool = False,
    ) -> ClerkApiError:
        transient = status is None or status == 429 or status >= 500
        cls: type[ClerkApiError] = ClerkTransientError if transient else ClerkRefusalError
        return cls(status, code, message, trace_id=trace_id, retry_after=retry_after, ambiguous=ambiguous)


class ClerkTransientError(ClerkApiError, RetryableError):
    """429, 5xx, timeouts and connection errors: the same call may succeed later."""

    retryable = True


class ClerkRefusalError(ClerkApiError, PermanentError):
    """A 4xx other than 429: Clerk refused the request; repeating it cannot help."""


@dataclass(frozen=True)
class ApiPage:
    data: list[Json]
    total_count: int


class _ResponseKeepingClient(httpx.Client):
    """Keeps each thread's last response, so that success records get their headers too."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local = threading.local()

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        self.local.response = None
        response = super().send(request, **kwargs)
        self.local.response = response
        return response

    def last_response(self) -> httpx.Response | None:
        return getattr(self.local, "response", None)


def _trace_from_headers(headers: Mapping[str, str] | None) -> str | None:
    if headers is None:
        return None
    for name in TRACE_HEADERS:
        value = headers.get(name)
        if value:
            return value[:128]
    return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def _short(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def translate_http_error(
    status: int, text: str | None, headers: Mapping[str, str] | None, fallback: str = ""
) -> ClerkApiError:
    """An error answer as Clerk sends it: code and message from ``errors[0]``, its trace id, Retry-After."""
    code, message, trace_id = f"http_{status}", "", None
    try:
        body = json.loads(text or "")
    except ValueError:
        body = None
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            code = str(first.get("code") or code)
            message = str(first.get("long_message") or first.get("message") or "")
        trace = body.get("clerk_trace_id")
        trace_id = str(trace)[:128] if trace else None
    return ClerkApiError.create(
        status,
        code,
        _short(message or fallback or "no message"),
        trace_id=trace_id or _trace_from_headers(headers),
        retry_after=_retry_after(headers) if headers is not None else None,
        ambiguous=status >= 500,
    )


def translate_sdk_error(exc: ClerkBaseError) -> ClerkApiError:
    """Clerk's error body, read from the raw text: many errors arrive as the SDK's fallback class."""
    if isinstance(exc, SdkValidationError) and 200 <= exc.status_code < 300:
        # The call succeeded but its answer did not fit the SDK's model: the change happened.
        return ClerkTransientError(
            exc.status_code,
            "response_invalid",
            _short(str(exc)),
            trace_id=_trace_from_headers(exc.headers),
            ambiguous=True,
        )
    return translate_http_error(exc.status_code, exc.body, exc.headers, exc.message)


def translate_transport_error(exc: httpx.TransportError) -> ClerkApiError:
    # Connecting failed or no connection was free: nothing was sent. Anything later may have
    # reached Clerk and been carried out.
    not_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
    return ClerkTransientError(None, code, f"{type(exc).__name__}: {exc}"[:200], ambiguous=not not_sent)


def _sdk_headers(sdk: Clerk, base_url: str, secret_key: str) -> dict[str, str]:
    """The headers the SDK puts on its requests (auth, Accept, User-Agent, and what its hooks add,
    such as Clerk-API-Version), taken once from its own configuration so that reads match writes."""
    config = sdk.sdk_configuration
    request = httpx.Request(
        "GET",
        base_url,
        headers={
            "Accept": "application/json",
            "user-agent": config.user_agent,
            "Authorization": f"Bearer {secret_key}",
        },
    )
    hooks = config.__dict__.get("_hooks")
    if hooks is not None:
        context = HookContext(config, base_url, "orgsync_read", None, None, None, None)
        request = hooks.before_request(BeforeRequestContext(context), request)
    return {name: value for name, value in request.headers.items() if name.lower() != "host"}


def _page(body: Json) -> ApiPage:
    return ApiPage(body["data"], body["total_count"])


def _is_page(body: Json) -> bool:
    data, total = body.get("data"), body.get("total_count")
    return (
        isinstance(data, list)
        and all(isinstance(item, dict) for item in data)
        and isinstance(total, int)
        and not isinstance(total, bool)
    )


def _dump(model: BaseModel) -> Json:
    return model.model_dump(mode="json", by_alias=True)


def _segment(value: str) -> str:
    return quote(value, safe="")


class ClerkClient:
    """Typed calls to the Backend API; each one waits for the rate limiter and is recorded."""

    def __init__(
        self,
        *,
        secret_key: str,
        api_url: str,
        timeout: float,
        limiter: RateLimiter,
        recorder: Recorder | None = None,
        limit_wait: float = 60.0,
        max_429_retries: int = 5,
    ) -> None:
        self._http = _ResponseKeepingClient(follow_redirects=True)
        self._sdk = Clerk(
            bearer_auth=secret_key,
            server_url=api_url,
            client=self._http,
            retry_config=NO_RETRIES,
            timeout_ms=max(1, int(timeout * 1000)),
        )
        self._base_url = self._sdk.sdk_configuration.get_server_details()[0]
        self._read_headers = _sdk_headers(self._sdk, self._base_url, secret_key)
        self._timeout = max(0.001, timeout)
        self._limiter = limiter
        self._recorder = recorder
        self._limit_wait = limit_wait
        self._max_429_retries = max_429_retries

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        limiter: RateLimiter,
        recorder: Recorder | None = None,
        *,
        limit_wait: float = 60.0,
    ) -> ClerkClient:
        """``limit_wait``: seconds a call may wait for a rate-limit slot before it gives up."""
        if not settings.clerk_secret_key:
            raise ConfigError("CLERK_SECRET_KEY is not set: orgsync cannot call the Backend API")
        return cls(
            secret_key=settings.clerk_secret_key,
            api_url=settings.clerk_api_url,
            timeout=settings.clerk_timeout,
            limiter=limiter,
            recorder=recorder,
            limit_wait=limit_wait,
        )

    @property
    def limiter(self) -> RateLimiter:
        return self._limiter

    def with_recorder(self, recorder: Recorder | None) -> ClerkClient:
        """The same client (connection pool, SDK, limiter) reporting to ``recorder``."""
        clone = object.__new__(ClerkClient)
        clone.__dict__.update(self.__dict__)
        clone._recorder = recorder
        return clone

    def close(self) -> None:
        self._http.close()

    # ---------------------------------------------------------------- plumbing
    def _record(self, record: CallRecord) -> None:
        metrics.api_call(record.status_code, record.purpose)
        if self._recorder is not None:
            self._recorder(record)

    def _call(
        self,
        purpose: str,
        method: str,
        path: str,
        operation: Callable[[], T],
        *,
        membership_key: str | None = None,
    ) -> T:
        refused = 0
        while True:
            self._limiter.acquire(membership_key, timeout=self._limit_wait)
            started_at = now_ms()
            began = time.monotonic()
            record = CallRecord(purpose, method, path, None, None, None, None, None, 0, started_at)
            try:
                result = operation()
            except ClerkApiError as exc:
                error = exc
            except ClerkBaseError as exc:
                error = translate_sdk_error(exc)
            except httpx.TransportError as exc:
                error = translate_transport_error(exc)
            else:
                response = self._http.last_response()
                self._record(
                    replace(
                        record,
                        status_code=response.status_code if response is not None else None,
                        clerk_trace_id=_trace_from_headers(response.headers if response else None),
                        duration_ms=int((time.monotonic() - began) * 1000),
                    )
                )
                return result
            self._record(
                replace(
                    record,
                    status_code=error.status,
                    error_code=error.code,
                    error_message=error.message,
                    clerk_trace_id=error.trace_id,
                    retry_after=error.retry_after,
                    duration_ms=int((time.monotonic() - began) * 1000),
                )
            )
            if error.status == 429:
                # Refused, not carried out: every process waits out Retry-After, then this
                # request goes again. A missing header still means "not now".
                self._limiter.pause_until(time.time() + (error.retry_after or 1.0))
                refused += 1
                if refused <= self._max_429_retries:
                    continue
            raise error

    def _get_json(
        self,
        path: str,
        params: Params | None,
        purpose: str,
        *,
        page: bool = False,
        bare: bool = False,
    ) -> Json:
        """A GET read as plain JSON over the SDK's HTTP client, with the SDK's URL, headers and timeout.

        Reads skip the SDK's models: building the request and validating and dumping the answer
        cost several times the CPU of the call itself, and reconciliation makes a call per
        organization. Writes stay on the SDK. ``page``: the answer must be ``{data, total_count}``;
        ``bare``: a bare array of objects is read as such a page.
        """
        url = self._base_url + path

        def fetch() -> Json:
            response = self._http.get(url, params=params, headers=self._read_headers, timeout=self._timeout)
            if response.status_code >= 400:
                raise translate_http_error(response.status_code, response.text, response.headers)
            try:
                body = response.json()
            except ValueError:
                body = None
            if bare and isinstance(body, list) and all(isinstance(item, dict) for item in body):
                # Clerk lists users as a bare array: a full page means there may be more.
                offset, limit = (params or {}).get("offset"), (params or {}).get("limit")
                offset = offset if isinstance(offset, int) else 0
                more = isinstance(limit, int) and 0 < limit <= len(body)
                return {"data": body, "total_count": offset + len(body) + (1 if more else 0)}
            if not isinstance(body, dict) or (page and not _is_page(body)):
                raise ClerkTransientError(
                    response.status_code,
                    "response_invalid",
                    "the answer is not the JSON object expected",
                    trace_id=_trace_from_headers(response.headers),
                )
            return body

        return self._call(purpose, "GET", path, fetch)

    def _send(
        self,
        purpose: str,
        method: str,
        path: str,
        operation: Callable[[], BaseModel],
        *,
        membership_key: str | None = None,
    ) -> Json:
        """A write through the SDK, its answer as plain JSON."""
        return _dump(self._call(purpose, method, path, operation, membership_key=membership_key))

    def _pages(self, fetch: Callable[[int, int], ApiPage], limit: int) -> Iterator[Json]:
        offset = 0
        while True:
            page = fetch(limit, offset)
            yield from page.data
            offset += len(page.data)
            if not page.data or offset >= page.total_count:
                return

    # ------------------------------------------------------------ organizations
    def get_organization(self, organization_id: str, *, purpose: str = "read") -> Json:
        return self._get_json(f"/organizations/{_segment(organization_id)}", None, purpose)

    def list_organizations(
        self, *, limit: int = 100, offset: int = 0, order_by: str = "+created_at", purpose: str = "read"
    ) -> ApiPage:
        params: Params = {
            "include_members_count": "true",
            "order_by": order_by,
            "limit": limit,
            "offset": offset,
        }
        return _page(self._get_json("/organizations", params, purpose, page=True))

    # -------------------------------------------------------------- memberships
    def list_memberships(
        self,
        organization_id: str,
        *,
        user_ids: Sequence[str] | None = None,
        limit: int = 100,
        offset: int = 0,
        order_by: str = "+created_at",
        purpose: str = "read",
    ) -> ApiPage:
        path = f"/organizations/{_segment(organization_id)}/memberships"
        # In the SDK's order, so that the URL is the one it would send.
        params: Params = {"order_by": order_by}
        if user_ids:
            params["user_id"] = list(user_ids)
        params.update(limit=limit, offset=offset)
        return _page(self._get_json(path, params, purpose, page=True))

    def get_membership(self, organization_id: str, user_id: str, *, purpose: str = "check") -> Json | None:
        """The membership of ``user_id``, or None if the user is not a member."""
        page = self.list_memberships(organization_id, user_ids=[user_id], limit=10, purpose=purpose)
        for item in page.data:
            if (item.get("public_user_data") or {}).get("user_id") == user_id:
                return item
        return None

    def add_member(
        self,
        organization_id: str,
        user_id: str,
        role: str,
        *,
        public_metadata: Mapping[str, Any] | None = None,
        private_metadata: Mapping[str, Any] | None = None,
        purpose: str = "send",
    ) -> Json:
        path = f"/organizations/{_segment(organization_id)}/memberships"
        return self._send(
            purpose,
            "POST",
            path,
            lambda: self._sdk.organization_memberships.create(
                organization_id=organization_id,
                user_id=user_id,
                role=role,
                public_metadata=public_metadata,
                private_metadata=private_metadata,
            ),
        )

    def set_role(self, organization_id: str, user_id: str, role: str, *, purpose: str = "send") -> Json:
        path = f"/organizations/{_segment(organization_id)}/memberships/{_segment(user_id)}"
        return self._send(
            purpose,
            "PATCH",
            path,
            lambda: self._sdk.organization_memberships.update(
                organization_id=organization_id, user_id=user_id, role=role
            ),
            membership_key=f"{organization_id}/{user_id}",
        )

    def remove_member(self, organization_id: str, user_id: str, *, purpose: str = "send") -> Json:
        path = f"/organizations/{_segment(organization_id)}/memberships/{_segment(user_id)}"
        return self._send(
            purpose,
            "DELETE",
            path,
            lambda: self._sdk.organization_memberships.delete(
                organization_id=organization_id, user_id=user_id
            ),
        )

    # -------------------------------------------------------------- invitations
    def list_invitations(
        self,
        organization_id: str,
        *,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
        order_by: str = "+created_at",
        purpose: str = "read",
    ) -> ApiPage:
        path = f"/organizations/{_segment(organization_id)}/invitations"
        params: Params = {}
        if status:
            # An unknown status is a defect here, not a question for Clerk.
            params["status"] = ListOrganizationInvitationsQueryParamStatus(status).value
        params.update(order_by=order_by, limit=limit, offset=offset)
        return _page(self._get_json(path, params, purpose, page=True))

    def find_invitations(
        self,
        organization_id: str,
        email_addresses: Sequence[str],
        *,
        status: str | None = "pending",
        purpose: str = "check",
    ) -> list[Json]:
        """Invitations for these addresses (compared case-insensitively), across every page."""
        wanted = {email.strip().lower() for email in email_addresses}

        def fetch(limit: int, offset: int) -> ApiPage:
            return self.list_invitations(
                organization_id, status=status, limit=limit, offset=offset, purpose=purpose
            )

        return [
            item
            for item in self._pages(fetch, PAGE_LIMIT)
            if str(item.get("email_address") or "").strip().lower() in wanted
        ]

    def get_invitation(self, organization_id: str, invitation_id: str, *, purpose: str = "check") -> Json:
        path = f"/organizations/{_segment(organization_id)}/invitations/{_segment(invitation_id)}"
        return self._get_json(path, None, purpose)

    def invite(
        self,
        organization_id: str,
        email_address: str,
        role: str,
        *,
        inviter_user_id: str | None = None,
        redirect_url: str | None = None,
        expires_in_days: int | None = None,
        public_metadata: Mapping[str, Any] | None = None,
        private_metadata: Mapping[str, Any] | None = None,
        purpose: str = "send",
    ) -> Json:
        path = f"/organizations/{_segment(organization_id)}/invitations"
        return self._send(
            purpose,
            "POST",
            path,
            lambda: self._sdk.organization_invitations.create(
                organization_id=organization_id,
                email_address=email_address,
                role=role,
                inviter_user_id=inviter_user_id,
                redirect_url=redirect_url,
                expires_in_days=expires_in_days,
                public_metadata=public_metadata,
                private_metadata=private_metadata,
            ),
        )

    def bulk_invite(
        self, organization_id: str, invitations: Sequence[Mapping[str, Any]], *, purpose: str = "send"
    ) -> list[Json]:
        """Up to 10 invitations in one call; Clerk creates all of them or none."""
        path = f"/organizations/{_segment(organization_id)}/invitations/bulk"
        body: list[Any] = [dict(item) for item in invitations]
        result = self._call(
            purpose,
            "POST",
            path,
            lambda: self._sdk.organization_invitations.bulk_create(
                organization_id=organization_id, request_body=body
            ),
        )
        return [_dump(item) for item in result.data]

    def revoke_invitation(
        self,
        organization_id: str,
        invitation_id: str,
        *,
        requesting_user_id: str | None = None,
        purpose: str = "send",
    ) -> Json:
        path = f"/organizations/{_segment(organization_id)}/invitations/{_segment(invitation_id)}/revoke"
        return self._send(
            purpose,
            "POST",
            path,
            lambda: self._sdk.organization_invitations.revoke(
                organization_id=organization_id,
                invitation_id=invitation_id,
                requesting_user_id=requesting_user_id,
            ),
        )

    # -------------------------------------------------------------------- roles
    def list_roles(
        self, *, limit: int = 100, offset: int = 0, order_by: str = "+created_at", purpose: str = "read"
    ) -> ApiPage:
        params: Params = {"order_by": order_by, "limit": limit, "offset": offset}
        return _page(self._get_json("/organization_roles", params, purpose, page=True))

    # ------------------------------------------------- users, permissions, role sets, domains
    def list_users(
        self, *, limit: int = 100, offset: int = 0, order_by: str = "+created_at", purpose: str = "read"
    ) -> ApiPage:
        params: Params = {"order_by": order_by, "limit": limit, "offset": offset}
        return _page(self._get_json("/users", params, purpose, page=True, bare=True))

    def list_permissions(
        self, *, limit: int = 100, offset: int = 0, order_by: str = "+created_at", purpose: str = "read"
    ) -> ApiPage:
        params: Params = {"order_by": order_by, "limit": limit, "offset": offset}
        return _page(self._get_json("/organization_permissions", params, purpose, page=True))

    def list_role_sets(
        self, *, limit: int = 100, offset: int = 0, order_by: str = "+created_at", purpose: str = "read"
    ) -> ApiPage:
        params: Params = {"order_by": order_by, "limit": limit, "offset": offset}
        return _page(self._get_json("/role_sets", params, purpose, page=True))

    def list_organization_domains(
        self, *, limit: int = 100, offset: int = 0, order_by: str = "+created_at", purpose: str = "read"
    ) -> ApiPage:
        params: Params = {"order_by": order_by, "limit": limit, "offset": offset}
        return _page(self._get_json("/organization_domains", params, purpose, page=True))
