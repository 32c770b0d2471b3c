"""CookieSessionStore: the token set in the browser, encrypted and authenticated.

AES-GCM through :class:`Sealer`, split over several cookies when large. It implements
:class:`SessionStore` only: without a response there is nowhere to write. Tampered, truncated,
wrong-key or garbage cookies are simply no session.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Mapping, Sequence

from ._clock import Clock
from ._cookies import (
    DEFAULT_MAX_AGE,
    CookieWriter,
    SameSite,
    session_max_age,
    validate_cookie_options,
)
from ._errors import ConfigurationError
from ._logs import Throttle
from ._sealing import Sealer
from ._sessions import Session
from ._tokens import TokenSet

__all__ = ["CookieSessionStore"]

logger = logging.getLogger(__name__)

_MAX_CHUNKS = 16  # cookies per session; browsers keep ~50 per site, 4 KB each


class CookieSessionStore:
    """The token set in the browser: AES-GCM encrypted and authenticated, chunked when large.

    ``secret_keys``: the first encrypts, every one decrypts, so keys rotate by prepending a new
    one and dropping the oldest later. Each must be at least 32 characters (use
    ``secrets.token_urlsafe(32)``). Cookies are HttpOnly, Secure (set ``secure=False`` only for
    plain-http local development) and SameSite=Lax; Max-Age follows the refresh token's
    lifetime when the provider says it (``refresh_expires_in``), else ``max_age``. Tampered,
    truncated, wrong-key or garbage cookies load as no session and are counted in ``rejected``
    (logged at INFO at most once a minute per reason, with the count left out; ``clock`` is
    what that minute is read from). It implements :class:`SessionStore` only: without a
    response there is nowhere to write.
    """

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
        max_age: float = DEFAULT_MAX_AGE,
        chunk_size: int = 3800,
        clock: Clock | None = None,
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
        # A client sends whatever cookie it likes on every request: never a line per request.
        self._say_rejected = Throttle(logger, logging.INFO, clock=clock)

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

    def _sealed(self, head: str, cookies: Mapping[str, str]) -> bytes:
        version, count, first = head.split(".", 2)
        if version != self._VERSION or not count.isdigit():
            raise ValueError("bad header")
        if not 1 <= int(count) <= _MAX_CHUNKS:
            raise ValueError("bad header")
        parts = [first] + [cookies[f"{self.cookie_name}.{i}"] for i in range(1, int(count))]
        blob = "".join(parts)
        return base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))

    def _chunk_names(self, cookies: Mapping[str, str]) -> list[str]:
        prefix = self.cookie_name + "."
        return [n for n in cookies if n.startswith(prefix) and n[len(prefix) :].isdigit()]

    # -- SessionStore ----------------------------------------------------------------------

    async def load(self, cookies: Mapping[str, str]) -> Session | None:
        head = cookies.get(self.cookie_name)
        if not head:
            return None
        try:
            sealed = self._sealed(head, cookies)
        except (ValueError, KeyError, binascii.Error, UnicodeError):
            self._reject("malformed")
            return None
        try:
            plaintext = self._sealer.open(sealed, self._aad)
        except ValueError:  # tampered, or sealed under a key that is no longer configured
            self._reject("no key opens it: tampered, or sealed under a key since removed")
            return None
        try:
            return Session(TokenSet.from_dict(json.loads(plaintext)))
        except (ValueError, KeyError, UnicodeError):
            self._reject("not a token set")
            return None

    def _reject(self, reason: str) -> None:
        with self._rejected_lock:
            self._rejected += 1
        self._say_rejected(reason, "rejected an unreadable session cookie %r", self.cookie_name)

    def fits(self, token_set: TokenSet) -> bool:
        """Whether ``token_set`` fits in the cookies (a login that does not is refused)."""
        return len(self._encrypt(token_set)) <= _MAX_CHUNKS * self._chunk_size

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
        if len(chunks) > _MAX_CHUNKS:
            raise ValueError(f"token set too large for {_MAX_CHUNKS} cookies")
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
