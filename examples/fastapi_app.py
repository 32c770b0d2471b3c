"""The Starlette example as a FastAPI app, with the ``Token`` dependency.

    uvicorn examples.fastapi_app:app                         # against the in-process FakeIdP

Configuration is the same environment variables (see examples/README.md). ``Token`` is the
request's :class:`~asgi_token_refresh.TokenAccessor`, provided by ``TokenRefreshMiddleware``:
``await token.headers()`` is the user's fresh ``Authorization`` header. A dead session answers
401 JSON ``{"error": "reauthentication_required"}``; a provider outage 503 with ``Retry-After``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response

from asgi_token_refresh import Clock, TokenRefreshMiddleware
from asgi_token_refresh.fastapi import Token

from ._common import LOGIN_COOKIE, LOGIN_TTL, OIDC, LoginError, home_page


def create_app(*, clock: Clock | None = None) -> FastAPI:
    """The app, configured from the environment (``clock`` is for tests)."""
    oidc = OIDC.from_env(clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await oidc.aclose()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        TokenRefreshMiddleware, refresher=oidc.refresher, store=oidc.store, on_terminal="401"
    )
    if oidc.idp is not None:
        app.mount("/idp", oidc.idp)

    @app.get("/")
    async def home(token: Token) -> Response:
        return home_page(await token.is_authenticated())

    @app.get("/login")
    async def login() -> Response:
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

    @app.get("/callback")
    async def callback(request: Request, token: Token) -> Response:
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

    @app.get("/api/me")
    async def me(token: Token) -> Response:
        return await oidc.userinfo(token)

    @app.api_route("/logout", methods=["GET", "POST"])
    async def logout(token: Token) -> Response:
        await token.logout()  # revokes the refresh token at the provider (RFC 7009)
        return RedirectResponse("/", status_code=303)

    return app


app = create_app()
