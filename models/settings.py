"""Settings read once from the environment into one frozen object."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from models.errors import ConfigError
from models.sessions import load_jwt_key, parse_authorized_parties

DEFAULT_CLERK_API_URL = "https://api.clerk.com/v1"
DEFAULT_DATA_DIR = ".orgsync"
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# Svix retries a message for about 27.5 hours (immediately, 5 s, 5 min, 30 min, 2 h, 5 h,
# 10 h, 10 h): a delivery id must outlive that, with margin, or a late retry is applied as
# new. Dashboard replays can come later still, hence a default far above the minimum.
MIN_RETAIN_INBOX_DAYS = 2
DEFAULT_RETAIN_INBOX_DAYS = 30
DEFAULT_RETAIN_DAYS = 90
DEFAULT_REDACT_AFTER_DAYS = 7
DEFAULT_PRUNE_INTERVAL = 3600.0
DEFAULT_PRUNE_BATCH_SIZE = 2000
MAX_PRUNE_BATCH_SIZE = 10_000
# Rows a prune deletes or redacts per second at most: about 3 MB/s of WAL for inbox rows,
# a write load intake's commits barely notice; a first prune of 1,000,000 rows takes minutes.
DEFAULT_PRUNE_RATE = 5000
# orgsync's own PostgreSQL schema: its tables (users, organizations...) never meet an
# application's of the same name in ``public``.
DEFAULT_DB_SCHEMA = "orgsync"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
LOG_FORMATS = ("text", "json")
DEFAULT_RETAIN_NOTIFICATIONS_DAYS = 30
# Change notifications (``models.notifications``): a failing receiver is retried with
# exponential backoff from ``notify_retry_base`` up to ``NOTIFY_RETRY_CAP_S``, for
# ``notify_dead_after`` (three days, as long as Svix itself keeps trying) before the row is dead.
DEFAULT_NOTIFY_DEAD_AFTER = 3 * 24 * 3600.0
DEFAULT_NOTIFY_RETRY_BASE = 2.0
DEFAULT_NOTIFY_INTERVAL = 5.0
DEFAULT_NOTIFY_TIMEOUT = 10.0
NOTIFY_RETRY_CAP_S = 600.0
# A PostgreSQL identifier NOTIFY takes unquoted: lower case, at most 63 bytes.
_CHANNEL = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# The console's session cookies are signed with this key: long enough to resist guessing.
MIN_SECRET_KEY_LENGTH = 32


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def _fraction(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number between 0 and 1, got {raw!r}") from None
    if not 0 < value <= 1:
        raise ConfigError(f"{name} must be more than 0 and at most 1, got {raw!r}")
    return value


def _seconds_or_off(environ: Mapping[str, str], name: str) -> float:
    """A period in seconds where 0 (the default) switches the feature off."""
    raw = environ.get(name, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds (0: off), got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}")
    return value


def _days(environ: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number of days, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum} days, got {value}")
    return value


def _seconds_or_off_default(environ: Mapping[str, str], name: str, default: float) -> float:
    """Like ``_seconds_or_off`` with a default other than off."""
    if not environ.get(name, "").strip():
        return default
    return _seconds_or_off(environ, name)


def _bool(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in {"", "0", "false", "no", "off"}:
        return False
    if raw in {"1", "true", "yes", "on"}:
        return True
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return choices[0]
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def parse_db_schema(raw: str, name: str = "ORGSYNC_DB_SCHEMA") -> str:
    """The PostgreSQL schema orgsync keeps its tables in: a plain lower-case identifier.

    Plain, so that it never needs quoting (it goes into ``search_path`` and into the grants
    an operator types); ``public`` is allowed for a database of orgsync's own.
    """
    value = raw.strip() or DEFAULT_DB_SCHEMA
    if not _SCHEMA_NAME.fullmatch(value) or value.startswith("pg_"):
        raise ConfigError(
            f"{name} must be a lower-case identifier (letters, digits, '_'; at most 63; "
            f"not starting with a digit or 'pg_'), got {value!r}"
        )
    return value


def parse_signing_secrets(raw: str, name: str = "CLERK_WEBHOOK_SIGNING_SECRET") -> tuple[str, ...]:
    """Split and check one or more ``whsec_`` secrets; errors name the entry, never its value."""
    entries = [part for part in re.split(r"[\s,]+", raw.strip()) if part]
    if not entries:
        raise ConfigError(
            f"{name} is not set: webhooks cannot be verified without the endpoint's signing "
            "secret (copy it from the Clerk dashboard, Webhooks > your endpoint > Signing Secret)"
        )
    for position, secret in enumerate(entries, start=1):
        if not secret.startswith("whsec_"):
            raise ConfigError(f"{name}: entry {position} of {len(entries)} does not start with 'whsec_'")
        body = secret[len("whsec_") :]
        try:
            key = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"{name}: entry {position} of {len(entries)} is not valid base64 after 'whsec_'"
            ) from None
        if len(key) < 16:
            raise ConfigError(
                f"{name}: entry {position} of {len(entries)} is too short to be a signing secret"
            )
    return tuple(entries)


def parse_api_tokens(raw: str, name: str = "ORGSYNC_API_TOKENS") -> tuple[str, ...]:
    """Split one or more bearer tokens (several during rotation); errors never quote a token."""
    entries = tuple(part for part in re.split(r"[\s,]+", raw.strip()) if part)
    for position, token in enumerate(entries, start=1):
        if len(token) < 16:
            raise ConfigError(
                f"{name}: entry {position} of {len(entries)} is shorter than 16 characters; "
                "use a long random value"
            )
    return entries


def parse_notify_urls(raw: str, name: str = "ORGSYNC_NOTIFY_URLS") -> tuple[str, ...]:
    """Split the receivers' URLs (spaces or commas); errors name the entry, never its value.

    A URL may carry a token in its query string, so it is never quoted back.
    """
    entries = tuple(part for part in re.split(r"[\s,]+", raw.strip()) if part)
    for position, url in enumerate(entries, start=1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{name}: entry {position} of {len(entries)} is not an http:// or https:// URL with a host"
            )
    if len(set(entries)) != len(entries):
        raise ConfigError(f"{name} lists the same URL twice")
    return entries


def parse_notify_channel(raw: str, name: str = "ORGSYNC_NOTIFY_CHANNEL") -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not _CHANNEL.fullmatch(value):
        raise ConfigError(
            f"{name} must be a PostgreSQL channel name: lower-case letters, digits and '_', "
            f"not starting with a digit, at most 63 characters; got {value!r}"
        )
    return value


def parse_secret_key(raw: str, name: str = "ORGSYNC_SECRET_KEY") -> str | None:
    """The key that signs the console's session cookies, or None when unset; never quoted."""
    key = raw.strip()
    if not key:
        return None
    if len(key) < MIN_SECRET_KEY_LENGTH:
        raise ConfigError(
            f"{name} is shorter than {MIN_SECRET_KEY_LENGTH} characters; use a long random value "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return key


def normalize_database_url(url: str) -> str:
    """Point bare PostgreSQL URLs at psycopg 3, the driver orgsync installs."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


# The databases the mirror's SQL is written for, as SQLAlchemy (backend, driver) pairs.
SUPPORTED_DATABASES = {("postgresql", "psycopg"), ("sqlite", "pysqlite")}
# Celery brokers orgsync can start with; ``sqla+`` takes any SQLAlchemy URL whose driver is installed.
BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "amqp", "amqps", "pyamqp")


def _authority_problem(url: str) -> str:
    """Why the host and port of a URL that failed to parse do not parse; never quotes the URL."""
    host = url.partition("://")[2].split("/")[0].rpartition("@")[2]
    if host.startswith("[") and "]" not in host:
        return "its IPv6 host has no closing ']'"
    return "its port is not a number from 1 to 65535"


def _parse_database_url(name: str, url: str) -> URL:
    """Parse ``url`` as SQLAlchemy will; ``ConfigError`` naming ``name`` (never the URL) if it cannot."""
    try:
        parsed = make_url(url)
    except ValueError:  # the port, as int() reads it
        raise ConfigError(f"{name} is malformed: {_authority_problem(url)}") from None
    except ArgumentError:
        raise ConfigError(f"{name} is not a URL of the form scheme://user:password@host:port/name") from None
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ConfigError(f"{name} is malformed: its port is not a number from 1 to 65535")
    return parsed


def check_database_url(url: str) -> None:
    """Refuse at start-up a DATABASE_URL the engine would only refuse on first use."""
    parsed = _parse_database_url("DATABASE_URL", url)
    if (parsed.get_backend_name(), parsed.get_driver_name()) not in SUPPORTED_DATABASES:
        raise ConfigError(
            f"DATABASE_URL has the unsupported scheme {parsed.drivername!r}: "
            "orgsync runs on postgresql:// (psycopg) or sqlite:///"
        )


def check_broker_url(url: str) -> None:
    """Refuse at start-up a BROKER_URL kombu would only refuse when it first connects."""
    scheme, separator, _rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise ConfigError("BROKER_URL is not a URL of the form scheme://host:port/...")
    if scheme.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands the rest to create_engine: check what it would.
        parsed = _parse_database_url("BROKER_URL", url[len("sqla+") :])
        try:
            parsed.get_dialect().import_dbapi()
        except (NoSuchModuleError, ImportError):
            raise ConfigError(
                f"BROKER_URL has the unsupported scheme {scheme!r}: no installed database driver for it"
            ) from None
        return
    if scheme not in BROKER_SCHEMES:
        raise ConfigError(
            f"BROKER_URL has the unsupported scheme {scheme!r}: expected redis://, rediss://, "
            "amqp:// or sqla+sqlite:///"
        )
    try:
        # kombu reads host and port with urllib: the same errors, found now rather than later.
        urlsplit(url).port  # noqa: B018
    except ValueError:
        raise ConfigError(f"BROKER_URL is malformed: {_authority_problem(url)}") from None


@dataclass(frozen=True)
class Settings:
    """Everything orgsync reads from the environment. Secrets are kept out of ``repr``."""

    database_url: str
    broker_url: str
    data_dir: Path
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    clerk_secret_key: str | None = field(default=None, repr=False)
    clerk_api_url: str = DEFAULT_CLERK_API_URL
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    apply_batch_size: int = 500
    max_attempts: int = 8
    sweep_interval: float = 15.0
    sweep_grace: float = 30.0
    log_level: str = "INFO"
    rules_file: Path | None = None
    dry_run: bool = False
    rate_limit: int = 100
    membership_rate_limit: int = 10
    rate_limit_storage: str = "memory://"
    clerk_timeout: float = 10.0
    confirm_timeout: float = 300.0
    enforce_max_reversals: int = 3
    reconcile_share: float = 0.5
    reconcile_interval: float = 0.0
    db_timeout: float = 5.0
    instance_id: str | None = None
    retain_inbox_days: int = DEFAULT_RETAIN_INBOX_DAYS
    retain_api_calls_days: int = DEFAULT_RETAIN_DAYS
    retain_commands_days: int = DEFAULT_RETAIN_DAYS
    retain_sync_runs_days: int = DEFAULT_RETAIN_DAYS
    redact_after_days: int = DEFAULT_REDACT_AFTER_DAYS
    prune_interval: float = DEFAULT_PRUNE_INTERVAL
    prune_batch_size: int = DEFAULT_PRUNE_BATCH_SIZE
    prune_rate: int = DEFAULT_PRUNE_RATE
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    metrics_public: bool = False
    db_schema: str = DEFAULT_DB_SCHEMA
    log_format: str = "text"
    # URLs may carry tokens in their query strings: kept out of ``repr`` like the secrets.
    notify_urls: tuple[str, ...] = field(default=(), repr=False)
    notify_secret: str | None = field(default=None, repr=False)
    notify_channel: str | None = None
    notify_dead_after: float = DEFAULT_NOTIFY_DEAD_AFTER
    notify_retry_base: float = DEFAULT_NOTIFY_RETRY_BASE
    notify_interval: float = DEFAULT_NOTIFY_INTERVAL
    notify_timeout: float = DEFAULT_NOTIFY_TIMEOUT
    retain_notifications_days: int = DEFAULT_RETAIN_NOTIFICATIONS_DAYS
    # The instance's PEM public key: members sign in to the console with their Clerk session.
    clerk_jwt_key: str | None = field(default=None, repr=False)
    clerk_authorized_parties: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    secret_key: str | None = field(default=None, repr=False)

    @property
    def embedded(self) -> bool:
        """True when running on the built-in SQLite database and SQLite broker."""
        return self.database_url.startswith("sqlite") and self.broker_url.startswith("sqla+sqlite")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, require_webhook_secret: bool = False
    ) -> Settings:
        """Read the settings; ``require_webhook_secret`` for processes that serve webhooks."""
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("ORGSYNC_DATA_DIR", "").strip() or DEFAULT_DATA_DIR)
        database_url = env.get("DATABASE_URL", "").strip()
        broker_url = env.get("BROKER_URL", "").strip()
        if not database_url:
            database_url = f"sqlite:///{(data_dir / 'orgsync.db').absolute()}"
        if not broker_url:
            broker_url = f"sqla+sqlite:///{(data_dir / 'broker.db').absolute()}"
        database_url = normalize_database_url(database_url)
        check_database_url(database_url)
        check_broker_url(broker_url)
        raw_secrets = env.get("CLERK_WEBHOOK_SIGNING_SECRET", "")
        wants_secret = require_webhook_secret or bool(raw_secrets.strip())
        secrets = parse_signing_secrets(raw_secrets) if wants_secret else ()
        secret_key = env.get("CLERK_SECRET_KEY", "").strip() or None
        if secret_key is not None and not secret_key.startswith("sk_"):
            raise ConfigError("CLERK_SECRET_KEY does not start with 'sk_'")
        api_url = env.get("CLERK_API_URL", "").strip().rstrip("/") or DEFAULT_CLERK_API_URL
        if not api_url.startswith(("http://", "https://")):
            raise ConfigError(f"CLERK_API_URL must be an http(s) URL, got {api_url!r}")
        log_level = env.get("ORGSYNC_LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"ORGSYNC_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
        # Clerk's budgets per 10 s: 1000 for production instances, 100 for development ones.
        default_rate = 1000 if (secret_key or "").startswith("sk_live_") else 100
        storage = env.get("ORGSYNC_RATE_LIMIT_STORAGE", "").strip()
        if not storage:
            # Shared by every process through Redis when there is one; the embedded default
            # runs a single worker process, where process memory is shared enough.
            storage = broker_url if broker_url.startswith(("redis://", "rediss://")) else "memory://"
        rules_file = env.get("ORGSYNC_RULES_FILE", "").strip()
        instance_id = env.get("CLERK_INSTANCE_ID", "").strip() or None
        if instance_id is not None and not re.fullmatch(r"ins_[A-Za-z0-9]+", instance_id):
            raise ConfigError(f"CLERK_INSTANCE_ID must look like ins_..., got {instance_id!r}")
        retain_inbox = _days(
            env, "ORGSYNC_RETAIN_INBOX_DAYS", DEFAULT_RETAIN_INBOX_DAYS, MIN_RETAIN_INBOX_DAYS
        )
        redact_after = _days(
            env, "ORGSYNC_REDACT_AFTER_DAYS", min(DEFAULT_REDACT_AFTER_DAYS, retain_inbox - 1)
        )
        if redact_after >= retain_inbox:
            raise ConfigError(
                f"ORGSYNC_REDACT_AFTER_DAYS ({redact_after}) must be less than ORGSYNC_RETAIN_INBOX_DAYS "
                f"({retain_inbox}): the rows would be deleted before they are redacted"
            )
        prune_batch_size = _int(env, "ORGSYNC_PRUNE_BATCH_SIZE", DEFAULT_PRUNE_BATCH_SIZE)
        if prune_batch_size > MAX_PRUNE_BATCH_SIZE:
            # One batch is one transaction: a large one holds its locks long enough to stall intake.
            raise ConfigError(
                f"ORGSYNC_PRUNE_BATCH_SIZE must be at most {MAX_PRUNE_BATCH_SIZE}, got {prune_batch_size}"
            )
        notify_urls = parse_notify_urls(env.get("ORGSYNC_NOTIFY_URLS", ""))
        raw_notify_secret = env.get("ORGSYNC_NOTIFY_SECRET", "")
        notify_secret: str | None = None
        if notify_urls:
            if not raw_notify_secret.strip():
                raise ConfigError(
                    "ORGSYNC_NOTIFY_SECRET is not set: ORGSYNC_NOTIFY_URLS receive signed requests; "
                    "set a whsec_ secret (whsec_ followed by base64 of 24 or more random bytes) "
                    "and give it to the receivers"
                )
            notify_secrets = parse_signing_secrets(raw_notify_secret, "ORGSYNC_NOTIFY_SECRET")
            if len(notify_secrets) != 1:
                raise ConfigError("ORGSYNC_NOTIFY_SECRET must be exactly one whsec_ secret")
            notify_secret = notify_secrets[0]
        notify_channel = parse_notify_channel(env.get("ORGSYNC_NOTIFY_CHANNEL", ""))
        if notify_channel is not None and not database_url.startswith("postgresql"):
            raise ConfigError(
                "ORGSYNC_NOTIFY_CHANNEL needs PostgreSQL (NOTIFY): DATABASE_URL is not a postgresql:// URL"
            )
        jwt_key = env.get("CLERK_JWT_KEY", "").strip() or None
        if jwt_key is not None:
            load_jwt_key(jwt_key)  # a key that cannot verify anything is refused before start
        admin_tokens = parse_api_tokens(env.get("ORGSYNC_ADMIN_TOKENS", ""), "ORGSYNC_ADMIN_TOKENS")
        cookie_key = parse_secret_key(env.get("ORGSYNC_SECRET_KEY", ""))
        if require_webhook_secret and jwt_key is not None and not admin_tokens and cookie_key is None:
            # The web process's console would sign its cookies with nothing secret: refuse
            # before it listens (workers and the command line never sign a cookie).
            raise ConfigError(
                "ORGSYNC_SECRET_KEY is required when CLERK_JWT_KEY is set without ORGSYNC_ADMIN_TOKENS: "
                "it signs the console's session cookies (use a long random value)"
            )
        return cls(
            database_url=database_url,
            broker_url=broker_url,
            data_dir=data_dir,
            webhook_secrets=secrets,
            clerk_secret_key=secret_key,
            clerk_api_url=api_url,
            max_body_bytes=_int(env, "ORGSYNC_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            apply_batch_size=_int(env, "ORGSYNC_APPLY_BATCH_SIZE", 500),
            max_attempts=_int(env, "ORGSYNC_MAX_ATTEMPTS", 8),
            sweep_interval=_float(env, "ORGSYNC_SWEEP_INTERVAL", 15.0),
            sweep_grace=_float(env, "ORGSYNC_SWEEP_GRACE", 30.0),
            log_level=log_level,
            rules_file=Path(rules_file) if rules_file else None,
            dry_run=_bool(env, "ORGSYNC_DRY_RUN"),
            rate_limit=_int(env, "ORGSYNC_RATE_LIMIT", default_rate),
            membership_rate_limit=_int(env, "ORGSYNC_MEMBERSHIP_RATE_LIMIT", 10),
            rate_limit_storage=storage,
            clerk_timeout=_float(env, "CLERK_API_TIMEOUT", 10.0),
            confirm_timeout=_float(env, "ORGSYNC_CONFIRM_TIMEOUT", 300.0),
            enforce_max_reversals=_int(env, "ORGSYNC_ENFORCE_MAX_REVERSALS", 3),
            # Reconciliation's cap on the instance budget: the rest is always left to commands.
            reconcile_share=_fraction(env, "ORGSYNC_RECONCILE_SHARE", 0.5),
            reconcile_interval=_seconds_or_off(env, "ORGSYNC_RECONCILE_INTERVAL"),
            # The web process's bound on the database: Svix gives up on a delivery after
            # about 15 s, so a 503 with Retry-After must come well before.
            db_timeout=_float(env, "ORGSYNC_DB_TIMEOUT", 5.0),
            instance_id=instance_id,
            retain_inbox_days=retain_inbox,
            retain_api_calls_days=_days(env, "ORGSYNC_RETAIN_API_CALLS_DAYS", DEFAULT_RETAIN_DAYS),
            retain_commands_days=_days(env, "ORGSYNC_RETAIN_COMMANDS_DAYS", DEFAULT_RETAIN_DAYS),
            retain_sync_runs_days=_days(env, "ORGSYNC_RETAIN_SYNC_RUNS_DAYS", DEFAULT_RETAIN_DAYS),
            redact_after_days=redact_after,
            prune_interval=_seconds_or_off_default(env, "ORGSYNC_PRUNE_INTERVAL", DEFAULT_PRUNE_INTERVAL),
            prune_batch_size=prune_batch_size,
            prune_rate=_int(env, "ORGSYNC_PRUNE_RATE", DEFAULT_PRUNE_RATE),
            # The read API is served only when at least one token is configured.
            api_tokens=parse_api_tokens(env.get("ORGSYNC_API_TOKENS", "")),
            metrics_public=_bool(env, "ORGSYNC_METRICS_PUBLIC"),
            db_schema=parse_db_schema(env.get("ORGSYNC_DB_SCHEMA", "")),
            log_format=_choice(env, "ORGSYNC_LOG_FORMAT", LOG_FORMATS),
            notify_urls=notify_urls,
            notify_secret=notify_secret,
            notify_channel=notify_channel,
            notify_dead_after=_float(env, "ORGSYNC_NOTIFY_DEAD_AFTER", DEFAULT_NOTIFY_DEAD_AFTER),
            notify_retry_base=_float(env, "ORGSYNC_NOTIFY_RETRY_BASE", DEFAULT_NOTIFY_RETRY_BASE),
            notify_interval=_float(env, "ORGSYNC_NOTIFY_INTERVAL", DEFAULT_NOTIFY_INTERVAL),
            notify_timeout=_float(env, "ORGSYNC_NOTIFY_TIMEOUT", DEFAULT_NOTIFY_TIMEOUT),
            retain_notifications_days=_days(
                env, "ORGSYNC_RETAIN_NOTIFICATIONS_DAYS", DEFAULT_RETAIN_NOTIFICATIONS_DAYS
            ),
            clerk_jwt_key=jwt_key,
            clerk_authorized_parties=parse_authorized_parties(env.get("CLERK_AUTHORIZED_PARTIES", "")),
            # The console's operators sign in with one of these; the console is off without them
            # (unless members may sign in with their Clerk session).
            admin_tokens=admin_tokens,
            secret_key=cookie_key,
        )
