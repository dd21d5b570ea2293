"""A value of one process (an engine, a Backend API client), built on first use after any fork."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerProcess(Generic[T]):
    """``build()`` once per process, on the first ``get()``; built again in a forked child.

    Connection pools must never be shared between processes, and the parent may have built
    its value before forking workers. ``close`` ends the value in the process that built it
    (``stop``); ``forget`` drops a value inherited through fork without closing what the
    parent still uses.
    """

    def __init__(
        self,
        build: Callable[[], T],
        *,
        close: Callable[[T], None] | None = None,
        forget: Callable[[T], None] | None = None,
    ) -> None:
        self._build = build
        self._close = close
        self._forget = forget
        self._lock = threading.Lock()
        self._value: T | None = None
        self._pid: int | None = None

    def get(self) -> T:
        with self._lock:
            pid = os.getpid()
            if self._value is None or self._pid != pid:
                if self._value is not None and self._forget is not None:
                    self._forget(self._value)
                self._value = None
                self._value = self._build()
                self._pid = pid
            return self._value

    def stop(self) -> None:
        """Close this process's value; the next ``get()`` builds a new one."""
        with self._lock:
            value, built_here = self._value, self._pid == os.getpid()
            self._value = None
            self._pid = None
            if value is not None and built_here and self._close is not None:
                self._close(value)
