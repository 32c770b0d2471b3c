"""Time, in one place.

Every other module asks a :class:`Clock` for the time, so tests (and ``FakeClock``) can move it
without sleeping. Two readings exist because they answer different questions: wall time for
``expires_at`` (it is persisted in cookies and shared between hosts), monotonic time for cache
TTLs and durations (it never jumps when NTP adjusts the wall clock).
"""

from __future__ import annotations

import time as _time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of time. Implementations must be thread-safe."""

    def time(self) -> float:
        """Seconds since the Unix epoch (wall time)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards."""
        ...


class SystemClock:
    """The real clock."""

    __slots__ = ()

    # Bound straight to the C functions: the fresh-token path reads the clock on every request.
    time = staticmethod(_time.time)
    monotonic = staticmethod(_time.monotonic)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
