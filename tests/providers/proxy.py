"""A TCP proxy on loopback that can lose a provider's answer: the request reaches the provider,
the provider handles it (a refresh token consumed, a new one issued), and the client sees its
connection close without a response, as after a timeout or a reset on the way back.

    with LossyProxy(provider_port) as proxy:     # listens on proxy.port
        proxy.lose_answer_to(b"grant_type=refresh_token")
        ...                                      # the first such request is lost
        assert proxy.lost == 1

HTTP/1.1 clients (httpx) send one request and wait for its answer before the next on a
connection, so the bytes a client sent since the provider last answered are the request the
next answer belongs to. The answer is dropped when its first bytes arrive: the provider has
finished handling the request by then.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Callable
from types import TracebackType

from ..processes import HOST, free_port


class LossyProxy:
    """Forwards connections from ``port`` to ``HOST:target_port``, byte for byte."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port(avoid={target_port})
        self.lost = 0  # answers lost so far
        self._marker: bytes | None = None
        self._lock = threading.Lock()  # guards _marker and lost
        self._listener = socket.create_server((HOST, self.port))
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._closing = threading.Event()

    def lose_answer_to(self, marker: bytes) -> None:
        """Lose the answer to the next request whose bytes contain ``marker``; once."""
        with self._lock:
            self._marker = marker

    def __enter__(self) -> LossyProxy:
        self._start(self._accept)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)  # closing a socket does not wake a blocked accept()
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            client.settimeout(None)
            self._start(self._pipe, client)

    def _take(self, request: bytes) -> bool:
        """Whether the answer to ``request`` is to be lost (and count it)."""
        with self._lock:
            if self._marker is None or self._marker not in request:
                return False
            self._marker = None
            self.lost += 1
            return True

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((HOST, self.target_port), timeout=10)
        except OSError:
            client.close()
            return
        with self._lock:
            self._connections |= {client, upstream}
        try:
            self._forward(client, upstream)
        finally:
            with self._lock:
                self._connections -= {client, upstream}
            client.close()  # either side closed, or the answer was lost: close both
            upstream.close()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        request = bytearray()  # what the client sent since the provider last answered
        answering = False
        peer = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ)
            selector.register(upstream, selectors.EVENT_READ)
            while not self._closing.is_set():
                for key, _ in selector.select(timeout=0.5):
                    source = client if key.fileobj is client else upstream
                    try:
                        data = source.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if source is client:
                        if answering:  # a new request on a kept-alive connection
                            request.clear()
                            answering = False
                        request += data
                    elif not answering:
                        answering = True
                        if self._take(bytes(request)):
                            return  # lost: the client sees its connection closed
                    peer[source].sendall(data)
