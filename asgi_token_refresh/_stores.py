"""Where a session's token set lives between requests.

A :class:`SessionStore` is four small async methods, so writing one is easy. Two are built in:
:class:`CookieSessionStore` keeps the token set in the browser, AES-GCM encrypted and
authenticated, split over several cookies when large; :class:`MemorySessionStore` keeps it in
this process behind an opaque random id (the embedded default for a single process). Neither
ever moves a session back to an older token generation, and bad cookies are simply no session.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from ._clock import SYSTEM_CLOCK, Clock
from ._errors import ConfigurationError
from ._sealing import Sealer
from ._tokens import TokenSet

__all__ = [
    "CookieSessionStore",
    "MemorySessionStore",
    "Session",
    "SessionStore",
    "parse_cookie_header",
]

logger = logging.getLogger("asgi_token_refresh")

SameSite = Literal["lax", "strict", "none"]
_THIRTY_DAYS = 30 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    """A session as a store loaded it. ``id`` is the opaque id of server-side stores."""

    token_set: TokenSet
    id: str | None = None


@runtime_checkable
class SessionStore(Protocol):
    """Persists one token set per browser session.

    ``server_side`` stores keep the state on the server, so a refresh that finishes after the
    response started can still be saved (:meth:`persist`); cookie stores can only write through
    the response. Implementations must be safe to call from any thread and event loop.
    """

    server_side: bool

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

    async def read(self, session: Session) -> TokenSet | None:
        """The token set stored for ``session`` now (another request may have rotated it)."""
        ...

    async def persist(self, session: Session, token_set: TokenSet) -> None:
        """Save a refreshed token set without a response (server-side stores only)."""
        ...


def parse_cookie_header(header: str) -> dict[str, str]:
    """Parse a ``Cookie`` request header; malformed pairs are skipped, the first value wins."""
    cookies: dict[str, str] = {}
    for pair in header.split(";"):
        name, sep, value = pair.partition("=")
        name = name.strip()
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


def validate_cookie_options(name: str, same_site: str, secure: bool, max_age: float) -> None:
    if not name or any(c in name for c in ' ;,="\t\r\n'):
        raise ConfigurationError(f"cookie name {name!r} is not a valid cookie name")
    if same_site not in ("lax", "strict", "none"):
        raise ConfigurationError("same_site must be 'lax', 'strict' or 'none'")
    if same_site == "none" and not secure:
        raise ConfigurationError("browsers reject SameSite=None cookies without Secure")
    if max_age <= 0:
        raise ConfigurationError("max_age must be a positive number of seconds")


class CookieWriter:
    """Builds ``Set-Cookie`` values with one set of attributes."""

    def __init__(
        self, *, path: str, domain: str | None, secure: bool, same_site: SameSite, max_age: float
    ) -> None:
        attributes = [f"Path={path}"]
        if domain:
            attributes.append(f"Domain={domain}")
        attributes.append("HttpOnly")
        if secure:
            attributes.append("Secure")
        attributes.append(f"SameSite={same_site.capitalize()}")
        self._attributes = "; ".join(attributes)
        self.max_age = max_age

    def set(self, name: str, value: str, max_age: float | None = None) -> str:
        return f"{name}={value}; Max-Age={int(max_age or self.max_age)}; {self._attributes}"

    def delete(self, name: str) -> str:
        return f"{name}=; Max-Age=0; {self._attributes}"


def session_max_age(token_set: TokenSet, default: float) -> float:
    # Keycloak and others say how long the refresh token lives; the cookie should not outlive it.
    seconds = token_set.extra.get("refresh_expires_in")
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0:
        return min(float(seconds), default)
    return default


class CookieSessionStore:
    """The token set in the browser: AES-GCM encrypted and authenticated, chunked when large.

    ``secret_keys``: the first encrypts, every one decrypts, so keys rotate by prepending a new
    one and dropping the oldest later. Each must be at least 32 characters (use
    ``secrets.token_urlsafe(32)``). Cookies are HttpOnly, Secure (set ``secure=False`` only for
    plain-http local development) and SameSite=Lax; Max-Age follows the refresh token's
    lifetime when the provider says it (``refresh_expires_in``), else ``max_age``. Tampered,
    truncated, wrong-key or garbage cookies load as no session and are counted in ``rejected``.
    """

    server_side = False
    _VERSION = "v1"

    def __init__(
        self,
        secret_keys: Sequence[str | bytes],
        *,
        cookie_name: str = "atr_session",
        secure: bool = True,
        same_site: SameSite = "lax",
        path: str = "/",
        domain: str | None = None,
        max_age: float = _THIRTY_DAYS,
        chunk_size: int = 3800,
    ) -> None:
        self._sealer = Sealer(secret_keys, purpose="atr-cookie-v1", extra="cookies")
        validate_cookie_options(cookie_name, same_site, secure, max_age)
        if not 256 <= chunk_size <= 4000:
            raise ConfigurationError("chunk_size must be between 256 and 4000 characters")
        self.cookie_name = cookie_name
        self._aad = f"asgi-token-refresh|{self._VERSION}|{cookie_name}".encode()
        self._chunk_size = chunk_size
        self._writer = CookieWriter(
            path=path, domain=domain, secure=secure, same_site=same_site, max_age=max_age
        )
        self._rejected = 0
        self._rejected_lock = threading.Lock()

    @property
    def rejected(self) -> int:
        """Cookies that were present but could not be decrypted or parsed."""
        return self._rejected

    def __repr__(self) -> str:
        return f"CookieSessionStore(cookie_name={self.cookie_name!r}, {self._sealer!r})"

    # -- encoding --------------------------------------------------------------------------

    def _encrypt(self, token_set: TokenSet) -> str:
        plaintext = json.dumps(token_set.to_dict(), separators=(",", ":")).encode()
        sealed = self._sealer.seal(plaintext, self._aad)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def _decrypt(self, blob: str) -> TokenSet:
        raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
        return TokenSet.from_dict(json.loads(self._sealer.open(raw, self._aad)))

    def _chunk_names(self, cookies: Mapping[str, str]) -> list[str]:
        prefix = self.cookie_name + "."
        return [n for n in cookies if n.startswith(prefix) and n[len(prefix) :].isdigit()]

    # -- SessionStore ----------------------------------------------------------------------

    async def load(self, cookies: Mapping[str, str]) -> Session | None:
        head = cookies.get(self.cookie_name)
        if not head:
            return None
        try:
            version, count, first = head.split(".", 2)
            if version != self._VERSION or not count.isdigit() or not 1 <= int(count) <= 16:
                raise ValueError("bad header")
            parts = [first] + [cookies[f"{self.cookie_name}.{i}"] for i in range(1, int(count))]
            return Session(self._decrypt("".join(parts)))
        except (ValueError, KeyError, binascii.Error, UnicodeError):
            with self._rejected_lock:
                self._rejected += 1
            logger.info("rejected an unreadable session cookie")
            return None

    async def save(
        self,
        cookies: Mapping[str, str],
        previous: Session | None,
        token_set: TokenSet | None,
        *,
        new_session: bool = False,
    ) -> tuple[Session | None, list[str]]:
        # Every cookie of the old session that the new one does not overwrite is deleted.
        stale = {self.cookie_name, *self._chunk_names(cookies)} & set(cookies)
        if token_set is None:
            return None, [self._writer.delete(name) for name in sorted(stale)]
        blob = self._encrypt(token_set)
        size = self._chunk_size
        chunks = [blob[i : i + size] for i in range(0, len(blob), size)]
        if len(chunks) > 16:
            raise ValueError("token set too large for 16 cookies")
        max_age = session_max_age(token_set, self._writer.max_age)
        headers = [
            self._writer.set(
                self.cookie_name, f"{self._VERSION}.{len(chunks)}.{chunks[0]}", max_age
            )
        ]
        names = [self.cookie_name]
        for i, chunk in enumerate(chunks[1:], start=1):
            names.append(f"{self.cookie_name}.{i}")
            headers.append(self._writer.set(names[-1], chunk, max_age))
        headers += [self._writer.delete(name) for name in sorted(stale - set(names))]
        return Session(token_set), headers

    async def read(self, session: Session) -> TokenSet | None:
        return None  # only the browser holds cookie sessions

    async def persist(self, session: Session, token_set: TokenSet) -> None:
        return None  # nothing to write without a response


class MemorySessionStore:
    """Sessions in this process's memory, behind an opaque random id in a cookie.

    The embedded default for one process: nothing to configure, tokens never leave the server.
    Bounded: at most ``max_sessions``, each kept ``max_age`` seconds after its last write (a
    login or a refresh); when full, the least recently written goes first. Sessions do not
    survive a restart and are not shared between workers; use RedisSessionStore for that. A
    login always issues a new id (no fixation).
    """

    server_side = True

    def __init__(
        self,
        *,
        cookie_name: str = "atr_sid",
        secure: bool = True,
        same_site: SameSite = "lax",
        path: str = "/",
        domain: str | None = None,
        max_age: float = _THIRTY_DAYS,
        max_sessions: int = 100_000,
        clock: Clock | None = None,
    ) -> None:
        validate_cookie_options(cookie_name, same_site, secure, max_age)
        if max_sessions < 1:
            raise ConfigurationError("max_sessions must be at least 1")
        self.cookie_name = cookie_name
        self.max_age = max_age
        self.max_sessions = max_sessions
        self._writer = CookieWriter(
            path=path, domain=domain, secure=secure, same_site=same_site, max_age=max_age
        )
        self._monotonic = (clock or SYSTEM_CLOCK).monotonic
        # id -> (session, monotonic deadline), oldest write first. Reads take no lock (dict.get
        # is atomic; loading runs on every request); _lock serialises writers.
        self._sessions: dict[str, tuple[Session, float]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        now = self._monotonic()
        return sum(deadline > now for _, deadline in list(self._sessions.values()))

    def __repr__(self) -> str:
        return f"MemorySessionStore(cookie_name={self.cookie_name!r}, sessions={len(self)})"

    def _get(self, session_id: str) -> Session | None:
        entry = self._sessions.get(session_id)
        if entry is None or entry[1] <= self._monotonic():
            return None
        return entry[0]

    def _put(self, session_id: str, token_set: TokenSet) -> Session:
        """Compare-and-set: a slower writer never regresses the session to an older generation."""
        with self._lock:
            stored = self._get(session_id)
            if stored is not None and token_set.issued_at < stored.token_set.issued_at:
                return stored
            session = Session(token_set, session_id)
            self._sessions.pop(session_id, None)  # re-inserted last: the newest write
            self._sessions[session_id] = (session, self._monotonic() + self.max_age)
            while len(self._sessions) > self.max_sessions:
                del self._sessions[next(iter(self._sessions))]
            return session

    def _drop(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    async def load(self, cookies: Mapping[str, str]) -> Session | None:
        session_id = cookies.get(self.cookie_name)
        return self._get(session_id) if session_id else None

    async def save(
        self,
        cookies: Mapping[str, str],
        previous: Session | None,
        token_set: TokenSet | None,
        *,
        new_session: bool = False,
    ) -> tuple[Session | None, list[str]]:
        if previous is not None and (new_session or token_set is None):
            self._drop(previous.id)
        if token_set is None:
            present = self.cookie_name in cookies
            return None, [self._writer.delete(self.cookie_name)] if present else []
        if previous is None or new_session or previous.id is None:
            session = self._put(secrets.token_urlsafe(32), token_set)
        else:
            session = self._put(previous.id, token_set)
        # (Re)sent on every write so the cookie's Max-Age slides along with the session here.
        assert session.id is not None
        return session, [self._writer.set(self.cookie_name, session.id)]

    async def read(self, session: Session) -> TokenSet | None:
        stored = self._get(session.id or "")
        return None if stored is None else stored.token_set

    async def persist(self, session: Session, token_set: TokenSet) -> None:
        if session.id is not None:
            self._put(session.id, token_set)
