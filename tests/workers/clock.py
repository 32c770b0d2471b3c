"""Wall time that only the test moves, shared by the test and every worker process.

Separate processes cannot share a ``FakeClock``, so they share a file that holds the wall time:
the test moves it with :meth:`SharedClock.advance` (the file is replaced atomically) and every
process reads the same instant. A token is due exactly when the test says so, however long a
round of requests takes on a loaded machine; it never becomes due in the middle of one.

Monotonic time stays the real one: caches, remembered refusals, lease waits and timeouts run as
in production, and the Redis leases expire in real time anyway.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class SharedClock:
    """A :class:`~asgi_token_refresh.Clock` whose wall time is the number in ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> SharedClock:
        """A new shared clock at ``path``, starting at the real wall time."""
        clock = cls(path)
        clock._write(time.time())
        return clock

    def time(self) -> float:
        return float(self.path.read_text())

    def monotonic(self) -> float:
        return time.monotonic()

    def advance(self, seconds: float) -> None:
        """Move the wall time forward for every process; it never goes backwards."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._write(self.time() + seconds)

    def _write(self, value: float) -> None:
        staged = self.path.with_name(self.path.name + ".new")
        staged.write_text(repr(value))
        os.replace(staged, self.path)  # readers see the old value or the new one, never half

    def __repr__(self) -> str:
        return f"SharedClock({str(self.path)!r})"
