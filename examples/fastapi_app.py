"""The Starlette example as a FastAPI app, with the ``Token`` dependency.

    uvicorn examples.fastapi_app:app            # against the in-process FakeIdP at /idp

Configuration comes from the environment (examples/README.md). ``OIDCLogin`` at ``/auth``
serves ``GET /auth/login?next=``, ``GET /auth/callback`` and ``POST /auth/logout``; ``Token``
is the request's :class:`~asgi_token_refresh.TokenAccessor`, provided by
``TokenRefreshMiddleware``. ``RESPONSES`` documents its answers in OpenAPI: 401 JSON
``{"error": "reauthentication_required"}`` for a dead session, 503 with ``Retry-After`` when
the provider is down.
"""

from __future__ import annotations

import contextlib
import html
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from asgi_token_refresh import Clock, OIDCLogin, TokenRefreshMiddleware
from asgi_token_refresh.fastapi import RESPONSES, Token

from ._common import Config


def create_app(*, clock: Clock | None = None) -> FastAPI:
    """The app, configured from the environment (``clock`` is for tests)."""
    config = Config.from_env(clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await config.aclose()

    app = FastAPI(responses=RESPONSES, lifespan=lifespan)
    app.add_middleware(TokenRefreshMiddleware, refresher=config.refresher, store=config.store)
    app.mount(
        "/auth",
        OIDCLogin(
            config.client,
            secret_keys=config.secret_keys,
            scope=config.scope,
            redirect_uri=config.redirect_uri,
            post_logout_redirect_uri=config.after_logout_uri,
            secure_cookies=config.secure,
        ),
    )
    if config.idp is not None:
        app.mount("/idp", config.idp)

    @app.get("/", response_class=HTMLResponse)
    async def home(token: Token) -> str:
        claims = await token.claims()
        if claims is None:
            body = 'Not logged in. <a href="/auth/login?next=/">Log in</a>'
        else:
            body = (
                f"Logged in as {html.escape(str(claims.get('sub')))}. "
                '<a href="/api/me">/api/me</a> <form method="post" action="/auth/logout">'
                '<button type="submit">Log out</button></form>'
            )
        return f"<!doctype html><title>asgi-token-refresh</title><p>{body}</p>"

    @app.get("/api/me")
    async def me(token: Token) -> Any:
        endpoint = (await config.client.metadata()).userinfo_endpoint
        if endpoint is None:
            return JSONResponse({"error": "the provider has no userinfo endpoint"}, 501)
        try:  # the user's token is injected; a 401 gets one refresh and one retry
            async with token.client(transport=config.provider_transport, timeout=10) as provider:
                userinfo = (await provider.get(endpoint)).raise_for_status().json()
        except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": "the userinfo request failed"}, 502)
        return {"claims": await token.claims(), "userinfo": userinfo}

    return app


app = create_app()
