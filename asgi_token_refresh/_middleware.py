"""TokenRefreshMiddleware: puts a TokenAccessor on ``request.state.token``.

Pure ASGI, in the manner of Starlette's own middleware: ``__init__`` validates and precomputes,
``__call__`` keeps nothing per request on ``self``, and the response is edited only by wrapping
``send`` around ``http.response.start`` (where changed session state becomes ``Set-Cookie``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._accessor import TokenAccessor
from ._errors import (
    ConfigurationError,
    LoginFailed,
    ReauthenticationRequired,
    RefreshUnavailable,
    TokenRefreshError,
)
from ._httpx import close_shared_pool
from ._keys import TokenParams
from ._memory_store import MemorySessionStore
from ._oauth import OAuth2Client
from ._oauth_messages import MAX_RETRY_AFTER
from ._refresher import Refresher
from ._sessions import ServerSideStore, SessionStore

__all__ = ["TokenRefreshMiddleware"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# What the middleware wraps: any ASGI callable. Litestar and Quart type their apps over
# TypedDict scopes and messages, which a Callable over MutableMapping refuses under mypy.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

#: The ``error`` field of the JSON body answered with ``on_terminal="401"``; stable.
TERMINAL_ERROR_CODE = "reauthentication_required"
UNAVAILABLE_ERROR_CODE = "token_refresh_unavailable"


class TokenRefreshMiddleware:
    """Give every request a lazy ``request.state.token`` backed by one process-wide refresher.

    ``on_terminal`` says what the user sees when the session cannot be refreshed (the session
    is cleared in every case): ``"401"`` (JSON body ``{"error": "reauthentication_required"}``
    and ``WWW-Authenticate``), ``"redirect:/path"`` (303, for HTML apps), ``"anonymous"``
    (continue with a client-credentials token, ``anonymous_scope``), or ``"raise"`` (let the
    app handle :class:`ReauthenticationRequired`). A provider outage answers 503 with
    ``Retry-After`` and keeps the session.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: OAuth2Client | None = None,
        store: SessionStore | None = None,
        on_terminal: str = "401",
        refresher: Refresher | None = None,
        skew: float | None = None,
        grace_ttl: float | None = None,
        anonymous_scope: str | None = None,
        state_key: str = "token",
    ) -> None:
        if refresher is None:
            if client is None:
                raise ConfigurationError("TokenRefreshMiddleware needs client= (or refresher=)")
            options = {"skew": skew, "grace_ttl": grace_ttl}
            refresher = Refresher.shared(
                client, **{k: v for k, v in options.items() if v is not None}
            )
        elif client is not None and client is not refresher.client:
            raise ConfigurationError("client= and refresher= disagree; pass one of them")
        elif skew is not None or grace_ttl is not None:
            raise ConfigurationError("set skew and grace_ttl on the Refresher you pass")
        store = store if store is not None else MemorySessionStore()
        if not isinstance(store, SessionStore):
            raise ConfigurationError(f"store must implement SessionStore, not {type(store)!r}")
        self.app = app
        self.refresher = refresher
        self.store = store
        self._server_side = isinstance(store, ServerSideStore)
        self._warned_insecure = False  # said once per middleware, not per response
        self.state_key = state_key
        self._redirect: str | None = None
        self._raise = on_terminal == "raise"
        self._anonymous: TokenParams | None = None
        if on_terminal == "anonymous":
            self._anonymous = TokenParams(scope=anonymous_scope)
        elif on_terminal.startswith("redirect:"):
            self._redirect = on_terminal.removeprefix("redirect:")
            if not self._redirect.startswith("/") and "://" not in self._redirect:
                raise ConfigurationError("on_terminal='redirect:...' needs a path or URL")
        elif on_terminal not in ("401", "raise"):
            raise ConfigurationError(
                "on_terminal must be '401', 'redirect:/path', 'anonymous' or 'raise', "
                f"not {on_terminal!r}"
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._closing_pools_at_shutdown(send))
            return
        if scope["type"] != "http" and scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        accessor = TokenAccessor(
            scope, self.store, self.refresher, self._anonymous, server_side=self._server_side
        )
        state = scope.get("state")  # (servers set it; setdefault would make a dict anyway)
        if state is None:
            state = scope["state"] = {}
        state[self.state_key] = accessor
        started = False  # the response has started (ours or the app's)
        answered = False  # the middleware answered instead of the app: drop the app's messages

        async def emit(message: Message) -> None:
            """Forward ``message``, writing the session back when the response starts."""
            nonlocal started, answered
            if message["type"] in ("http.response.start", "websocket.accept") and not started:
                started = True
                try:
                    # Most requests change nothing: then no store call, not even an await.
                    cookies = (
                        await accessor.commit()
                        if accessor.changed
                        else accessor.mark_response_started()
                    )
                except RefreshUnavailable as exc:  # the store is down: nothing sent yet
                    answered = True
                    await self._answer_unavailable(scope, exc, send)
                    return
                if cookies:
                    if scope.get("scheme") == "http" and not self._warned_insecure:
                        self._warn_if_secure_over_http(cookies)
                    headers = list(message.get("headers", ()))
                    headers += [(b"set-cookie", c.encode("latin-1")) for c in cookies]
                    message = {**message, "headers": headers}
            await send(message)

        async def send_with_session(message: Message) -> None:
            nonlocal answered
            if answered:
                return
            if started:  # the body, websocket frames: straight through
                await send(message)
                return
            if (
                message["type"] == "http.response.start"
                and message.get("status", 200) >= 500
                and self._answers(accessor.failure)
            ):
                # A framework turned our exception into its own error page (Litestar and
                # Quart do, before the exception reaches us): answer as documented instead.
                answered = True
                assert accessor.failure is not None
                await self._answer(scope, accessor.failure, emit)
                return
            await emit(message)

        try:
            await self.app(scope, receive, send_with_session)
        except LoginFailed as exc:  # accessor.login() refused the tokens: a clear 400
            if started or scope["type"] != "http":
                raise
            body = f"Login failed: {exc.reason}.".encode()
            await _respond(send, 400, body, [], b"text/plain; charset=utf-8")
        except (ReauthenticationRequired, RefreshUnavailable) as exc:
            if answered:  # already answered for it; Starlette's error middleware re-raises
                return
            if started or not self._answers(exc):
                raise
            await self._answer(scope, exc, emit)

    def _warn_if_secure_over_http(self, cookies: list[str]) -> None:
        if any("; Secure" in cookie and "Max-Age=0" not in cookie for cookie in cookies):
            self._warned_insecure = True
            logger.warning(
                "session cookies are Secure but this request came over plain http: browsers "
                "and HTTP clients drop them, so every login is lost. Serve https, or pass "
                "secure=False to the session store for local development"
            )

    def _answers(self, failure: TokenRefreshError | None) -> bool:
        """Whether the middleware answers for ``failure`` (not when the app asked to handle
        terminal failures itself with ``on_terminal="raise"``)."""
        if isinstance(failure, ReauthenticationRequired):
            return not self._raise
        return isinstance(failure, RefreshUnavailable)

    async def _answer(self, scope: Scope, failure: TokenRefreshError, send: Send) -> None:
        if isinstance(failure, ReauthenticationRequired):
            await self._answer_terminal(scope, failure, send)
        else:
            assert isinstance(failure, RefreshUnavailable)
            await self._answer_unavailable(scope, failure, send)

    def _closing_pools_at_shutdown(self, send: Send) -> Send:
        """Pass lifespan messages through; close this loop's connection pools (the provider's
        and the per-request clients') just before reporting shutdown complete: after that
        the server may stop the loop at once."""
        client = self.refresher.client

        async def send_after_closing(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await close_shared_pool()
                await client.aclose()
            await send(message)

        return send_after_closing

    async def _answer_terminal(
        self, scope: Scope, exc: ReauthenticationRequired, send: Send
    ) -> None:
        accessor: TokenAccessor = scope["state"][self.state_key]
        accessor.clear_session()
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": TERMINAL_ERROR_CODE})
            return
        if self._redirect is not None:
            await _respond(send, 303, b"", [(b"location", self._redirect.encode("latin-1"))])
            return
        body = {"error": TERMINAL_ERROR_CODE, "reason": exc.reason}
        challenge = b'Bearer error="invalid_token", error_description="reauthentication required"'
        await _respond(send, 401, _json(body), [(b"www-authenticate", challenge)])

    async def _answer_unavailable(self, scope: Scope, exc: RefreshUnavailable, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013, "reason": UNAVAILABLE_ERROR_CODE})
            return
        retry_after = str(min(int(MAX_RETRY_AFTER), max(1, math.ceil(exc.retry_after)))).encode()
        body = {"error": UNAVAILABLE_ERROR_CODE, "reason": exc.reason}
        await _respond(send, 503, _json(body), [(b"retry-after", retry_after)])


def _json(body: dict[str, str]) -> bytes:
    return json.dumps(body).encode()


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    content_type: bytes = b"application/json",
) -> None:
    if body:
        headers = [*headers, (b"content-type", content_type)]
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"cache-control", b"no-store"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
