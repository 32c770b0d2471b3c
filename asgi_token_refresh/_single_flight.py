"""Single flight across event loops and threads, and the one private loop of the library.

Callers of one grant arrive on any loop: uvicorn's, a fresh one per ``TestClient`` request, or
none at all (sync endpoints in a threadpool). The first caller *leads*: the flight runs as a
task on the leader's own loop, detached from the leader's request, so cancelling that request
cancels only its wait (invariant 4) and user code (store hooks, coordinators) runs on the loop
the user chose (invariant 13). Everyone else *joins*: they wait on a future of their own loop,
and the flight resolves each future on its loop when it lands.

Blocking callers have no loop; :func:`run_blocking` runs their coroutine on the library's
private loop, a daemon thread started on first use (never at import) and afresh after ``fork``.
No other module knows that loop exists.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import os
import threading
import weakref
from collections import deque
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

__all__ = ["Flight", "SingleFlight", "Slots", "detach", "run_blocking"]

T = TypeVar("T")
P = TypeVar("P")


class Flight(Generic[T, P]):
    """One exchange with the provider and everyone waiting for it. ``payload`` is what the
    leader needs to fly (the refresher's request); the flight itself does not look at it."""

    __slots__ = ("key", "payload", "waiters")

    def __init__(self, key: bytes, payload: P) -> None:
        self.key = key
        self.payload = payload
        self.waiters: list[asyncio.Future[T]] = []  # the leader's first


class SingleFlight(Generic[T, P]):
    """The flights in progress, by key. ``lock`` guards them; the refresher holds it while it
    consults its caches and boards, so that checking and boarding are one step."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._flights: dict[bytes, Flight[T, P]] = {}
        _instances.add(self)

    def __len__(self) -> int:
        return len(self._flights)

    def waiting(self) -> int:
        """Callers parked on a flight now."""
        with self.lock:
            return sum(len(flight.waiters) for flight in self._flights.values())

    def join(self, key: bytes, waiter: asyncio.Future[T]) -> Flight[T, P] | None:
        """Seat ``waiter`` on the flight for ``key``, if one is in the air. Needs ``lock``."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters.append(waiter)
        return flight

    def start(self, key: bytes, payload: P, waiter: asyncio.Future[T]) -> Flight[T, P]:
        """A new flight for ``key`` with ``waiter`` as its leader, who must :func:`detach` it.
        Needs ``lock``, and no flight for ``key`` in the air."""
        flight = self._flights[key] = Flight(key, payload)
        flight.waiters.append(waiter)
        return flight

    def land(self, flight: Flight[T, P]) -> list[asyncio.Future[T]] | None:
        """Take ``flight`` off the board and hand back its waiters, or ``None`` if it has
        landed already. Needs ``lock``: the caller fills its caches in the same step."""
        if self._flights.get(flight.key) is not flight:
            return None
        del self._flights[flight.key]
        waiters, flight.waiters = flight.waiters, []
        return waiters

    def _after_fork_in_child(self) -> None:
        # Flights in progress belong to the parent's loops and threads.
        self.lock = threading.Lock()
        self._flights = {}


def release(
    waiters: list[asyncio.Future[T]], result: T | None, error: BaseException | None
) -> None:
    """Resolve every waiter on its own loop: the result, or each a copy of the error (one
    exception raised from many tasks would splice their tracebacks together)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[T]]] = {}
    for waiter in waiters:
        by_loop.setdefault(waiter.get_loop(), []).append(waiter)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: its callers are gone
            loop.call_soon_threadsafe(_resolve, group, result, error)


def _resolve(
    waiters: list[asyncio.Future[T]], result: T | None, error: BaseException | None
) -> None:
    for waiter in waiters:
        if waiter.done():  # that caller was cancelled; the flight does not care
            continue
        if error is None:
            waiter.set_result(result)  # type: ignore[arg-type]
        else:
            waiter.set_exception(copy.copy(error))


# Flights in progress, strongly held: the event loop keeps only weak references to tasks.
_detached: set[asyncio.Task[Any]] = set()


def detach(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on the running loop as a task no caller owns (it outlives the request
    that started it; only the loop's own shutdown ends it)."""
    task = asyncio.get_running_loop().create_task(coro)
    _detached.add(task)
    task.add_done_callback(_detached.discard)


class Slots:
    """At most ``size`` holders at once, first come first served, across loops and threads
    (an ``asyncio.Semaphore`` belongs to one loop; flights lead on many)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()  # guards _free and _queue
        self._free = size
        self._queue: deque[asyncio.Future[None]] = deque()
        _instances.add(self)

    async def __aenter__(self) -> None:
        with self._lock:
            if self._free and not self._queue:
                self._free -= 1
                return
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            with self._lock:
                if turn in self._queue:  # never granted: just leave the queue
                    self._queue.remove(turn)
                    raise
            if not turn.cancelled():  # granted, then cancelled before resuming: pass it on
                self._release()
            raise  # (a cancelled turn is passed on by _grant)

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        with self._lock:
            while self._queue:
                turn = self._queue.popleft()
                try:
                    turn.get_loop().call_soon_threadsafe(self._grant, turn)
                except RuntimeError:  # its loop is closed: next in line
                    continue
                return
            self._free += 1

    def _grant(self, turn: asyncio.Future[None]) -> None:
        if turn.done():  # cancelled while the grant was on its way
            self._release()
        else:
            turn.set_result(None)

    def _after_fork_in_child(self) -> None:
        # No flight of the parent runs in the child: every slot is free.
        self._lock = threading.Lock()
        self._queue = deque()
        self._free = self._size


# -- the private loop, for callers that have none ---------------------------------------------


class _PrivateLoop:
    """A lazily started event loop running forever on a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _loop while it is being started
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
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

        threading.Thread(target=run, name="asgi-token-refresh-blocking", daemon=True).start()
        ready.wait()
        return loop

    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork; its loop is unusable. Start a new one on demand.
        self._lock = threading.Lock()
        self._loop = None


_private = _PrivateLoop()


def run_blocking(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` for a caller without an event loop (a sync endpoint in a worker thread)
    and block until it is done. Refused inside a running loop, which it would freeze."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            coro, _private.get()
        )
        return future.result(timeout)
    coro.close()
    raise RuntimeError("blocking call made from inside an event loop; use the async API")


# Objects holding locks and futures that a forked child must not inherit.
_instances: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    _private._after_fork_in_child()
    _detached.clear()
    for instance in list(_instances):
        instance._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
