"""A Starlette app that logs users in with OIDC and calls the provider with their tokens.

    uvicorn examples.starlette_app:app          # against the in-process FakeIdP at /idp

Configuration comes from the environment (examples/README.md). ``OIDCLogin`` at ``/auth``
serves ``GET /auth/login?next=``, ``GET /auth/callback`` and ``POST /auth/logout``;
``TokenRefreshMiddleware`` gives every request ``request.state.token``, refreshed at most once
per session however many requests find it expired together. A dead session answers 401 JSON
``{"error": "reauthentication_required"}``; a provider outage 503 with ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import html
import json
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from asgi_token_refresh import Clock, OIDCLogin, TokenAccessor, TokenRefreshMiddleware

from ._common import Config


def create_app(*, clock: Clock | None = None) -> Starlette:
    """The app, configured from the environment (``clock`` is for tests)."""
    config = Config.from_env(clock)
    login = OIDCLogin(
        config.client,
        secret_keys=config.secret_keys,
        scope=config.scope,
        redirect_uri=config.redirect_uri,
        post_logout_redirect_uri=config.after_logout_uri,
        secure_cookies=config.secure,
    )

    async def home(request: Request) -> Response:
        claims = await request.state.token.claims()
        if claims is None:
            body = 'Not logged in. <a href="/auth/login?next=/">Log in</a>'
        else:
            body = (
                f"Logged in as {html.escape(str(claims.get('sub')))}. "
                '<a href="/api/me">/api/me</a> <form method="post" action="/auth/logout">'
                '<button type="submit">Log out</button></form>'
            )
        return HTMLResponse(f"<!doctype html><title>asgi-token-refresh</title><p>{body}</p>")

    async def me(request: Request) -> Response:
        token: TokenAccessor = request.state.token
        endpoint = (await config.client.metadata()).userinfo_endpoint
        if endpoint is None:
            return JSONResponse({"error": "the provider has no userinfo endpoint"}, 501)
        try:  # the user's token is injected; a 401 gets one refresh and one retry
            async with token.client(transport=config.provider_transport, timeout=10) as provider:
                userinfo = (await provider.get(endpoint)).raise_for_status().json()
        except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": "the userinfo request failed"}, 502)
        return JSONResponse({"claims": await token.claims(), "userinfo": userinfo})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await config.aclose()

    routes: list[BaseRoute] = [
        Route("/", home),
        Route("/api/me", me),
        Mount("/auth", app=login),
    ]
    if config.idp is not None:
        routes.append(Mount("/idp", app=config.idp))
    middleware = [
        Middleware(TokenRefreshMiddleware, refresher=config.refresher, store=config.store)
    ]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


app = create_app()
