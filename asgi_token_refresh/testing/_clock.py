"""A clock for tests: time moves only when the test says so, so nothing sleeps."""

from __future__ import annotations

import threading


class FakeClock:
    """A :class:`~asgi_token_refresh._clock.Clock` that only moves when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._time = start
        self._monotonic = 1000.0

    def time(self) -> float:
        """Wall-clock seconds since the epoch."""
        with self._lock:
            return self._time

    def monotonic(self) -> float:
        """Monotonic seconds; moves together with :meth:`time`."""
        with self._lock:
            return self._monotonic

    def advance(self, seconds: float) -> None:
        """Move both readings forward; time never goes backwards."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._time += seconds
            self._monotonic += seconds

    def __repr__(self) -> str:
        return f"FakeClock(time={self.time()!r})"
