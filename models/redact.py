"""Masking for anything that may reach a log line, an error message or ``last_error``."""

from __future__ import annotations

import re

# Driver and broker errors can quote a URL with its credentials, or a key-shaped token.
_URL_CREDENTIALS = re.compile(r"(?i)([a-z][a-z0-9+.\-]*://)[^/@\s]*@")
_TOKENS = re.compile(r"\b(whsec|sk|pk)_[A-Za-z0-9+/=_\-]+")
MAX_CHARS = 500


def redact(text: str) -> str:
    """Mask URL credentials and ``whsec_``/``sk_``/``pk_`` tokens."""
    return _TOKENS.sub(r"\1_***", _URL_CREDENTIALS.sub(r"\1***@", text))


def describe_error(exc: BaseException) -> str:
    """One line naming an error, fit for logs and storage: no SQL parameters, bodies or secrets.

    SQLAlchemy's own message appends the statement and its parameters (event data); the
    driver's first line names the problem without them.
    """
    orig = getattr(exc, "orig", None)
    source = orig if isinstance(orig, BaseException) else exc
    lines = str(source).strip().splitlines()
    text = f"{type(source).__name__}: {lines[0]}" if lines else type(source).__name__
    return redact(text)[:MAX_CHARS]
