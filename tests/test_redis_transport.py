"""The Redis transport: acknowledging on a channel whose connection is gone is a lost connection."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from kombu import Message
from redis.exceptions import ConnectionError as RedisConnectionError

from models.settings import Settings
from worker.app import create_celery
from worker.redis_transport import RedisTransport


def test_redis_brokers_use_the_guarded_transport_and_others_keep_their_own(tmp_path: Path) -> None:
    def transport_of(url: str) -> type:
        app = create_celery(Settings.from_env({"BROKER_URL": url, "ORGSYNC_DATA_DIR": str(tmp_path)}))
        return type(app.connection_for_write().transport)

    assert transport_of("redis://127.0.0.1:6379/0") is RedisTransport
    # TLS comes from the rediss:// scheme itself, so that one keeps kombu's own resolution.
    assert transport_of("rediss://127.0.0.1:6379/0") is not RedisTransport


@pytest.mark.redis
def test_a_late_ack_after_the_connection_closed_is_logged_not_raised(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_celery(Settings.from_env({"BROKER_URL": redis_url, "ORGSYNC_DATA_DIR": str(tmp_path)}))
    connection = app.connection_for_write()
    channel = connection.channel()
    message = Message(body=b"{}", channel=channel, delivery_tag="tag-1")
    connection.close()  # the broker went away while the task ran
    errors = connection.connection_errors + connection.channel_errors
    logger = logging.getLogger("test.redis_transport")
    with caplog.at_level(logging.CRITICAL, logger="test.redis_transport"):
        # Celery acknowledges a late-ack task this way; an AttributeError here crashed the worker.
        message.ack_log_error(logger, errors)
    [record] = caplog.records
    assert "Couldn't ack 'tag-1'" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is RedisConnectionError
