"""MemorySessionStore: server-side sessions in this process's memory."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Unpack

from ._clock import Clock, SystemClock
from ._errors import ConfigurationError
from ._sessions import BackendSessionStore, Session, SessionCookie, supersedes
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
        # id -> (session, monotonic deadline), oldest write first. The Session is kept whole
        # so that loading one allocates nothing.
        self._entries: dict[str, tuple[Session, float]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        now = self._monotonic()
        return sum(deadline > now for _, deadline in list(self._entries.values()))

    def peek(self, session_id: str) -> Session | None:
        """The live session, without a coroutine (loading one runs on every request)."""
        entry = self._entries.get(session_id)
        if entry is None or entry[1] <= self._monotonic():
            return None
        return entry[0]

    async def get(self, session_id: str) -> TokenSet | None:
        session = self.peek(session_id)
        return None if session is None else session.token_set

    async def put(self, session_id: str, token_set: TokenSet, ttl: float, *, create: bool) -> bool:
        with self._lock:
            stored = self.peek(session_id)
            if stored is None and not create:
                return False
            if not supersedes(token_set, None if stored is None else stored.token_set):
                return False
            self._entries.pop(session_id, None)  # re-inserted last: the newest write
            self._entries[session_id] = (Session(token_set, session_id), self._monotonic() + ttl)
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
        max_sessions: int = 100_000,
        clock: Clock | None = None,
        **cookie: Unpack[SessionCookie],
    ) -> None:
        self._memory = MemoryBackend(max_sessions=max_sessions, clock=clock or SystemClock())
        super().__init__(self._memory, **cookie)
        self.max_sessions = max_sessions

    def __len__(self) -> int:
        return len(self._memory)

    async def load(self, cookies: Mapping[str, str]) -> Session | None:
        # BackendSessionStore.load without awaiting the backend: this runs on every request.
        session_id = cookies.get(self.cookie_name)
        return self._memory.peek(session_id) if session_id else None

    def __repr__(self) -> str:
        return f"MemorySessionStore(cookie_name={self.cookie_name!r}, sessions={len(self)})"
