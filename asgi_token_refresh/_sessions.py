"""Where a session's token set lives between requests: the store protocols.

Two kinds of store, two protocols. Every store is a :class:`SessionStore`: it loads the
request's session from its cookies and writes changes back as ``Set-Cookie`` values when the
response starts (the cookie store can do nothing more). A :class:`ServerSideStore` keeps the
token set on the server behind an opaque session id, so it can also be read and written
without a response: a refresh that lands after the response started, or after every caller
left, is still saved, and a flight re-reads it before calling the provider.

Writing a server-side store means writing a :class:`SessionBackend` (get, compare-and-set
put, delete by session id) and wrapping it in :class:`BackendSessionStore`, which owns the
session-id cookie. ``docs/extending.md`` walks through one.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, TypedDict, runtime_checkable

from ._cookies import (
    DEFAULT_MAX_AGE,
    CookieWriter,
    SameSite,
    session_max_age,
    validate_cookie_options,
)
from ._errors import RefreshUnavailable
from ._logs import Throttle
from ._tokens import TokenSet

__all__ = [
    "BackendSessionStore",
    "ServerSideStore",
    "Session",
    "SessionBackend",
    "SessionCookie",
    "SessionStore",
    "SizeLimitedStore",
    "new_session_id",
    "supersedes",
]

logger = logging.getLogger(__name__)

# Refreshed token sets a failing backend could not take, kept until it takes them.
_MAX_UNWRITTEN = 10_000
# Held writes retried per request once the backend answers again (the rest: next requests).
_FLUSH_BATCH = 100

# Longer ids are garbage, not sessions: rejected before any backend sees them.
_MAX_SESSION_ID = 128


@dataclass(frozen=True, slots=True, repr=False)
class Session:
    """A session as a store loaded it. ``id`` is the opaque id of server-side stores: a
    credential like the cookie that carries it, so ``repr`` never shows it."""

    token_set: TokenSet
    id: str | None = None

    def __repr__(self) -> str:
        hidden = "" if self.id is None else ", id=<hidden>"
        return f"Session(token_set={self.token_set!r}{hidden})"


def new_session_id() -> str:
    """A fresh, unguessable session id (256 random bits, URL-safe). A login always gets a new
    one, so a session id planted before login is worthless after it (no fixation)."""
    return secrets.token_urlsafe(32)


def supersedes(candidate: TokenSet, stored: TokenSet | None) -> bool:
    """The compare-and-set rule every store keeps: ``candidate`` may replace ``stored`` if it
    is the same token set again or a later generation (:meth:`TokenSet.newer_than`). So a
    slower writer never moves a session back, and of two refreshes of one generation (two
    replicas without a coordinator) the first written stays: the second is a duplicate."""
    return (
        stored is None
        or candidate.access_token == stored.access_token
        or candidate.newer_than(stored)
    )


@runtime_checkable
class SessionStore(Protocol):
    """Persists one token set per browser session, written back through the response.

    Implementations must be safe to call from any thread and event loop.
    """

    async def load(self, cookies: Mapping[str, str]) -> Session | None:
        """The request's session, or ``None`` (absent, expired, tampered: never an error)."""
        ...

    async def save(
        self,
        cookies: Mapping[str, str],
        previous: Session | None,
        token_set: TokenSet | None,
        *,
        new_session: bool = False,
    ) -> tuple[Session | None, list[str]]:
        """Store ``token_set`` for the request that sent ``cookies`` (``None`` clears the
        session); ``new_session`` after a login. Returns the session now current and the
        ``Set-Cookie`` header values to send.
        """
        ...


@runtime_checkable
class ServerSideStore(SessionStore, Protocol):
    """A :class:`SessionStore` that can also be read and written without a response."""

    async def read(self, session: Session) -> TokenSet | None:
        """The token set stored for ``session`` now (another request may have rotated it)."""
        ...

    async def persist(self, session: Session, token_set: TokenSet) -> bool:
        """Save a refreshed token set for ``session`` (compare-and-set: :func:`supersedes`).
        ``False`` if the store already held another token set of that generation or a later
        one: someone else refreshed this session first (the refresh was a duplicate)."""
        ...


@runtime_checkable
class SizeLimitedStore(Protocol):
    """A store that cannot hold every token set (cookies are limited in number and size)."""

    def fits(self, token_set: TokenSet) -> bool:
        """Whether ``token_set`` can be stored; a login that would not fit is refused."""
        ...


@runtime_checkable
class SessionBackend(Protocol):
    """Token sets by session id, on the server. Ordinary async code: it is called on the
    caller's event loop (keep loop-bound clients in a :class:`PerLoop`)."""

    async def get(self, session_id: str) -> TokenSet | None:
        """The stored token set; ``None`` if absent, expired or unreadable (never an error)."""
        ...

    async def put(self, session_id: str, token_set: TokenSet, ttl: float, *, create: bool) -> bool:
        """Store ``token_set`` for ``ttl`` seconds unless a later generation is stored
        (:func:`supersedes`), or, with ``create=False``, unless the session no longer exists
        (a logged-out session never comes back through a late write). ``False`` if it was not
        stored."""
        ...

    async def delete(self, session_id: str) -> None: ...


class SessionCookie(TypedDict, total=False):
    """The session-id cookie's options: :class:`BackendSessionStore`'s keyword arguments, which
    stores built on it pass through (``**cookie: Unpack[SessionCookie]``)."""

    cookie_name: str
    secure: bool
    same_site: SameSite
    path: str
    domain: str | None
    max_age: float


