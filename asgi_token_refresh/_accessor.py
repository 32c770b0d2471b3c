"""TokenAccessor: what ``request.state.token`` is.

One per request, created by the middleware and doing nothing until used. It loads the session
from the store on first use, returns the access token when fresh, asks the process-wide
refresher otherwise, and remembers what changed so the middleware can write it back before the
response starts. It holds no loop-bound object, so the sync variant can drive it from a worker
thread.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any, cast

import httpx

from ._cookies import request_cookies
from ._errors import (
    ConfigurationError,
    LoginFailed,
    ReauthenticationRequired,
    RefreshUnavailable,
    TokenEndpointError,
)
from ._httpx import TokenAuth, shared_client
from ._keys import TokenParams
from ._oauth_messages import DEFAULT_RETRY_AFTER
from ._refresher import Refresher
from ._sessions import ServerSideStore, Session, SessionStore, SizeLimitedStore
from ._single_flight import run_blocking
from ._telemetry import Telemetry
from ._tokens import TokenSet

__all__ = ["SyncTokenAccessor", "TokenAccessor"]

logger = logging.getLogger(__name__)

_Scope = Mapping[str, Any]


class TokenAccessor:
    """The current request's view of its session's tokens.

    ``await get()`` returns a fresh access token; ``await headers()`` the ``Authorization``
    header for it. Safe to use from several tasks of the same request at once: they share the
    loaded session and, through the refresher, one flight.
    """

    __slots__ = (
        "_anonymous",
        "_changed",
        "_committed",
        "_cookies",
        "_loaded",
        "_new_session",
        "_refresher",
        "_scope",
        "_server_side",
        "_session",
        "_store",
        "_token_set",
        "failure",
    )

    def __init__(
        self,
        scope: _Scope,
        store: SessionStore,
        refresher: Refresher,
        anonymous: TokenParams | None = None,
        *,
        server_side: bool | None = None,
    ) -> None:
        self._scope = scope
        self._store = store
        # Whether the store can be read and written without a response (the middleware
        # works this out once, not per request).
        self._server_side = (
            isinstance(store, ServerSideStore) if server_side is None else server_side
        )
        self._refresher = refresher
        self._anonymous = anonymous
        self._cookies: dict[str, str] | None = None
        self._loaded = False
        self._session: Session | None = None
        self._token_set: TokenSet | None = None
        self._changed = False  # the token set differs from what the store holds
        self._new_session = False  # set by login(): the store issues a new session
        self._committed = False  # the response has started; cookies can no longer change
        #: The last terminal or transient failure handed to the app, so that the middleware
        #: can still answer as documented when a framework turns it into its own 500 page.
        self.failure: ReauthenticationRequired | RefreshUnavailable | None = None

    def __repr__(self) -> str:
        state = "not loaded" if not self._loaded else f"token_set={self._token_set!r}"
        return f"TokenAccessor({state}, changed={self._changed})"

    # -- reading -----------------------------------------------------------------------------

    @property
    def cookies(self) -> dict[str, str]:
        if self._cookies is None:
            self._cookies = request_cookies(self._scope.get("headers", ()))
        return self._cookies

    async def _load(self) -> TokenSet | None:
        if not self._loaded:
            try:
                session = await self._store.load(self.cookies)
            except RefreshUnavailable as exc:  # the store is unreachable: 503, session kept
                self.failure = exc
                raise
            if not self._loaded:  # another task of this request may have loaded meanwhile
                self._session = session
                self._token_set = session.token_set if session is not None else None
                self._loaded = True
        return self._token_set

    async def token_set(self) -> TokenSet | None:
        """The session's current token set (possibly refreshed by this request), or ``None``."""
        return self._token_set if self._loaded else await self._load()

    async def claims(self) -> dict[str, Any] | None:
        """The ID token's claims as verified at login (``sub``, ``email``...), or ``None``
        without a session or for a session that did not log in through OIDC."""
        token_set = self._token_set if self._loaded else await self._load()
        return None if token_set is None or token_set.claims is None else dict(token_set.claims)

    async def is_authenticated(self) -> bool:
        """Whether the request carries a session with tokens (fresh or refreshable)."""
        return (self._token_set if self._loaded else await self._load()) is not None

    async def get(self) -> str:
        """A fresh access token for this session.

        Raises :class:`ReauthenticationRequired` when there is no session or it is dead (unless
        the middleware runs with ``on_terminal="anonymous"``, which answers with a
        client-credentials token) and :class:`RefreshUnavailable` when the provider is down.
        """
        token_set = self._token_set if self._loaded else await self._load()
        if token_set is None:
            return (await self._no_session("no_session")).access_token
        if self._refresher.serve_fresh(token_set):
            return token_set.access_token
        return (await self._replace(token_set, None)).access_token

    def cached_fresh_token(self) -> str | None:
        """The access token, if the session is already loaded and the token is fresh (counted
        as a fresh-path hit); otherwise ``None``. Never awaits: the sync accessor's fast path."""
        token_set = self._token_set
        if self._loaded and token_set is not None and self._refresher.serve_fresh(token_set):
            return token_set.access_token
        return None

    async def headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <fresh access token>"}``."""
        token = await self.get()
        token_set = self._token_set
        token_type = token_set.token_type if token_set is not None else "Bearer"
        return {"Authorization": f"{token_type} {token}"}

    async def renew(self, failed_access_token: str | None = None) -> str:
        """Compare-and-refresh after an API rejected ``failed_access_token`` (default: the
        current one). Returns the newer token without a provider call if one is known."""
        token_set = self._token_set if self._loaded else await self._load()
        if token_set is None:
            return (await self._no_session("no_session")).access_token
        return (
            await self._replace(token_set, failed_access_token or token_set.access_token)
        ).access_token

    async def _replace(self, token_set: TokenSet, failed_access_token: str | None) -> TokenSet:
        session = self._session
        server_side = self._server_side and session is not None
        hooks: dict[str, Any] = {}
        if server_side and session is not None:  # (the second test is for the type checker)
            server_store = cast(ServerSideStore, self._store)
            hooks["current"] = functools.partial(server_store.read, session)
            hooks["on_refreshed"] = functools.partial(server_store.persist, session)
        try:
            if failed_access_token is None:
                new = await self._refresher.ensure_fresh(token_set, **hooks)
            else:
                new = await self._refresher.renew(
                    token_set, failed_access_token=failed_access_token, **hooks
                )
        except ReauthenticationRequired as exc:
            self.clear_session()
            return await self._no_session(exc.reason, exc)
        except RefreshUnavailable as exc:
            self.failure = exc
            raise
        if new is not token_set:
            self._token_set = new
            self._changed = True
            if self._committed and not server_side:
                logger.debug("refreshed after the response started: the cookie keeps old tokens")
        return new

    async def _no_session(self, reason: str, cause: BaseException | None = None) -> TokenSet:
        """Answer a caller whose session is missing or dead (``cause``: why it died), counting
        the terminal failure once. With ``on_terminal="anonymous"``, a request that never had
        a session is no failure; a session that died is one, before going on anonymously."""
        refresher = self._refresher
        if cause is not None or self._anonymous is None:
            refresher.telemetry.terminal_failure(reason, "asgi", refresher.client.name)
        if self._anonymous is not None:
            try:
                return await refresher.client_credentials(self._anonymous)
            except TokenEndpointError as exc:  # the app's own credentials are refused
                refresher.telemetry.terminal_failure(exc.error, "asgi", refresher.client.name)
                self.failure = RefreshUnavailable(
                    "provider_error", retry_after=DEFAULT_RETRY_AFTER, detail=exc.error
                )
                raise self.failure from None
            except RefreshUnavailable as exc:
                self.failure = exc
                raise
        self.failure = ReauthenticationRequired(reason)
        raise self.failure from cause

    def record_failure(self, failure: ReauthenticationRequired | RefreshUnavailable) -> None:
        """Remember a failure raised on this request's behalf elsewhere (its httpx client's
        second 401), so that the middleware answers for it even behind a framework's 500."""
        self.failure = failure

    @property
    def refresher(self) -> Refresher:
        return self._refresher

    @property
    def telemetry(self) -> Telemetry:
        return self._refresher.telemetry

    def client(self, **options: Any) -> httpx.AsyncClient:
        """A new ``httpx.AsyncClient`` for this request: bearer token injected, one 401 → one
        compare-and-refresh → one retry. It shares a process-wide connection pool but holds
        this user's tokens only in itself. ``options`` go to ``httpx.AsyncClient``.

            async with request.state.token.client(base_url=API) as api:
                response = await api.get("/me")
        """
        return shared_client(
            self, self._refresher.telemetry, on_failure=self.record_failure, **options
        )

    # -- login and logout --------------------------------------------------------------------

    async def login(self, tokens: TokenSet | Mapping[str, Any] | bytes) -> TokenSet:
        """Start a session with ``tokens``: a TokenSet, or a token-endpoint response body.
        :class:`LoginFailed` if the store cannot hold them (too large for cookies)."""
        if self._committed:
            raise RuntimeError("login() after the response started cannot set the session")
        if not isinstance(tokens, TokenSet):
            client = self._refresher.client
            tokens = TokenSet.from_token_response(
                tokens,
                issued_at=client.clock.time(),
                default_lifetime=client.default_token_lifetime,
            )
        if isinstance(self._store, SizeLimitedStore) and not self._store.fits(tokens):
            raise LoginFailed(
                "the provider's tokens are too large to keep in cookies; "
                "use a server-side session store (MemorySessionStore, RedisSessionStore)"
            )
        await self._load()
        self._token_set = tokens
        self._changed = True
        self._new_session = True
        return tokens

    async def logout(self, *, revoke: bool = True) -> None:
        """End the session: revoke the refresh token at the provider (RFC 7009), clear the
        store and refuse stragglers still holding older refresh tokens."""
        token_set = await self._load()
        self.clear_session()
        if token_set is not None:
            await self._refresher.end_session(token_set, revoke=revoke)

    def clear_session(self) -> None:
        """Forget this session's tokens, without revoking them (the middleware does it on a
        terminal failure); the store is cleared when the response starts."""
        self._token_set = None
        self._changed = True
        self._new_session = False

    # -- writing back (the middleware calls this) --------------------------------------------

    @property
    def changed(self) -> bool:
        """Whether :meth:`commit` has anything to write."""
        return self._changed

    def mark_response_started(self) -> list[str]:
        """The cheap :meth:`commit`, when nothing :attr:`changed`: no store call, no await."""
        self._committed = True
        return []

    async def commit(self) -> list[str]:
        """Write what changed to the store; the ``Set-Cookie`` values to send. Once."""
        self._committed = True
        if not self._changed:
            return []
        self._changed = False
        session, cookies = await self._store.save(
            self.cookies, self._session, self._token_set, new_session=self._new_session
        )
        self._session, self._new_session = session, False
        return cookies

    # -- the sync variant --------------------------------------------------------------------

    @property
    def sync(self) -> SyncTokenAccessor:
        """The same accessor for sync endpoints running in a worker thread."""
        return SyncTokenAccessor(self)


