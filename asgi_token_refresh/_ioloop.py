"""The library's own event loop, on a daemon thread, where all token-endpoint I/O runs.

Requests arrive on whatever loop the server runs (uvicorn's, a fresh one per ``TestClient``
request, none at all in a threadpool). A flight must outlive the request that started it and be
joinable from all of them, and an ``httpx.AsyncClient``'s connection pool belongs to exactly one
loop. So flights and their HTTP calls run here, on one long-lived loop that no caller can close,
and callers on any loop or thread wait for them. The loop starts on first use (never at import
or construction) and is started afresh in a child after ``fork``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

__all__ = ["IOLoop", "io_loop", "reset_after_fork"]

T = TypeVar("T")


class _ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


# Objects holding state tied to the I/O loop (futures, semaphores, connection pools, flights in
# progress). In a forked child that loop's thread no longer exists, so they must forget it.
_fork_aware: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


def reset_after_fork(obj: _ForkAware) -> None:
    """Call ``obj._after_fork_in_child()`` in every child process forked from now on."""
    _fork_aware.add(obj)


def _after_fork_in_child() -> None:
    io_loop._after_fork_in_child()
    for obj in list(_fork_aware):
        obj._after_fork_in_child()


class IOLoop:
    """A lazily started event loop running forever on a daemon thread."""

    def __init__(self, name: str = "asgi-token-refresh-io") -> None:
        self._name = name
        self._lock = threading.Lock()  # guards _loop while it is being started
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            with self._lock:
                if self._loop is None:
                    self._loop = self._start()
                loop = self._loop
        return loop

    def _start(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        threading.Thread(target=run, name=self._name, daemon=True).start()
        ready.wait()
        return loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the I/O loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the I/O loop and await it from the caller's loop.

        Cancelling the caller cancels ``coro`` too: use this for work that belongs to one caller.
        """
        loop = self.loop
        if asyncio.get_running_loop() is loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the I/O loop and block the calling thread (never the I/O loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self.submit(coro).result(timeout)
        coro.close()
        raise RuntimeError("blocking call made from inside an event loop; use the async API")

    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork; its loop is unusable. Start a new one on demand.
        self._lock = threading.Lock()
        self._loop = None


io_loop = IOLoop()
os.register_at_fork(after_in_child=_after_fork_in_child)
