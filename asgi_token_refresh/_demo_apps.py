"""The demo's three apps: the same two routes, three ways of keeping a session's token fresh.

``GET /login?user=...`` starts a session from tokens the provider issued; ``GET /api`` gets the
session's access token and calls the provider's userinfo endpoint (the protected API) with it.

- naive: what teams ship first. Each request that finds the token due refreshes it itself and
  stores the result, last writer wins. It reports the same metrics the library does, so the
  dashboards show what the storm looks like.
- authlib: Authlib as its Starlette integration uses it. Per request an ``AsyncOAuth2Client``
  is built from the session's stored token; Authlib refreshes a due token itself
  (``ensure_active_token``, from ``expires_at``) and its ``update_token`` callback writes the
  new token back to the session, last writer wins. Its lock is per client, so per request.
- single-flight: ``TokenRefreshMiddleware`` and ``request.state.token.client()``.

The naive and authlib apps answer a refused refresh with 401 ``{"error": "invalid_grant"}`` and
pass the API's own answer through otherwise, so a browser can tell the two failures apart.
"""

from __future__ import annotations

import contextlib
import importlib
import secrets
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from ._cookies import parse_cookie_header
from ._errors import RefreshUnavailable, TokenEndpointError
from ._memory_store import MemorySessionStore
from ._oauth import OAuth2Client
from ._refresher import Refresher
from ._telemetry import COMPONENT, DEDUPE, ERROR_TYPE, GRANT, OUTCOME, PROVIDER, Telemetry
from ._tokens import TokenSet
from .testing import FakeIdP

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

__all__ = ["AUTHLIB_MISSING", "CLIENT_ID", "CLIENT_SECRET", "authlib", "build_app"]

CLIENT_ID, CLIENT_SECRET = "app", "app-secret"  # FakeIdP's default client

AUTHLIB_MISSING = (
    "Authlib is not installed, so the authlib column is left out "
    "(scripts/demo installs it; or pip install 'asgi-token-refresh[demo]')."
)
_REFUSED = {"error": "invalid_grant"}  # what the naive and authlib apps answer a refused refresh


@dataclass(frozen=True)
class _Authlib:
    client: Any  # AsyncOAuth2Client
    token: Any  # OAuth2Token: the dict Authlib keeps a token in, with expires_at
    error: type[Exception]  # OAuthError
    transport_errors: tuple[type[Exception], ...]


def authlib() -> _Authlib | None:
    """The parts of Authlib the authlib column uses, or None when Authlib is not installed."""
    with warnings.catch_warnings():
        # Authlib without httpx2 falls back to httpx and warns about it; the demo does not care.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            clients = importlib.import_module("authlib.integrations.httpx_client")
            tokens = importlib.import_module("authlib.oauth2.rfc6749")
        except ImportError:
            return None
    errors: list[type[Exception]] = [httpx.HTTPError]
    with contextlib.suppress(ImportError):  # the httpx Authlib prefers, when installed
        errors.append(importlib.import_module("httpx2").HTTPError)
    return _Authlib(clients.AsyncOAuth2Client, tokens.OAuth2Token, clients.OAuthError, (*errors,))


