"""The one error hierarchy of orgsync: retryable versus permanent, translated at the edges.

``OrgsyncError`` is the root. Everything below it is either:

* ``RetryableError``: the same call may succeed later (database or broker unreachable, a
  lock timeout, a 5xx or 429 from Clerk). HTTP views answer 503, tasks retry with backoff.
* ``PermanentError``: retrying cannot help (bad configuration, a payload that cannot be
  interpreted, a business refusal from Clerk). Views answer 4xx, tasks record and stop.

Every error class of orgsync derives from one of the two (``ClerkApiError`` is the shared base
of Clerk's transient and refused answers), ends in ``Error``, and has a name no other module
of orgsync uses. The common ones live here; the others next to the code that raises them.

Messages never contain secrets: they name the setting or field, not its value.
"""

from __future__ import annotations


class OrgsyncError(Exception):
    """Root of every error orgsync raises on purpose."""


class RetryableError(OrgsyncError):
    """A transient failure: the same operation may succeed if tried again later."""


class PermanentError(OrgsyncError):
    """A failure that retrying cannot fix."""


class ConfigError(PermanentError):
    """A setting is missing or malformed; raised at start-up, before anything listens."""


class PayloadError(PermanentError):
    """A verified webhook body that cannot be interpreted as a Clerk event."""


class OrganizationNotFoundError(PermanentError):
    """An organization id or slug that neither the mirror (nor, where asked, Clerk) knows."""
