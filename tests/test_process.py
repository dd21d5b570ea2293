"""``worker.process.PerProcess``: built once per process, closed where built, forgotten after a fork."""

from __future__ import annotations

import os
from itertools import count

import pytest

from worker import process as process_module
from worker.process import PerProcess


def test_built_on_first_use_once_and_closed_by_stop() -> None:
    built = count(1)
    closed: list[int] = []
    holder = PerProcess(lambda: next(built), close=closed.append, forget=lambda _: pytest.fail("forgotten"))
    assert closed == []
    assert holder.get() == holder.get() == 1
    holder.stop()
    assert closed == [1]
    assert holder.get() == 2
    holder.stop()
    holder.stop()
    assert closed == [1, 2]


def test_a_forked_child_forgets_the_parents_value_and_builds_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    built = count(1)
    closed: list[int] = []
    forgotten: list[int] = []
    holder = PerProcess(lambda: next(built), close=closed.append, forget=forgotten.append)
    assert holder.get() == 1
    child = os.getpid() + 1
    monkeypatch.setattr(process_module.os, "getpid", lambda: child)
    assert holder.get() == 2
    assert (forgotten, closed) == ([1], [])


def test_a_value_from_another_process_is_not_closed_by_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[str] = []
    holder = PerProcess(lambda: "parent's", close=closed.append)
    holder.get()
    child = os.getpid() + 1
    monkeypatch.setattr(process_module.os, "getpid", lambda: child)
    holder.stop()
    assert closed == []


def test_a_failed_build_is_tried_again() -> None:
    attempts: list[int] = []

    def build() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("not configured")
        return 7

    holder = PerProcess(build)
    with pytest.raises(RuntimeError):
        holder.get()
    assert holder.get() == 7