class SyncTokenAccessor:
    """Blocking twin of :class:`TokenAccessor` for code in a worker thread (never in a loop)."""

    __slots__ = ("_accessor",)

    def __init__(self, accessor: TokenAccessor) -> None:
        self._accessor = accessor

    @property
    def refresher(self) -> Refresher:
        return self._accessor.refresher

    @property
    def telemetry(self) -> Telemetry:
        return self._accessor.telemetry

    def get(self) -> str:
        token = self._accessor.cached_fresh_token()
        return token if token is not None else run_blocking(self._accessor.get())

    def headers(self) -> dict[str, str]:
        return run_blocking(self._accessor.headers())

    def token_set(self) -> TokenSet | None:
        return run_blocking(self._accessor.token_set())

    def is_authenticated(self) -> bool:
        return run_blocking(self._accessor.is_authenticated())

    def renew(self, failed_access_token: str | None = None) -> str:
        return run_blocking(self._accessor.renew(failed_access_token))

    def claims(self) -> dict[str, Any] | None:
        return run_blocking(self._accessor.claims())

    def login(self, tokens: TokenSet | Mapping[str, Any] | bytes) -> TokenSet:
        return run_blocking(self._accessor.login(tokens))

    def logout(self, *, revoke: bool = True) -> None:
        run_blocking(self._accessor.logout(revoke=revoke))

    def client(self, **options: Any) -> httpx.Client:
        """A new ``httpx.Client`` for this request: bearer injected, one 401 → one
        compare-and-refresh → one retry. ``options`` go to ``httpx.Client``."""
        if "auth" in options:
            raise ConfigurationError("the client authenticates with the session's tokens")
        auth = TokenAuth(self, telemetry=self.telemetry, on_failure=self._accessor.record_failure)
        return httpx.Client(auth=auth, **options)
