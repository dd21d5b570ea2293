"""A loopback TCP proxy in front of a real server, which a test switches between forwarding,
cutting connections once the server answers, and hanging (connections accepted, nothing passed on).

Placed between ``orgsync serve`` and PostgreSQL it makes database failures of a real process
happen exactly when the test wants them: a request that reached the server but whose answer
never comes back (the commit's outcome unknown to the client), or a stuck proxy.
"""

from __future__ import annotations

import enum
import select
import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from types import TracebackType

_POLL_S = 0.05
_CHUNK = 64 * 1024


class Mode(enum.Enum):
    FORWARD = "forward"
    # Everything the client sends reaches the server; the first bytes the server sends back
    # close both sides instead of being passed on.
    CUT_ON_REPLY = "cut on reply"
    # Connections are accepted and kept open, and nothing is passed on either way (bytes wait
    # in the kernel's buffers until the mode changes back).
    HANG = "hang"


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    server: socket.socket
    closed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.server):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpProxy:
    """``with TcpProxy(host, port) as proxy:`` listens on ``proxy.port`` on 127.0.0.1."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = Mode.FORWARD
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    def __enter__(self) -> TcpProxy:
        self._spawn(self._accept_loop)
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            readable, _, _ = select.select([self._listener], [], [], _POLL_S)
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.add(pair)
            self._spawn(self._pump, pair, client, server, False)
            self._spawn(self._pump, pair, server, client, True)

    def _pump(self, pair: _Pair, source: socket.socket, target: socket.socket, from_server: bool) -> None:
        try:
            while not pair.closed.is_set() and not self._stopped.is_set():
                if self.mode is Mode.HANG:
                    pair.closed.wait(_POLL_S)
                    continue
                readable, _, _ = select.select([source], [], [], _POLL_S)
                if not readable or self.mode is Mode.HANG:
                    continue
                data = source.recv(_CHUNK)
                if not data:
                    break
                if from_server and self.mode is Mode.CUT_ON_REPLY:
                    with self._lock:
                        self.cuts += 1
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            pair.close()
            with self._lock:
                self._pairs.discard(pair)
