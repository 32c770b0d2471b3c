"""PerLoop: one object per event loop, the library's one answer to "a pool belongs to one loop".

An ``httpx.AsyncClient``, a redis-py connection pool or an ``asyncio.Event`` may only be used
on the event loop it was first used on. Code in this library (and in a store or coordinator
written against the public kit) runs on whatever loop its caller runs: uvicorn's, a fresh one
per ``TestClient`` request or ``asyncio.run``, or the private loop that serves blocking
callers. So every such object is kept per loop: created on first use there, closed when that
loop shuts down (``asyncio.run``, ``asyncio.Runner`` and the servers built on them finalize
async generators on the way out, which is where we hook in), forgotten after ``fork``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["PerLoop"]

T = TypeVar("T")

# Every PerLoop, so that a forked child forgets the objects of its parent's loops.
_instances: weakref.WeakSet[PerLoop[Any]] = weakref.WeakSet()


class _Entry(Generic[T]):
    """One loop's object, and the async generator that lets go of it (closing it, if there is
    a ``close``) when the loop shuts down."""

    __slots__ = ("__weakref__", "closed", "closer", "value")

    def __init__(self, value: T) -> None:
        self.value = value
        self.closed = False
        self.closer: AsyncGenerator[None, None] | None = None

    def watch(self, owner: PerLoop[T], close: Callable[[T], Awaitable[None]] | None) -> None:
        # Advanced to its ``yield`` at once, on the running loop: the loop now tracks it and
        # closes it (running the ``finally``) when it shuts down.
        self.closer = _at_shutdown(self, owner, close)
        _step(self.closer.__anext__())

    def detach(self) -> None:
        """Someone closes the value themselves: the loop's shutdown must not do it again."""
        self.closed = True
        if self.closer is not None:
            _step(self.closer.aclose())
            self.closer = None


async def _at_shutdown(
    entry: _Entry[T], owner: PerLoop[T], close: Callable[[T], Awaitable[None]] | None
) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        # A finished generator still holds the loop (its finalizer hook), and the object may
        # too (an asyncio.Event, a future): let go of both, or the loop is never collected.
        entry.closer = None
        owner._drop(asyncio.get_running_loop(), entry)
        if close is not None and not entry.closed:
            entry.closed = True
            await close(entry.value)


def _step(awaitable: Awaitable[Any]) -> None:
    """Run ``awaitable`` up to its first suspension, which for these is its end."""
    coro = awaitable.__await__()
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()  # pragma: no cover - never suspends


class PerLoop(Generic[T]):
    """``factory()``'s result for the running event loop, made on first use in that loop.

        self._redis = PerLoop(make_client, close=lambda client: client.aclose())
        ...
        await self._redis.get().get(key)        # this loop's client, wherever we are called

    When the loop shuts down the object is dropped, and ``close``, if given, is awaited on that
    loop first, unless :meth:`pop` took the object already.
    """

    __slots__ = ("__weakref__", "_by_loop", "_close", "_factory", "_lock")

    def __init__(
        self, factory: Callable[[], T], *, close: Callable[[T], Awaitable[None]] | None = None
    ) -> None:
        self._factory = factory
        self._close = close
        # Weak keys: a loop that nobody references any more takes its object with it.
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Entry[T]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()  # guards creation, so one loop never gets two objects
        _instances.add(self)

    def __repr__(self) -> str:
        return f"PerLoop(loops={len(self._by_loop)})"

    def get(self) -> T:
        """The running loop's object (``RuntimeError`` outside a running loop)."""
        loop = asyncio.get_running_loop()
        entry = self._by_loop.get(loop)
        if entry is None:
            with self._lock:
                entry = self._by_loop.get(loop)
                if entry is None:
                    entry = self._by_loop[loop] = _Entry(self._factory())
                    entry.watch(self, self._close)
        return entry.value

    def pop(self) -> T | None:
        """Remove and return the running loop's object, if it was made (to close it now)."""
        with self._lock:
            entry = self._by_loop.pop(asyncio.get_running_loop(), None)
        if entry is None:
            return None
        entry.detach()
        return entry.value

    def _drop(self, loop: asyncio.AbstractEventLoop, entry: _Entry[T]) -> None:
        with self._lock:
            if self._by_loop.get(loop) is entry:
                del self._by_loop[loop]

    def _forget_all(self) -> None:
        self._lock = threading.Lock()
        self._by_loop = weakref.WeakKeyDictionary()


def _after_fork_in_child() -> None:
    for instance in list(_instances):
        instance._forget_all()


os.register_at_fork(after_in_child=_after_fork_in_child)
