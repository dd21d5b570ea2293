"""Questions an application asks on every request: may U do P in O, U's role in O, U's organizations.

Each answer is one indexed query (the user's memberships, joined to their organization and
to the live role of the same key), shared by the Python API and the HTTP API. A membership's
permissions come from the mirrored role when the mirror knows it (a role's permissions can
change after the membership was last written), else from the membership's own list, else
from Clerk's defaults for ``org:admin``.

``AccessCache`` keeps answers per process, keyed by (user, organization). Every mirror write
transaction grows the mirror's generation (``models.db.lock_mirror_writes``; read only through
``mirror_generation``); the cache reads the generation before the data it caches and empties
itself when the generation moves, so an answer never outlives the commit that changed it by
more than ``recheck_s``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Engine, String, and_, bindparam, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from models.commands import ADMIN_ROLE
from models.events import normalize_role_key
from models.reads import read_sessions
from models.tables import Membership, MirrorState, Organization, Role

logger = logging.getLogger(__name__)

# Clerk's system permissions, all held by the default admin role.
SYSTEM_PERMISSIONS = (
    "org:sys_profile:manage",
    "org:sys_profile:delete",
    "org:sys_memberships:read",
    "org:sys_memberships:manage",
    "org:sys_domains:read",
    "org:sys_domains:manage",
    "org:sys_billing:read",
    "org:sys_billing:manage",
    "org:sys_entconns:manage",
)


@dataclass(frozen=True)
class Access:
    """A user's live membership of one organization: its role key and the permissions it grants."""

    organization_id: str
    organization_slug: str | None
    organization_name: str | None
    user_id: str
    role: str
    permissions: frozenset[str]

    def allows(self, permission: str) -> bool:
        return permission in self.permissions

    def to_dict(self) -> dict[str, object]:
        return {
            "organization_id": self.organization_id,
            "organization_slug": self.organization_slug,
            "organization_name": self.organization_name,
            "user_id": self.user_id,
            "role": self.role,
            "permissions": sorted(self.permissions),
        }


def _permissions(role: str, role_permissions: list[str] | None, own: list[str] | None) -> frozenset[str]:
    if role_permissions is not None:
        return frozenset(role_permissions)
    if own is not None:
        return frozenset(own)
    return frozenset(SYSTEM_PERMISSIONS) if role == ADMIN_ROLE else frozenset()


def _access_statement(*, of_organization: bool) -> Any:
    # Starts from the user's memberships (indexed on user_id: a handful of rows), so matching
    # the organization by id or slug costs no second lookup. Built once: a check binds values.
    conditions = [
        Membership.user_id == bindparam("user_id"),
        Membership.deleted.is_(False),
        Organization.deleted.is_(False),
    ]
    if of_organization:
        organization = bindparam("organization", type_=String)
        conditions.append(or_(Organization.id == organization, Organization.slug == organization))
    statement = (
        select(
            Membership.organization_id,
            Organization.slug,
            Organization.name,
            Membership.role,
            Membership.permissions,
            Role.permissions,
        )
        .join(Organization, Organization.id == Membership.organization_id)
        .outerjoin(Role, and_(Role.key == Membership.role, Role.deleted.is_(False)))
        .where(*conditions)
        .order_by(Membership.created_at, Membership.organization_id)
    )
    return statement


_ACCESS_OF = _access_statement(of_organization=True)
_ACCESSES = _access_statement(of_organization=False)


def _accesses(session: Session, user_id: str, organization: str | None) -> list[Access]:
    if organization is None:
        rows = session.connection().execute(_ACCESSES, {"user_id": user_id})
    else:
        rows = session.connection().execute(_ACCESS_OF, {"user_id": user_id, "organization": organization})
    found: dict[str, Access] = {}
    for org_id, slug, name, role, own, role_permissions in rows:
        if org_id in found:  # two live roles with one key cannot happen in Clerk; keep the first
            continue
        key = normalize_role_key(role)
        found[org_id] = Access(
            organization_id=org_id,
            organization_slug=slug,
            organization_name=name,
            user_id=user_id,
            role=key,
            permissions=_permissions(key, role_permissions, own),
        )
    return list(found.values())


def access_of(session: Session, user_id: str, organization: str) -> Access | None:
    """The user's live membership of the organization (id or slug), or None when not a member."""
    accesses = _accesses(session, user_id, organization)
    if len(accesses) > 1:
        # A slug equal to another organization's id: the id wins, as in Clerk's lookups.
        by_id = [access for access in accesses if access.organization_id == organization]
        return by_id[0] if by_id else accesses[0]
    return accesses[0] if accesses else None


def has_permission(session: Session, user_id: str, organization: str, permission: str) -> bool:
    """Whether the user is a member of the organization whose role grants ``permission``."""
    access = access_of(session, user_id, organization)
    return access is not None and access.allows(permission)


def role_of(session: Session, user_id: str, organization: str) -> str | None:
    """The user's role key in the organization (legacy keys normalised), or None."""
    access = access_of(session, user_id, organization)
    return None if access is None else access.role


