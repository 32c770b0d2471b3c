"""PerLoop: one object per event loop, the library's one answer to "a pool belongs to one loop".

An ``httpx.AsyncClient``, a redis-py connection pool or an ``asyncio.Event`` may only be used
on the event loop it was first used on. Code in this library (and in a store or coordinator
written against the public kit) runs on whatever loop its caller runs: uvicorn's, a fresh one
per ``TestClient`` request, or the private loop that serves blocking callers. So every such
object is kept per loop: created on first use there, forgotten when the loop is garbage
collected or after ``fork`` (the child has none of the parent's loops' sockets).
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["PerLoop"]

T = TypeVar("T")

# Every PerLoop, so that a forked child forgets the objects of its parent's loops.
_instances: weakref.WeakSet[PerLoop[Any]] = weakref.WeakSet()


class PerLoop(Generic[T]):
    """``factory()``'s result for the running event loop, made on first use in that loop.

    self._redis = PerLoop(lambda: redis.asyncio.Redis.from_url(url))
    ...
    await self._redis.get().get(key)        # this loop's client, wherever we are called
    """

    __slots__ = ("__weakref__", "_by_loop", "_factory", "_lock")

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        # Weak keys: a closed loop that nobody references takes its object with it.
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()  # guards creation, so one loop never gets two objects
        _instances.add(self)

    def __repr__(self) -> str:
        return f"PerLoop(loops={len(self._by_loop)})"

    def get(self) -> T:
        """The running loop's object (``RuntimeError`` outside a running loop)."""
        loop = asyncio.get_running_loop()
        value = self._by_loop.get(loop)
        if value is None:
            with self._lock:
                value = self._by_loop.get(loop)
                if value is None:
                    value = self._by_loop[loop] = self._factory()
        return value

    def pop(self) -> T | None:
        """Remove and return the running loop's object, if it was made (to close it)."""
        with self._lock:
            return self._by_loop.pop(asyncio.get_running_loop(), None)

    def _forget_all(self) -> None:
        self._lock = threading.Lock()
        self._by_loop = weakref.WeakKeyDictionary()


def _after_fork_in_child() -> None:
    for instance in list(_instances):
        instance._forget_all()


os.register_at_fork(after_in_child=_after_fork_in_child)
