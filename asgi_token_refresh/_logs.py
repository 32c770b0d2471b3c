"""Log lines a person can follow: never a token, and never one line per request.

Every module logs under its own name (``asgi_token_refresh._flight``...). Whatever a client can
make happen on every request (a tampered cookie, a cookie sealed under a dropped key) goes
through :class:`Throttle`: one line per reason a minute, saying how many it left out. Grants
and sessions are named by :func:`fingerprint`, the start of a keyed hash that means nothing
outside this process.
"""

from __future__ import annotations

import logging
import threading

from ._clock import SYSTEM_CLOCK, Clock

__all__ = ["Throttle", "fingerprint"]


def fingerprint(key: bytes) -> str:
    """A short name for a keyed hash (``_keys``): enough to follow one grant through the
    logs of one process, nothing to learn the token from."""
    return key.hex()[:12]


class Throttle:
    """At most one line per reason every ``interval`` seconds; the lines in between are
    counted, and the next line says how many were left out.

    ``reason`` must come from a short fixed list: the state kept is one entry per reason.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        *,
        interval: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._monotonic = (clock or SYSTEM_CLOCK).monotonic
        self._lock = threading.Lock()  # guards _quiet_until and _suppressed
        self._quiet_until: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, reason: str, message: str, *args: object) -> None:
        """Log ``message % args`` (the reason is appended), unless a line for ``reason`` was
        logged less than ``interval`` seconds ago; then only count it."""
        if not self._logger.isEnabledFor(self._level):
            return
        now = self._monotonic()
        with self._lock:
            if now < self._quiet_until.get(reason, -1.0):
                self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
                return
            self._quiet_until[reason] = now + self._interval
            suppressed = self._suppressed.pop(reason, 0)
        if suppressed:
            self._logger.log(
                self._level,
                message + " (%s; %d more since the last such line, not logged)",
                *args,
                reason,
                suppressed,
                stacklevel=2,
            )
        else:
            self._logger.log(self._level, message + " (%s)", *args, reason, stacklevel=2)