def organizations_of(session: Session, user_id: str) -> list[Access]:
    """Every live organization the user is a member of, in the order the user joined them."""
    return _accesses(session, user_id, None)


def mirror_generation(session: Session | Connection) -> int:
    """The mirror's write generation (0 before the first write): the one place that reads it."""
    # Summed over its slots (``models.db``): concurrent writers each grow their own.
    value = session.scalar(select(func.sum(MirrorState.generation)))
    return int(value or 0)


Sessions = Callable[[], AbstractContextManager[Session]]
_MISSING = object()


class AccessCache:
    """Per-process answers by (user, organization), emptied when the mirror's generation moves.

    ``recheck_s`` is how long a reading of the generation is trusted. With 0 every lookup
    reads it (one primary-key query instead of the join), so a change is seen at once. Above
    0 (the default, 50 ms) the answers come from memory and a change is seen within about
    ``recheck_s``: given a session factory (``access_of(sessions, ...)``), a daemon thread
    re-reads the generation every ``recheck_s`` so that no lookup waits for it, and a lookup
    answered from memory opens no session at all. The mirror itself trails Clerk by the
    webhook delivery time, typically longer than that.

    Thread-safe; bounded to ``max_entries`` (least recently used out first). ``close()``
    stops the thread.
    """

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        recheck_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if recheck_s < 0:
            raise ValueError("recheck_s must not be negative")
        self.max_entries = max_entries
        self.recheck_s = recheck_s
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], Access | None] = OrderedDict()
        self._generation: int | None = None
        self._checked_at = 0.0
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self.hits = 0
        self.misses = 0

    # -------------------------------------------------------------- generation
    def _observe(self, generation: int, at: float) -> None:
        with self._lock:
            if generation != self._generation:
                self._entries.clear()
                self._generation = generation
            self._checked_at = at

    def _trusted_generation(self) -> int | None:
        """The generation read last, if it was read within ``recheck_s``."""
        with self._lock:
            if self._generation is not None and self.clock() - self._checked_at < self.recheck_s:
                return self._generation
        return None

    def _read_generation(self, session: Session) -> int:
        now = self.clock()
        generation = mirror_generation(session)
        self._observe(generation, now)
        return generation

    def _watch(self, sessions: Sessions) -> None:
        with self._lock:
            if self._watcher is not None or self.recheck_s <= 0 or self._stop.is_set():
                return
            self._watcher = threading.Thread(
                target=_watch_generation,
                args=(weakref.ref(self), sessions, self.recheck_s / 2, self._stop),
                name="orgsync-access-cache",
                daemon=True,
            )
            self._watcher.start()

    # ------------------------------------------------------------------ lookup
    def _cached(self, key: tuple[str, str]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
        return _MISSING

    def _store(self, key: tuple[str, str], generation: int, access: Access | None) -> None:
        with self._lock:
            self.misses += 1
            if self._generation == generation:
                self._entries[key] = access
                if len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)

    def access_of(self, source: Session | Sessions, user_id: str, organization: str) -> Access | None:
        """The answer of ``access_of``, from memory while the mirror has not changed.

        ``source`` is a session, or a session factory (preferred): then a session is opened
        only when the mirror must be read, and the generation is watched in the background.
        """
        key = (user_id, organization)
        if isinstance(source, Session):
            return self._lookup(source, key)
        self._watch(source)
        # The generation is read before the data: a write committing in between moves it, and
        # the next lookup drops what this one stores.
        generation = self._trusted_generation()
        if generation is not None:
            found = self._cached(key)
            if found is not _MISSING:
                return cast("Access | None", found)
        with source() as session:
            return self._lookup(session, key, generation)

    def _lookup(self, session: Session, key: tuple[str, str], generation: int | None = None) -> Access | None:
        if generation is None:
            generation = self._trusted_generation()
        if generation is None:
            generation = self._read_generation(session)
        found = self._cached(key)
        if found is not _MISSING:
            return cast("Access | None", found)
        access = access_of(session, *key)
        self._store(key, generation, access)
        return access

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._generation = None

    def close(self) -> None:
        """Stop watching the generation (answers are then checked on lookup again)."""
        self._stop.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=5)


def _watch_generation(
    cache_ref: weakref.ref[AccessCache], sessions: Sessions, interval: float, stop: threading.Event
) -> None:
    """Re-read the generation every ``interval`` while the cache lives: lookups never wait for it.

    A failed read (database unreachable) leaves the last reading to age: lookups then read
    the generation themselves and report the failure to their caller.
    """
    while not stop.wait(interval):
        cache = cache_ref()
        if cache is None:
            return
        try:
            now = cache.clock()
            with sessions() as session:
                generation = mirror_generation(session)
            cache._observe(generation, now)
        except Exception:
            logger.debug("access cache: generation not read", exc_info=True)
        del cache


def check_sessions(engine: Engine) -> sessionmaker[Session]:
    """Sessions for permission checks: ``models.reads.read_sessions``, in autocommit on
    PostgreSQL; each statement sees the latest commit, which the generation protocol needs."""
    return read_sessions(engine)
