"""The dispatcher: coalesced, chunked hand-off of inbox ids that survives broker failures."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from models.redact import redact
from webhooks.dispatch import Dispatcher


class Recorder:
    """A ``send`` that records its calls; the first call can be held until released."""

    def __init__(self, *, hold_first: bool = False, fail_first: int = 0) -> None:
        self.calls: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_first = fail_first

    def __call__(self, ids: list[int]) -> None:
        self.entered.set()
        self.release.wait()
        if self.fail_first > 0:
            self.fail_first -= 1
            raise ConnectionError("redis://:hunter2@broker:6379/0 refused")
        self.calls.append(list(ids))


def test_thread_starts_lazily_and_is_a_daemon() -> None:
    dispatcher = Dispatcher(Recorder())
    assert not dispatcher.running
    dispatcher.submit([1])
    assert dispatcher.running
    assert dispatcher._thread is not None and dispatcher._thread.daemon
    dispatcher.close()
    assert not dispatcher.running


def test_many_submits_coalesce_into_few_sends() -> None:
    send = Recorder(hold_first=True)
    dispatcher = Dispatcher(send, interval=0)
    dispatcher.submit([0])
    assert send.entered.wait(10)
    # While the first send is in flight, every submit lands in the next batch.
    for inbox_id in range(1, 200):
        dispatcher.submit([inbox_id])
    send.release.set()
    assert dispatcher.flush()
    assert send.calls == [[0], list(range(1, 200))]
    dispatcher.close()


def test_large_batches_are_chunked() -> None:
    send = Recorder()
    dispatcher = Dispatcher(send, max_batch=10)
    dispatcher.submit(range(25))
    assert dispatcher.flush()
    assert send.calls == [list(range(10)), list(range(10, 20)), list(range(20, 25))]
    dispatcher.close()


def test_duplicate_ids_in_one_batch_are_sent_once() -> None:
    send = Recorder()
    dispatcher = Dispatcher(send)
    dispatcher.submit([3, 3, 4, 3])
    assert dispatcher.flush()
    assert send.calls == [[3, 4]]
    dispatcher.close()


def test_send_failure_does_not_kill_the_thread(caplog: pytest.LogCaptureFixture) -> None:
    send = Recorder(fail_first=1)
    dispatcher = Dispatcher(send)
    with caplog.at_level(logging.INFO, logger="webhooks.dispatch"):
        dispatcher.submit([1])
        assert dispatcher.flush()
        assert send.calls == []
        assert dispatcher.running
        dispatcher.submit([2])
        assert dispatcher.flush()
    assert send.calls == [[2]]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings and "ConnectionError" in warnings[0].getMessage()
    # The broker URL's password never reaches the log.
    assert all("hunter2" not in record.getMessage() for record in caplog.records)
    dispatcher.close()


def test_close_flushes_without_waiting_for_the_interval() -> None:
    send = Recorder()
    dispatcher = Dispatcher(send, interval=3600)
    dispatcher.submit([1])
    assert dispatcher.flush()
    # The next send is an hour away by the pacing; close must not wait for it.
    dispatcher.submit([2, 3])
    dispatcher.close()
    assert send.calls == [[1], [2, 3]]
    assert not dispatcher.running


def test_submit_after_close_is_ignored_and_close_is_idempotent() -> None:
    send = Recorder()
    dispatcher = Dispatcher(send)
    dispatcher.close()
    dispatcher.submit([1])
    dispatcher.close()
    assert send.calls == []
    assert dispatcher.flush()


def test_flush_with_nothing_submitted_returns_at_once() -> None:
    dispatcher = Dispatcher(Recorder())
    assert dispatcher.flush()
    assert not dispatcher.running


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Dispatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="interval"):
        Dispatcher(Recorder(), interval=-1)


def test_redact_masks_credentials_and_keys() -> None:
    message = redact("cannot reach redis://user:pw@host:6379/0 with whsec_abc+/= or sk_live_xyz")
    assert "pw@" not in message
    assert "whsec_abc" not in message
    assert "sk_live_xyz" not in message
    assert "redis://***@host:6379/0" in message


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_thread() -> None:
    read_fd, write_fd = os.pipe()

    def send(ids: list[int]) -> None:
        os.write(write_fd, (",".join(map(str, ids)) + f"@{os.getpid()}\n").encode())

    dispatcher = Dispatcher(send)
    dispatcher.submit([1])
    assert dispatcher.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and its exit code
        code = 1
        try:
            dispatcher.submit([2])
            code = 0 if dispatcher.flush(timeout=10) else 2
            dispatcher.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    os.close(write_fd)
    with os.fdopen(read_fd) as reader:
        lines = reader.read().splitlines()
    assert os.waitstatus_to_exitcode(status) == 0
    assert lines == [f"1@{os.getpid()}", f"2@{pid}"]
    dispatcher.close()


def test_backlog_is_bounded_while_a_send_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("webhooks.dispatch.MAX_PENDING", 5)
    send = Recorder(hold_first=True)
    dispatcher = Dispatcher(send, interval=0)
    dispatcher.submit([0])
    assert send.entered.wait(10)
    dispatcher.submit(range(1, 4))
    dispatcher.submit(range(4, 10))  # only 4 and 5 fit; the rest stay pending for the sweeper
    send.release.set()
    assert dispatcher.flush()
    assert send.calls == [[0], [1, 2, 3, 4, 5]]
    dispatcher.close()
