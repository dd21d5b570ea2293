"""kombu's Redis transport, with a closed channel failing as a lost connection.

A late-acknowledged task that finishes while the broker is away acknowledges on a channel
whose connection kombu has already closed. kombu then reads the closed connection's settings
and raises ``AttributeError``, which Celery does not count among connection errors: the worker
crashes instead of logging the lost acknowledgement and reconnecting (the message is delivered
again after the visibility timeout, and applying it twice is harmless). Here the same moment
raises redis' ``ConnectionError``, which Celery and kombu handle as the outage it is.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

TRANSPORT = f"{__name__}:RedisTransport"


class RedisChannel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            raise RedisConnectionError("the broker connection of this channel is closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]
        return params


class RedisTransport(kombu_redis.Transport):
    Channel = RedisChannel
