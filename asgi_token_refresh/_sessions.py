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

# Longer ids are garbage, not sessions: rejected before any backend sees them.
_MAX_SESSION_ID = 128


@dataclass(frozen=True, slots=True)
class Session:
    """A session as a store loaded it. ``id`` is the opaque id of server-side stores."""

    token_set: TokenSet
    id: str | None = None


def new_session_id() -> str:
    """A fresh, unguessable session id (256 random bits, URL-safe). A login always gets a new
    one, so a session id planted before login is worthless after it (no fixation)."""
    return secrets.token_urlsafe(32)


def supersedes(candidate: TokenSet, stored: TokenSet | None) -> bool:
    """The compare-and-set rule every store keeps: ``candidate`` may replace ``stored`` unless
    ``stored`` is a later generation (a slower writer never moves a session back)."""
    return stored is None or candidate.issued_at >= stored.issued_at


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

    async def persist(self, session: Session, token_set: TokenSet) -> None:
        """Save a refreshed token set for ``session`` (compare-and-set on the generation)."""
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
    cookie is re-sent on every write, so its Max-Age slides along with the session."""

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cookie_name={self.cookie_name!r})"

    async def load(self, cookies: Mapping[str, str]) -> Session | None:
        session_id = cookies.get(self.cookie_name)
        if not session_id or len(session_id) > _MAX_SESSION_ID:
            return None
        token_set = await self.backend.get(session_id)
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
        stored = await self.backend.put(session_id, token_set, max_age, create=not existing)
        if not stored and existing and await self.backend.get(existing) is None:
            # The session ended (logout, expiry) while this request held it: it stays ended.
            return None, [self._writer.delete(self.cookie_name)]
        return Session(token_set, session_id), [
            self._writer.set(self.cookie_name, session_id, max_age)
        ]

    async def read(self, session: Session) -> TokenSet | None:
        return None if session.id is None else await self.backend.get(session.id)

    async def persist(self, session: Session, token_set: TokenSet) -> None:
        if session.id is not None:
            await self.backend.put(session.id, token_set, self._ttl(token_set), create=False)

    def _ttl(self, token_set: TokenSet) -> float:
        return session_max_age(token_set, self.max_age)
