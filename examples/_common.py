"""What the Starlette and FastAPI examples share: configuration and the OIDC login steps.

Configuration comes only from the environment (see examples/README.md). With ``OIDC_ISSUER``
unset, an in-process FakeIdP stands in for the provider: the app mounts it at ``/idp`` so the
browser can reach ``/idp/authorize``, and server-side calls reach it without a socket.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from cachetools import TTLCache
from starlette.responses import HTMLResponse, JSONResponse

from asgi_token_refresh import (
    AuthorizationRequest,
    Clock,
    CookieSessionStore,
    MemorySessionStore,
    OAuth2Client,
    ReauthenticationRequired,
    Refresher,
    SessionStore,
    SystemClock,
    TokenAccessor,
    TokenEndpointError,
    TokenSet,
)
from asgi_token_refresh.testing import FakeIdP

logger = logging.getLogger("examples")

#: Binds a login to the browser that started it (no login CSRF); scoped to the callback path.
LOGIN_COOKIE = "oidc_login"
LOGIN_TTL = 600  # seconds a started login may take


class LoginError(Exception):
    """The callback cannot finish the login; the message is safe to show (as plain text)."""


@dataclass
class OIDC:
    """Everything one app instance needs; build it with :meth:`from_env`."""

    redirect_uri: str
    scope: str
    secure_cookies: bool
    client: OAuth2Client
    refresher: Refresher
    store: SessionStore
    http: httpx.AsyncClient  # for userinfo (and the APIs you call with the user's token)
    idp: FakeIdP | None
    # Logins started here and not finished yet, by state. Per process and in memory: behind
    # several workers, route the callback to the same one or keep this in a shared store.
    # Used from the event loop only (cachetools is not thread-safe).
    pending: TTLCache[str, AuthorizationRequest]

    @classmethod
    def from_env(cls, clock: Clock | None = None) -> OIDC:
        env = os.environ
        base_url = env.get("APP_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
        secure = base_url.startswith("https")
        clock = clock or SystemClock()
        issuer = env.get("OIDC_ISSUER")
        idp: FakeIdP | None = None
        transport: httpx.AsyncBaseTransport | None = None
        if issuer:
            client_id, secret = env.get("OIDC_CLIENT_ID"), env.get("OIDC_CLIENT_SECRET")
            if not client_id:
                raise RuntimeError("OIDC_ISSUER is set, so OIDC_CLIENT_ID must be set too")
        else:
            issuer = base_url + "/idp"
            idp = FakeIdP(issuer=issuer, clock=clock)
            transport = httpx.ASGITransport(app=idp)
            client_id, secret = "app", "app-secret"
            logger.warning("OIDC_ISSUER is not set: using the in-process FakeIdP at %s", issuer)
        client = OAuth2Client.from_discovery(
            issuer,
            client_id=client_id,
            client_secret=secret or None,
            auth_method="client_secret_basic" if secret else "none",
            transport=transport,
            clock=clock,
        )
        session_secret = env.get("SESSION_SECRET")
        store: SessionStore
        if session_secret:  # comma-separated to rotate keys: the first one encrypts
            store = CookieSessionStore(secret_keys=session_secret.split(","), secure=secure)
        else:
            logger.warning(
                "SESSION_SECRET is not set: sessions live in this process's memory "
                "(lost on restart, not shared between workers)"
            )
            store = MemorySessionStore(secure=secure, clock=clock)
        return cls(
            redirect_uri=base_url + "/callback",
            scope=env.get("OIDC_SCOPE", "openid offline_access"),
            secure_cookies=secure,
            client=client,
            # One refresher per app. Refresher.shared() (what client= in the middleware uses)
            # keys a process-wide registry by issuer URL and client id only: a second
            # create_app() in this process would get the first app's client, transport and clock.
            refresher=Refresher(client),
            store=store,
            # An in-process FakeIdP is reached through the same ASGI transport; otherwise the
            # client keeps its own connection pool, bound to the server's event loop.
            http=httpx.AsyncClient(transport=transport, timeout=10.0),
            idp=idp,
            pending=TTLCache(maxsize=10_000, ttl=LOGIN_TTL, timer=clock.monotonic),
        )

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.client.aclose()
        if self.idp is not None:
            self.idp.close()

    # -- the login ---------------------------------------------------------------------------

    async def start_login(self) -> AuthorizationRequest:
        """Authorization code + PKCE S256, fresh state and nonce (``prompt=consent`` is added
        for ``offline_access``). Redirect the browser to ``.url``; set LOGIN_COOKIE to
        ``.state``."""
        request = await self.client.authorization_url(self.redirect_uri, scope=self.scope)
        self.pending[request.state] = request
        return request

    async def finish_login(self, query: Mapping[str, str], login_cookie: str | None) -> TokenSet:
        """Check the callback and redeem its code; raises :class:`LoginError`.

        A provider outage raises RefreshUnavailable, which the middleware answers with 503.
        """
        if "error" in query:
            detail = query.get("error_description", "")
            raise LoginError(f"the provider refused the login: {query['error']} {detail}")
        code, state = query.get("code"), query.get("state")
        if not code or not state:
            raise LoginError("the callback needs both code and state")
        pending = self.pending.pop(state, None)  # single use
        if pending is None:
            raise LoginError("unknown or expired login; please log in again")
        if not secrets.compare_digest(state.encode(), (login_cookie or "").encode()):
            raise LoginError("this login was started in another browser; please log in again")
        try:
            token_set = await self.client.exchange_code(
                code, redirect_uri=pending.redirect_uri, code_verifier=pending.code_verifier
            )
        except TokenEndpointError as exc:
            raise LoginError(f"the provider refused the authorization code: {exc.error}") from exc
        # The ID token came straight from the token endpoint over TLS (OIDC Core §3.1.3.7), so
        # this checks only that it answers this login. Use an OIDC library to verify it fully.
        id_token, nonce = token_set.id_token, pending.nonce
        if id_token is not None and nonce is not None and _claims(id_token).get("nonce") != nonce:
            raise LoginError("the ID token does not belong to this login (nonce)")
        if token_set.refresh_token is None:
            logger.warning("no refresh token: enable offline_access/refresh tokens for the client")
        return token_set

    # -- calling an API with the user's token ------------------------------------------------

    async def userinfo(self, token: TokenAccessor) -> JSONResponse:
        """The provider's userinfo for the session: one refresh-and-retry on a 401."""
        endpoint = (await self.client.metadata()).userinfo_endpoint
        if endpoint is None:
            return JSONResponse({"error": "provider has no userinfo endpoint"}, status_code=501)
        try:
            headers = await token.headers()
            response = await self.http.get(endpoint, headers=headers)
            if response.status_code == 401:  # revoked early, or our clock is off
                failed = headers["Authorization"].partition(" ")[2]
                await token.refresh(failed_access_token=failed)
                response = await self.http.get(endpoint, headers=await token.headers())
                if response.status_code == 401:
                    raise ReauthenticationRequired("downstream_401")  # the middleware: 401
            response.raise_for_status()
            return JSONResponse(response.json())
        except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": "userinfo request failed"}, status_code=502)


def _claims(jwt: str) -> dict[str, Any]:
    try:
        payload = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        raise LoginError("the provider sent a malformed ID token") from None
    return claims if isinstance(claims, dict) else {}


def home_page(authenticated: bool) -> HTMLResponse:
    if authenticated:
        body = 'Logged in. <a href="/api/me">/api/me</a> | <a href="/logout">log out</a>'
    else:
        body = 'Not logged in. <a href="/login">Log in</a>'
    return HTMLResponse(f"<!doctype html><title>asgi-token-refresh</title><p>{body}</p>")
