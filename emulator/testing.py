"""A recording webhook endpoint for tests and demos: verifies signatures, can fail on purpose."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from svix.webhooks import Webhook, WebhookVerificationError
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from emulator.server import QuietRequestHandler


@dataclass(frozen=True)
class Received:
    msg_id: str
    headers: dict[str, str]
    body: str
    status: int
    verified: bool

    @property
    def event(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


class Receiver:
    """An HTTP endpoint on a free loopback port that records every delivery.

    ``fail_first`` answers 500 to the first N attempts of each message id; ``status`` (a
    callable of the attempt number for that id) overrides the answer entirely.
    """

    def __init__(
        self,
        signing_secret: str,
        *,
        fail_first: int = 0,
        status: Callable[[int], int] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self._verifier = Webhook(signing_secret)
        self._fail_first = fail_first
        self._status = status
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()
        self.received: list[Received] = []
        self._server: BaseWSGIServer = make_server(
            host, 0, self._app, threaded=True, request_handler=QuietRequestHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="receiver", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/webhooks/clerk"

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        body = request.get_data(as_text=True)
        headers = {k.lower(): v for k, v in request.headers.items()}
        msg_id = headers.get("svix-id", "")
        try:
            self._verifier.verify(body, headers)
            verified = True
        except (WebhookVerificationError, ValueError):
            verified = False
        with self._lock:
            self._seen[msg_id] += 1
            attempt = self._seen[msg_id]
            if self._status is not None:
                status = self._status(attempt)
            else:
                status = 500 if attempt <= self._fail_first or not verified else 204
            self.received.append(Received(msg_id, headers, body, status, verified))
        response = Response(status=status)
        return response(environ, start_response)

    # --------------------------------------------------------------- queries
    def accepted(self) -> list[Received]:
        """Deliveries answered with a 2xx, in arrival order (duplicates included)."""
        with self._lock:
            return [r for r in self.received if 200 <= r.status < 300]

    def accepted_events(self) -> list[dict[str, Any]]:
        """One event per message id that was acknowledged, sorted by envelope timestamp."""
        unique: dict[str, dict[str, Any]] = {}
        for item in self.accepted():
            unique.setdefault(item.msg_id, item.event)
        return sorted(unique.values(), key=lambda e: int(e["timestamp"]))


def _org_row(d: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "name", "slug", "max_allowed_memberships", "admin_delete_enabled")
    row = {k: d[k] for k in keys}
    row["created_by"] = d.get("created_by")
    row.update(
        public_metadata=d.get("public_metadata", {}),
        private_metadata=d.get("private_metadata", {}),
        created_at=d["created_at"],
        updated_at=d["updated_at"],
    )
    return row


def _membership_row(d: dict[str, Any]) -> dict[str, Any]:
    user = d["public_user_data"]
    return {
        "organization_id": d["organization"]["id"],
        "user_id": user["user_id"],
        "id": d["id"],
        "role": d["role"],
        "role_name": d.get("role_name"),
        "permissions": d.get("permissions"),
        "identifier": user.get("identifier"),
        "public_metadata": d.get("public_metadata", {}),
        "private_metadata": d.get("private_metadata", {}),
        "created_at": d["created_at"],
        "updated_at": d["updated_at"],
    }


def _invitation_row(d: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "organization_id", "email_address", "role", "status")
    row = {k: d[k] for k in keys}
    row.update(
        user_id=d.get("user_id"),
        inviter_id=d.get("inviter_id"),
        public_metadata=d.get("public_metadata", {}),
        private_metadata=d.get("private_metadata", {}),
        expires_at=d.get("expires_at"),
        created_at=d["created_at"],
        updated_at=d["updated_at"],
    )
    return row


def _role_row(d: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "key", "name", "description", "is_creator_eligible", "created_at", "updated_at")
    row = {k: d[k] for k in keys}
    row["permissions"] = [p["key"] for p in d["permissions"]]
    return {k: row[k] for k in (*keys[:5], "permissions", *keys[5:])}


def _permission_row(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in ("id", "key", "name", "description", "type", "created_at", "updated_at")}


def _user_row(d: dict[str, Any]) -> dict[str, Any]:
    emails = {e["id"]: e["email_address"] for e in d.get("email_addresses", [])}
    return {
        "id": d["id"],
        "identifier": emails.get(d.get("primary_email_address_id") or ""),
        "username": d.get("username"),
        "first_name": d.get("first_name"),
        "last_name": d.get("last_name"),
        "public_metadata": d.get("public_metadata", {}),
        "created_at": d["created_at"],
        "updated_at": d["updated_at"],
    }


def project_events(events: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The state that a list of webhook events describes, in ``State.snapshot()``'s shape.

    Events are applied in the order given (sort them by envelope ``timestamp`` first): a
    reference for what a correct mirror holds after receiving exactly these events.
    """
    orgs: dict[str, dict[str, Any]] = {}
    members: dict[tuple[str, str], dict[str, Any]] = {}
    invitations: dict[str, dict[str, Any]] = {}
    roles: dict[str, dict[str, Any]] = {}
    permissions: dict[str, dict[str, Any]] = {}
    users: dict[str, dict[str, Any]] = {}
    for event in events:
        kind, data = event["type"], event["data"]
        if kind in ("organization.created", "organization.updated"):
            orgs[data["id"]] = _org_row(data)
        elif kind == "organization.deleted":
            orgs.pop(data["id"], None)
            members = {k: v for k, v in members.items() if k[0] != data["id"]}
            invitations = {k: v for k, v in invitations.items() if v["organization_id"] != data["id"]}
        elif kind in ("organizationMembership.created", "organizationMembership.updated"):
            row = _membership_row(data)
            members[(row["organization_id"], row["user_id"])] = row
        elif kind == "organizationMembership.deleted":
            row = _membership_row(data)
            members.pop((row["organization_id"], row["user_id"]), None)
        elif kind.startswith("organizationInvitation."):
            invitations[data["id"]] = _invitation_row(data)
        elif kind in ("role.created", "role.updated"):
            roles[data["id"]] = _role_row(data)
        elif kind == "role.deleted":
            roles.pop(data["id"], None)
        elif kind in ("permission.created", "permission.updated"):
            permissions[data["id"]] = _permission_row(data)
        elif kind == "permission.deleted":
            permissions.pop(data["id"], None)
        elif kind in ("user.created", "user.updated"):
            users[data["id"]] = _user_row(data)
        elif kind == "user.deleted":
            users.pop(data["id"], None)
            members = {k: v for k, v in members.items() if k[1] != data["id"]}
    return {
        "organizations": [orgs[k] for k in sorted(orgs)],
        "memberships": [members[k] for k in sorted(members)],
        "invitations": [invitations[k] for k in sorted(invitations)],
        "roles": [roles[k] for k in sorted(roles)],
        "permissions": [permissions[k] for k in sorted(permissions)],
        "users": [users[k] for k in sorted(users)],
    }
