"""A TCP proxy on loopback that a test switches between pass, cut and blackhole (network faults).

``TcpProxy(target_host, target_port)`` listens on 127.0.0.1 in its own thread (so it keeps working
while the test's event loop is blocked, and for clients in other processes too) and forwards each
accepted connection to the target:

- ``restore()``: pass traffic (the start state);
- ``cut()``: close every connection at once (the peers see a reset) and refuse new ones (accepted and
  closed at once: what a client sees when a server or a firewall resets it);
- ``blackhole()``: keep connections open but forward nothing, and accept new ones without ever
  connecting them (a dropped network: no reset, only silence; clients need their own timeouts);
- ``cut_on(pattern, forward=True)``: pass traffic, but as soon as a client sends ``pattern`` (e.g.
  ``b"COMMIT"``), forward that data, give the server ``delay_s`` to act on it, and cut before its reply
  comes back (an outcome the client cannot know); with ``forward=False`` the data is dropped instead.

``retarget(port)`` points new connections at another server port (a restarted server on a new port).
Bounded: at most ``MAX_CONNECTIONS`` at a time; every socket is closed by ``close()``.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

LOOPBACK = "127.0.0.1"
MAX_CONNECTIONS = 256
CHUNK_BYTES = 65536
# How often the proxy thread wakes to see a mode change or close() (select timeout).
POLL_S = 0.05
CONNECT_TIMEOUT_S = 5.0

Mode = Literal["pass", "cut", "blackhole"]


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket | None


class TcpProxy:
    """A controllable TCP proxy from 127.0.0.1:<port> to a target (see the module docstring)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self.cuts = 0
        self.accepted = 0
        self._cut_pattern: tuple[bytes, bool, float] | None = None
        self.pattern_cuts = 0
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"tcp-proxy-{self.port}", daemon=True)

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start forwarding in the proxy thread."""
        self._thread.start()
        return self

    def restore(self) -> None:
        """Pass traffic again (new connections reach the target)."""
        with self._lock:
            self.mode = "pass"
            self._cut_pattern = None

    def cut(self) -> None:
        """Reset every connection and refuse new ones until restore()."""
        with self._lock:
            self.mode = "cut"
            self.cuts += 1
            self._drop_all()

    def blackhole(self) -> None:
        """Forward nothing, keep connections open, accept new ones without connecting them."""
        with self._lock:
            self.mode = "blackhole"

    def cut_on(self, pattern: bytes, *, forward: bool = True, delay_s: float = 0.2) -> None:
        """Cut (as cut()) when a client sends data containing ``pattern``, forwarded first or dropped."""
        with self._lock:
            self._cut_pattern = (pattern, forward, delay_s)

    def retarget(self, port: int, host: str | None = None) -> None:
        """Send new connections to another port (existing ones are left as they are)."""
        with self._lock:
            self.target = (host or self.target[0], port)

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy."""
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        """Stop the thread and close every socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        with self._lock:
            self._drop_all()
        self._listener.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the proxy thread ------------------------------------------------------------------------

    def _drop_all(self) -> None:
        for pair in self._pairs:
            _reset(pair.client)
            if pair.server is not None:
                _reset(pair.server)
        self._pairs.clear()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                sockets = [self._listener]
                for pair in self._pairs:
                    sockets.append(pair.client)
                    if pair.server is not None:
                        sockets.append(pair.server)
            with selectors.DefaultSelector() as selector:
                for sock in sockets:
                    with contextlib.suppress(ValueError, OSError):
                        selector.register(sock, selectors.EVENT_READ)
                try:
                    ready = selector.select(POLL_S)
                except (OSError, ValueError):
                    continue
            for key, _ in ready:
                sock = key.fileobj
                if not isinstance(sock, socket.socket):
                    continue
                if sock is self._listener:
                    self._accept()
                else:
                    self._forward(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        with self._lock:
            mode, target = self.mode, self.target
            full = len(self._pairs) >= MAX_CONNECTIONS
        if mode == "cut" or full:
            _reset(client)
            return
        self.accepted += 1
        server: socket.socket | None = None
        if mode == "pass":
            try:
                server = socket.create_connection(target, timeout=CONNECT_TIMEOUT_S)
            except OSError:
                _reset(client)  # the target is down: the client sees a reset, as it would without us
                return
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs.append(_Pair(client, server))

    def _pair_of(self, sock: socket.socket) -> _Pair | None:
        for pair in self._pairs:
            if sock is pair.client or sock is pair.server:
                return pair
        return None

    def _forward(self, sock: socket.socket) -> None:
        with self._lock:
            pair = self._pair_of(sock)
            if pair is None:
                return
            mode, pattern = self.mode, self._cut_pattern
        if mode == "blackhole":
            return  # leave the data in the kernel buffers: nothing moves, nothing closes
        try:
            data = sock.recv(CHUNK_BYTES)
        except OSError:
            data = b""
        peer = pair.server if sock is pair.client else pair.client
        if pattern is not None and data and sock is pair.client and pattern[0] in data:
            self._cut_on_pattern(data, peer, forward=pattern[1], delay_s=pattern[2])
            return
        if not data or peer is None:
            with self._lock:
                if pair in self._pairs:
                    self._pairs.remove(pair)
            _close(pair.client)
            if pair.server is not None:
                _close(pair.server)
            return
        try:
            peer.sendall(data)
        except OSError:
            with self._lock:
                if pair in self._pairs:
                    self._pairs.remove(pair)
            _reset(pair.client)
            if pair.server is not None:
                _reset(pair.server)
            return

    def _cut_on_pattern(
        self, data: bytes, peer: socket.socket | None, *, forward: bool, delay_s: float
    ) -> None:
        if forward and peer is not None:
            with contextlib.suppress(OSError):
                peer.sendall(data)
            # The proxy thread waits here: the server acts on the data, its reply stays unread.
            self._stop.wait(delay_s)
        with self._lock:
            self.pattern_cuts += 1
            self._cut_pattern = None
            self.mode = "cut"
            self.cuts += 1
            self._drop_all()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees ECONNRESET at once, as when a link is cut."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
