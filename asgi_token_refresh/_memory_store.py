"""MemorySessionStore: server-side sessions in this process's memory."""

from __future__ import annotations

import threading

from ._clock import Clock, SystemClock
from ._cookies import DEFAULT_MAX_AGE, SameSite
from ._errors import ConfigurationError
from ._sessions import BackendSessionStore, supersedes
from ._tokens import TokenSet

__all__ = ["MemoryBackend", "MemorySessionStore"]


class MemoryBackend:
    """Token sets by session id in a dict, bounded: at most ``max_sessions``, each until its
    TTL; when full, the least recently written goes first. Reads take no lock (``dict.get``
    is atomic, and loading runs on every request); writers hold ``_lock``."""

    def __init__(self, *, max_sessions: int, clock: Clock) -> None:
        if max_sessions < 1:
            raise ConfigurationError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self._monotonic = clock.monotonic
        # id -> (token set, monotonic deadline), oldest write first.
        self._entries: dict[str, tuple[TokenSet, float]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        now = self._monotonic()
        return sum(deadline > now for _, deadline in list(self._entries.values()))

    def _live(self, session_id: str) -> TokenSet | None:
        entry = self._entries.get(session_id)
        if entry is None or entry[1] <= self._monotonic():
            return None
        return entry[0]

    async def get(self, session_id: str) -> TokenSet | None:
        return self._live(session_id)

    async def put(self, session_id: str, token_set: TokenSet, ttl: float) -> bool:
        with self._lock:
            if not supersedes(token_set, self._live(session_id)):
                return False
            self._entries.pop(session_id, None)  # re-inserted last: the newest write
            self._entries[session_id] = (token_set, self._monotonic() + ttl)
            while len(self._entries) > self.max_sessions:
                del self._entries[next(iter(self._entries))]
            return True

    async def delete(self, session_id: str) -> None:
        with self._lock:
            self._entries.pop(session_id, None)


class MemorySessionStore(BackendSessionStore):
    """Sessions in this process's memory, behind an opaque random id in a cookie.

    The embedded default for one process: nothing to configure, tokens never leave the server.
    Bounded: at most ``max_sessions``, each kept ``max_age`` seconds after its last write (a
    login or a refresh); when full, the least recently written goes first. Sessions do not
    survive a restart and are not shared between workers; use RedisSessionStore for that. A
    login always issues a new id (no fixation).
    """

    def __init__(
        self,
        *,
        cookie_name: str = "atr_sid",
        secure: bool = True,
        same_site: SameSite = "lax",
        path: str = "/",
        domain: str | None = None,
        max_age: float = DEFAULT_MAX_AGE,
        max_sessions: int = 100_000,
        clock: Clock | None = None,
    ) -> None:
        self._memory = MemoryBackend(max_sessions=max_sessions, clock=clock or SystemClock())
        super().__init__(
            self._memory,
            cookie_name=cookie_name,
            secure=secure,
            same_site=same_site,
            path=path,
            domain=domain,
            max_age=max_age,
        )
        self.max_sessions = max_sessions

    def __len__(self) -> int:
        return len(self._memory)

    def __repr__(self) -> str:
        return f"MemorySessionStore(cookie_name={self.cookie_name!r}, sessions={len(self)})"