def build_app(mode: str, idp: FakeIdP, client: OAuth2Client, telemetry: Telemetry) -> Any:
    """The Starlette app of one column, ``client`` being its provider's configuration."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from ._middleware import TokenRefreshMiddleware

    issuer = client.issuer or ""

    if mode == "single-flight":
        store = MemorySessionStore(secure=False)

        async def login(request: Request) -> Response:
            await request.state.token.login(idp.issue(request.query_params["user"]))
            return Response("ok")

        async def api(request: Request) -> Response:
            async with request.state.token.client(base_url=issuer) as http:
                answer = await http.get("/userinfo")
            return JSONResponse(answer.json(), status_code=answer.status_code)

        refresher = Refresher(client, jitter=0.2)
        middleware = [Middleware(TokenRefreshMiddleware, refresher=refresher, store=store)]
        return Starlette(routes=[Route("/login", login), Route("/api", api)], middleware=middleware)

    sessions: _NaiveSessions | _AuthlibSessions = (
        _NaiveSessions(client, telemetry) if mode == "naive" else _AuthlibSessions(client)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await sessions.aclose()

    async def cookie_login(request: Request) -> Response:
        session_id = sessions.login(idp.issue(request.query_params["user"]))
        response = Response("ok")
        response.set_cookie("sid", session_id, httponly=True)
        return response

    async def cookie_api(request: Request) -> Response:
        session_id = parse_cookie_header(request.headers.get("cookie", "")).get("sid")
        token_set = sessions.sessions.get(session_id or "")
        if session_id is None or token_set is None:
            return JSONResponse({"error": "no session"}, status_code=401)
        return await sessions.api(session_id)

    routes = [Route("/login", cookie_login), Route("/api", cookie_api)]
    return Starlette(routes=routes, lifespan=lifespan)


def _refresh_early(lifetime: float) -> float:
    """How long before expiry a token is refreshed: a minute, at most half its lifetime."""
    return min(60.0, lifetime / 2)


class _NaiveSessions:
    """Hand-rolled refresh, no coordination: the pattern the field reports start from."""

    def __init__(self, client: OAuth2Client, telemetry: Telemetry) -> None:
        self.client = client
        self.telemetry = telemetry
        self.sessions: dict[str, TokenSet] = {}
        self.last_refresh: dict[str, float] = {}
        self.metric_attributes = {PROVIDER: client.name}
        self.http = httpx.AsyncClient(base_url=client.issuer or "")
        # Requests served with the stored token, reported as the library's fresh-path counter.
        self.fresh_hits = 0
        telemetry.observe_fresh(self)

    async def aclose(self) -> None:
        await self.http.aclose()

    def login(self, body: dict[str, Any]) -> str:
        session_id = secrets.token_urlsafe(16)
        self.sessions[session_id] = TokenSet.from_token_response(
            body, issued_at=self.client.clock.time(), default_lifetime=60
        )
        return session_id

    async def api(self, session_id: str) -> JSONResponse:
        from starlette.responses import JSONResponse

        token_set = self.sessions[session_id]
        if self.client.clock.time() >= token_set.expires_at - _refresh_early(token_set.lifetime):
            try:
                token_set = await self._refresh(session_id, token_set)
            except TokenEndpointError:
                return JSONResponse(_REFUSED, status_code=401)
            except RefreshUnavailable:
                return JSONResponse({"error": "unavailable"}, status_code=503)
        else:
            self.fresh_hits += 1
        answer = await self.http.get(
            "/userinfo", headers={"Authorization": f"Bearer {token_set.access_token}"}
        )
        return JSONResponse(answer.json(), status_code=answer.status_code)

    async def _refresh(self, session_id: str, token_set: TokenSet) -> TokenSet:
        telemetry, attributes = self.telemetry, self.metric_attributes
        telemetry.token_requests.add(1, {DEDUPE: "leader", **attributes})
        now = time.monotonic()
        if session_id in self.last_refresh:
            telemetry.interval.record(now - self.last_refresh[session_id], attributes)
        self.last_refresh[session_id] = now
        started = time.perf_counter()
        outcome = "success"
        try:
            assert token_set.refresh_token is not None
            new = await self.client.refresh(token_set.refresh_token, previous=token_set)
        except TokenEndpointError as exc:
            outcome = "invalid_grant" if exc.error == "invalid_grant" else "provider_error"
            telemetry.terminal_failures.add(
                1, {ERROR_TYPE: outcome, COMPONENT: "asgi", **attributes}
            )
            raise
        except RefreshUnavailable as exc:
            outcome = exc.reason
            raise
        finally:
            telemetry.refreshes.add(1, {OUTCOME: outcome, GRANT: "refresh_token", **attributes})
            telemetry.duration.record(
                time.perf_counter() - started, {OUTCOME: outcome, **attributes}
            )
        self.sessions[session_id] = new  # last writer wins: may be an already-revoked grant
        return new


class _AuthlibSessions:
    """Authlib's ``AsyncOAuth2Client``, one per request, from the session's stored token."""

    def __init__(self, client: OAuth2Client) -> None:
        parts = authlib()
        if parts is None:
            raise RuntimeError(AUTHLIB_MISSING)
        self.authlib = parts
        self.issuer = client.issuer or ""
        self.sessions: dict[str, dict[str, Any]] = {}

    async def aclose(self) -> None:
        """Nothing to close: each request's Authlib client has a pool of its own."""

    def login(self, body: dict[str, Any]) -> str:
        # What authorize_access_token hands the app: the token with expires_at (Authlib adds it).
        session_id = secrets.token_urlsafe(16)
        self.sessions[session_id] = dict(self.authlib.token(dict(body)))
        return session_id

    async def api(self, session_id: str) -> JSONResponse:
        from starlette.responses import JSONResponse

        stored = self.sessions[session_id]

        async def update_token(token: dict[str, Any], **_: Any) -> None:
            self.sessions[session_id] = dict(token)  # last writer wins

        lifetime = float(stored.get("expires_in", 60))
        oauth_client = self.authlib.client(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            token=dict(stored),
            token_endpoint=f"{self.issuer}/token",
            update_token=update_token,
            # Authlib's default of 60 s would make the demo's few-second tokens always due;
            # a user of short tokens sets it like the naive column's rule.
            leeway=_refresh_early(lifetime),
            timeout=30,
        )
        try:
            async with oauth_client:
                answer = await oauth_client.get(f"{self.issuer}/userinfo")
        except self.authlib.error as exc:
            return JSONResponse({"error": getattr(exc, "error", None)}, status_code=401)
        except self.authlib.transport_errors:
            return JSONResponse({"error": "unavailable"}, status_code=503)
        return JSONResponse(answer.json(), status_code=answer.status_code)