class BackendSessionStore:
    """A :class:`ServerSideStore` over a :class:`SessionBackend`: an opaque random session id
    in an HttpOnly cookie, the token set in the backend. A login always issues a new id; the
    cookie is re-sent on every write, so its Max-Age slides along with the session.

    A refresh the backend cannot take (it is down) is not lost: the new token set is held in
    this process and written when the backend answers again, on the session's next request
    or, for every held session, on the next request that reaches the backend. Until then
    this process serves it. Until then another process would present the spent refresh token,
    so with several workers keep a coordinator (its published outcome serves them).
    """

    def __init__(
        self,
        backend: SessionBackend,
        *,
        cookie_name: str = "atr_sid",
        secure: bool = True,
        same_site: SameSite = "lax",
        path: str = "/",
        domain: str | None = None,
        max_age: float = DEFAULT_MAX_AGE,
    ) -> None:
        validate_cookie_options(cookie_name, same_site, secure, max_age)
        self.backend = backend
        self.cookie_name = cookie_name
        self.max_age = max_age
        self._writer = CookieWriter(
            path=path, domain=domain, secure=secure, same_site=same_site, max_age=max_age
        )
        # Session id -> a refreshed token set the backend failed to take (oldest first).
        self._unwritten: dict[str, TokenSet] = {}
        self._say = Throttle(logger, logging.WARNING)  # an outage fails every write

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cookie_name={self.cookie_name!r})"

    async def load(self, cookies: Mapping[str, str]) -> Session | None:
        session_id = cookies.get(self.cookie_name)
        if not session_id or len(session_id) > _MAX_SESSION_ID:
            return None
        token_set = await self.backend.get(session_id)
        if self._unwritten:
            token_set = await self._write_held(session_id, token_set)
            await self._flush_unwritten()
        return None if token_set is None else Session(token_set, session_id)

    async def save(
        self,
        cookies: Mapping[str, str],
        previous: Session | None,
        token_set: TokenSet | None,
        *,
        new_session: bool = False,
    ) -> tuple[Session | None, list[str]]:
        if previous is not None and previous.id and (new_session or token_set is None):
            await self.backend.delete(previous.id)
        if token_set is None:
            present = self.cookie_name in cookies
            return None, [self._writer.delete(self.cookie_name)] if present else []
        existing = previous.id if previous is not None and not new_session else None
        session_id = existing or new_session_id()
        max_age = self._ttl(token_set)
        try:
            stored = await self.backend.put(session_id, token_set, max_age, create=not existing)
        except RefreshUnavailable:
            if not existing:  # a login: nothing to hold on to, the browser tries again
                raise
            self._hold(existing, token_set)  # the response goes out; the write comes later
            return Session(token_set, existing), []
        if not stored and existing and await self.backend.get(existing) is None:
            # The session ended (logout, expiry) while this request held it: it stays ended.
            return None, [self._writer.delete(self.cookie_name)]
        return Session(token_set, session_id), [
            self._writer.set(self.cookie_name, session_id, max_age)
        ]

    async def read(self, session: Session) -> TokenSet | None:
        return None if session.id is None else await self.backend.get(session.id)

    async def persist(self, session: Session, token_set: TokenSet) -> bool:
        if session.id is None:
            return True
        try:
            stored = await self.backend.put(
                session.id, token_set, self._ttl(token_set), create=False
            )
        except RefreshUnavailable:
            self._hold(session.id, token_set)
            raise
        if stored:
            return True
        # Refused: a later (or another same-generation) token set is stored, or the session
        # ended meanwhile (logout): only the first is a duplicate refresh.
        return await self.backend.get(session.id) is None

    # -- writes the backend could not take ---------------------------------------------------

    def _hold(self, session_id: str, token_set: TokenSet) -> None:
        held = self._unwritten.get(session_id)
        if held is not None and not supersedes(token_set, held):
            return
        self._unwritten.pop(session_id, None)
        self._unwritten[session_id] = token_set
        if len(self._unwritten) > _MAX_UNWRITTEN:
            del self._unwritten[next(iter(self._unwritten))]
            self._say("full", "too many refreshed sessions wait for the store: dropped the oldest")
        self._say(
            "held",
            "the session store did not take a refreshed token set; this process keeps it "
            "and writes it when the store answers again (%d waiting)",
            len(self._unwritten),
        )

    async def _write_held(self, session_id: str, stored: TokenSet | None) -> TokenSet | None:
        """The session's token set, after writing the one held for it if that is newer."""
        held = self._unwritten.get(session_id)
        if held is None:
            return stored
        if stored is None or not supersedes(held, stored):  # ended, or moved on without us
            self._unwritten.pop(session_id, None)
            return stored
        try:
            written = await self.backend.put(session_id, held, self._ttl(held), create=False)
        except RefreshUnavailable:
            return held  # still down: serve what we hold
        self._forget(session_id, held)
        return held if written else await self.backend.get(session_id)

    async def _flush_unwritten(self) -> None:
        """The backend answered: write what it could not take before, a batch at a time."""
        for session_id in list(self._unwritten)[:_FLUSH_BATCH]:
            held = self._unwritten.get(session_id)
            if held is None:
                continue
            try:
                await self.backend.put(session_id, held, self._ttl(held), create=False)
            except RefreshUnavailable:
                return  # down again
            self._forget(session_id, held)

    def _forget(self, session_id: str, written: TokenSet) -> None:
        """Drop a held write once the backend has answered it, unless a later refresh of the
        session was held while the write was on its way (that one waits its turn)."""
        if self._unwritten.get(session_id) is written:
            del self._unwritten[session_id]

    def _ttl(self, token_set: TokenSet) -> float:
        return session_max_age(token_set, self.max_age)
