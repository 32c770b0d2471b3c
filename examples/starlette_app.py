"""A Starlette app that logs users in with OIDC and calls an API with their refreshed tokens.

    uvicorn examples.starlette_app:app                       # against the in-process FakeIdP
    OIDC_ISSUER=https://login.example.com OIDC_CLIENT_ID=... OIDC_CLIENT_SECRET=... \
        SESSION_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') \
        uvicorn examples.starlette_app:app                   # against a real provider

``TokenRefreshMiddleware`` puts ``request.state.token`` on every request: ``await
token.headers()`` is the user's fresh ``Authorization`` header, refreshed at most once per
session however many requests find it expired together. A dead session answers 401 JSON
``{"error": "reauthentication_required"}``; a provider outage 503 with ``Retry-After``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from asgi_token_refresh import Clock, TokenAccessor, TokenRefreshMiddleware

from ._common import LOGIN_COOKIE, LOGIN_TTL, OIDC, LoginError, home_page


def create_app(*, clock: Clock | None = None) -> Starlette:
    """The app, configured from the environment (``clock`` is for tests)."""
    oidc = OIDC.from_env(clock)

    async def home(request: Request) -> Response:
        token: TokenAccessor = request.state.token
        return home_page(await token.is_authenticated())

    async def login(request: Request) -> Response:
        started = await oidc.start_login()
        response = RedirectResponse(started.url, status_code=303)
        response.set_cookie(
            LOGIN_COOKIE,
            started.state,
            max_age=LOGIN_TTL,
            path="/callback",
            secure=oidc.secure_cookies,
            httponly=True,
            samesite="lax",  # sent on the provider's top-level redirect back to us
        )
        return response

    async def callback(request: Request) -> Response:
        token: TokenAccessor = request.state.token
        try:
            token_set = await oidc.finish_login(
                request.query_params, request.cookies.get(LOGIN_COOKIE)
            )
        except LoginError as exc:
            response: Response = PlainTextResponse(f"Login failed: {exc}", status_code=400)
        else:
            await token.login(token_set)  # a new session; the middleware sets its cookie
            response = RedirectResponse("/", status_code=303)
        response.delete_cookie(LOGIN_COOKIE, path="/callback")
        return response

    async def me(request: Request) -> Response:
        return await oidc.userinfo(request.state.token)

    async def logout(request: Request) -> Response:
        token: TokenAccessor = request.state.token
        await token.logout()  # revokes the refresh token at the provider (RFC 7009)
        return RedirectResponse("/", status_code=303)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await oidc.aclose()

    routes: list[BaseRoute] = [
        Route("/", home),
        Route("/login", login),
        Route("/callback", callback),
        Route("/api/me", me),
        Route("/logout", logout, methods=["GET", "POST"]),
    ]
    if oidc.idp is not None:
        routes.append(Mount("/idp", app=oidc.idp))
    middleware = [
        Middleware(
            TokenRefreshMiddleware,
            refresher=oidc.refresher,
            store=oidc.store,
            on_terminal="401",
        )
    ]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


app = create_app()
