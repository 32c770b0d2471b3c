"""The README's "Works with" matrix: each framework x each outcome, as a browser sees it.

Every app has the same routes, written the way that framework's users write them: ``/login``
starts a session, ``/token`` awaits ``request.state.token.get()``, ``/boom`` does and crashes.
Litestar and Quart catch the endpoint's exceptions and send their own 500 page before an
outer middleware sees them; Starlette's ``ServerErrorMiddleware`` sends its 500 and re-raises.
The middleware must answer as documented in every case, and nothing may escape to the server
afterwards: the transport re-raises anything the app lets through, as a server would log it.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import litestar
import pytest
import quart
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from asgi_token_refresh import CookieSessionStore, Refresher, TokenRefreshMiddleware
from asgi_token_refresh.fastapi import Token
from asgi_token_refresh.testing import FakeClock, FakeIdP, Fault

pytestmark = pytest.mark.anyio

EXPIRED = 300.0
APP = "https://app.test"  # https: the session cookie is Secure
SESSION_COOKIE = "atr_session"

ASGIApp = Callable[..., Any]


# -- one small app per framework ----------------------------------------------------------------


def starlette_routes(idp: FakeIdP) -> list[Route]:
    async def login(request: Request) -> PlainTextResponse:
        await request.state.token.login(idp.issue("alice"))
        return PlainTextResponse("welcome")

    async def token(request: Request) -> JSONResponse:
        return JSONResponse({"token": await request.state.token.get()})

    async def boom(request: Request) -> JSONResponse:
        await request.state.token.get()
        raise RuntimeError("the endpoint failed after refreshing")

    return [Route("/login", login), Route("/token", token), Route("/boom", boom)]


def starlette_app(idp: FakeIdP, **middleware: Any) -> ASGIApp:
    """The documented way: ``add_middleware``, inside Starlette's error middleware."""
    app = Starlette(routes=starlette_routes(idp))
    app.add_middleware(TokenRefreshMiddleware, **middleware)
    return app


def starlette_wrapped_app(idp: FakeIdP, *, debug: bool = False, **middleware: Any) -> ASGIApp:
    """Starlette wrapped from outside: its ``ServerErrorMiddleware`` sends a 500 page, then
    re-raises the exception."""
    return TokenRefreshMiddleware(
        Starlette(debug=debug, routes=starlette_routes(idp)), **middleware
    )


def fastapi_app(idp: FakeIdP, **middleware: Any) -> ASGIApp:
    app = FastAPI()
    app.add_middleware(TokenRefreshMiddleware, **middleware)

    @app.get("/login")
    async def login(token: Token) -> str:
        await token.login(idp.issue("alice"))
        return "welcome"

    @app.get("/token")
    async def get_token(token: Token) -> dict[str, str]:
        return {"token": await token.get()}

    @app.get("/boom")
    async def boom(token: Token) -> None:
        await token.get()
        raise RuntimeError("the endpoint failed after refreshing")

    return app


def litestar_app(idp: FakeIdP, *, debug: bool = False, **middleware: Any) -> ASGIApp:
    @litestar.get("/login")
    async def login(request: litestar.Request[Any, Any, Any]) -> str:
        await request.state.token.login(idp.issue("alice"))
        return "welcome"

    @litestar.get("/token")
    async def token(request: litestar.Request[Any, Any, Any]) -> dict[str, str]:
        return {"token": await request.state.token.get()}

    @litestar.get("/boom")
    async def boom(request: litestar.Request[Any, Any, Any]) -> None:
        await request.state.token.get()
        raise RuntimeError("the endpoint failed after refreshing")

    # logging_config=None: Litestar's default reconfigures the root logger of the whole test
    # process. It changes nothing here: the exception is turned into a 500 page either way.
    app = litestar.Litestar([login, token, boom], debug=debug, logging_config=None)
    return TokenRefreshMiddleware(app, **middleware)


def quart_app(idp: FakeIdP, *, propagate: bool = False, **middleware: Any) -> ASGIApp:
    app = quart.Quart(__name__)
    app.config["PROPAGATE_EXCEPTIONS"] = propagate  # True is what testing and debug imply

    @app.get("/login")
    async def login() -> str:
        await quart.request.scope["state"]["token"].login(idp.issue("alice"))
        return "welcome"

    @app.get("/token")
    async def token() -> dict[str, str]:
        return {"token": await quart.request.scope["state"]["token"].get()}

    @app.get("/boom")
    async def boom() -> str:
        await quart.request.scope["state"]["token"].get()
        raise RuntimeError("the endpoint failed after refreshing")

    return TokenRefreshMiddleware(app, **middleware)


def raw_asgi_app(idp: FakeIdP, **middleware: Any) -> ASGIApp:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        accessor = scope["state"]["token"]
        if scope["path"] == "/login":
            await accessor.login(idp.issue("alice"))
            body, content_type = b"welcome", b"text/plain"
        else:
            body = json.dumps({"token": await accessor.get()}).encode()
            content_type = b"application/json"
            if scope["path"] == "/boom":
                raise RuntimeError("the endpoint failed after refreshing")
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return TokenRefreshMiddleware(app, **middleware)


FRAMEWORKS: dict[str, Callable[..., ASGIApp]] = {
    "starlette": starlette_app,
    "starlette-wrapped": starlette_wrapped_app,
    "fastapi": fastapi_app,
    "litestar": litestar_app,
    "quart": quart_app,
    "raw-asgi": raw_asgi_app,
}


#: Where the framework's own 500 page passes through the middleware on its way out.
PAGES_PASS_THROUGH = {"starlette-wrapped", "litestar", "quart"}


@pytest.fixture(params=list(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def make_app(framework: str, idp: FakeIdP, refresher: Refresher) -> Callable[..., ASGIApp]:
    build = FRAMEWORKS[framework]

    def make(**options: Any) -> ASGIApp:
        return build(idp, refresher=refresher, store=CookieSessionStore(["k" * 32]), **options)

    return make


@contextlib.asynccontextmanager
async def browser(app: ASGIApp, *, crashes: bool = False) -> AsyncIterator[httpx.AsyncClient]:
    """A client with a cookie jar, logged in. Unless a crash is expected, the transport
    re-raises whatever the app lets escape (a server would log it as a crash), even after a
    complete response."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=not crashes)
    async with httpx.AsyncClient(transport=transport, base_url=APP) as client:
        login = await client.get("/login")
        assert login.status_code == 200
        assert SESSION_COOKIE in client.cookies
        yield client


def set_cookies(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


def assert_json_answer(response: httpx.Response, status: int, body: dict[str, str]) -> None:
    """Exactly the middleware's answer: none of the framework's 500 page leaks into it."""
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == body


# -- the matrix ----------------------------------------------------------------------------------


async def test_a_fresh_token_reaches_the_route(
    make_app: Callable[..., ASGIApp], idp: FakeIdP
) -> None:
    async with browser(make_app()) as client:
        response = await client.get("/token")
    assert response.status_code == 200
    assert response.json()["token"]
    assert set_cookies(response) == []  # nothing changed, nothing written
    assert idp.calls("token") == 0


async def test_an_expired_token_is_refreshed_and_the_cookie_rewritten(
    make_app: Callable[..., ASGIApp], idp: FakeIdP, clock: FakeClock
) -> None:
    async with browser(make_app()) as client:
        before = (await client.get("/token")).json()["token"]
        clock.advance(EXPIRED)
        refreshed = await client.get("/token")
        again = await client.get("/token")
    assert refreshed.status_code == 200
    assert refreshed.json()["token"] != before
    assert len(set_cookies(refreshed)) == 1
    assert again.json() == refreshed.json()
    assert idp.token_calls("refresh_token", "success") == 1


async def test_a_dead_session_answers_401_and_clears_the_cookie(
    make_app: Callable[..., ASGIApp], idp: FakeIdP, clock: FakeClock
) -> None:
    async with browser(make_app(on_terminal="401")) as client:
        clock.advance(EXPIRED)
        idp.script(Fault.invalid_grant())
        dead = await client.get("/token")
        assert_json_answer(
            dead, 401, {"error": "reauthentication_required", "reason": "invalid_grant"}
        )
        assert dead.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
        assert set_cookies(dead)
        assert all("Max-Age=0" in cookie for cookie in set_cookies(dead))
        assert dict(client.cookies) == {}
        again = await client.get("/token")
    assert_json_answer(again, 401, {"error": "reauthentication_required", "reason": "no_session"})
    assert idp.token_calls() == 1


async def test_a_dead_session_redirects_to_the_login_page(
    make_app: Callable[..., ASGIApp], idp: FakeIdP, clock: FakeClock
) -> None:
    async with browser(make_app(on_terminal="redirect:/login")) as client:
        clock.advance(EXPIRED)
        idp.script(Fault.invalid_grant())
        dead = await client.get("/token")
        assert dict(client.cookies) == {}
    assert dead.status_code == 303
    assert dead.headers["location"] == "/login"
    assert dead.content == b""
    assert all("Max-Age=0" in cookie for cookie in set_cookies(dead))


@pytest.mark.parametrize(
    ("fault", "retry_after"), [(Fault.unavailable(retry_after=7), 7), (Fault.server_error(), 5)]
)
async def test_a_provider_outage_answers_503_and_keeps_the_session(
    make_app: Callable[..., ASGIApp],
    idp: FakeIdP,
    clock: FakeClock,
    fault: Fault,
    retry_after: int,
) -> None:
    async with browser(make_app()) as client:
        cookie = client.cookies[SESSION_COOKIE]
        clock.advance(EXPIRED)
        idp.script(fault)
        down = await client.get("/token")
        assert_json_answer(
            down, 503, {"error": "token_refresh_unavailable", "reason": "provider_error"}
        )
        assert down.headers["retry-after"] == str(retry_after)
        assert set_cookies(down) == []
        assert client.cookies[SESSION_COOKIE] == cookie
        clock.advance(retry_after)  # the provider is back once Retry-After has passed
        up = await client.get("/token")
    assert up.status_code == 200
    assert len(set_cookies(up)) == 1
    assert idp.token_calls("refresh_token", "success") == 1
    assert idp.grants_revoked == 0


# -- around the matrix ---------------------------------------------------------------------------


async def test_an_unrelated_crash_stays_a_500_and_the_refresh_is_kept(
    make_app: Callable[..., ASGIApp], framework: str, idp: FakeIdP, clock: FakeClock
) -> None:
    async with browser(make_app(), crashes=True) as client:
        clock.advance(EXPIRED)
        crashed = await client.get("/boom")  # refreshed, then the endpoint failed
        assert crashed.status_code == 500
        assert b"reauthentication_required" not in crashed.content
        assert SESSION_COOKIE in client.cookies
        # A 500 page that passes through the middleware carries the refreshed cookie; elsewhere
        # the old cookie is a straggler the grace cache serves. The provider is not asked again.
        assert bool(set_cookies(crashed)) == (framework in PAGES_PASS_THROUGH)
        after = await client.get("/token")
    assert after.status_code == 200
    assert idp.token_calls("refresh_token") == 1
    assert idp.grants_revoked == 0


@pytest.mark.parametrize(
    "build",
    [
        functools.partial(litestar_app, debug=True),  # a traceback page, not the plain 500
        functools.partial(quart_app, propagate=True),  # Quart re-raises instead of a 500
        functools.partial(starlette_wrapped_app, debug=True),
    ],
    ids=["litestar-debug", "quart-propagating", "starlette-wrapped-debug"],
)
async def test_debug_modes_get_the_same_answers(
    build: Callable[..., ASGIApp], idp: FakeIdP, refresher: Refresher, clock: FakeClock
) -> None:
    app = build(idp, refresher=refresher, store=CookieSessionStore(["k" * 32]))
    async with browser(app) as client:
        clock.advance(EXPIRED)
        idp.script(Fault.unavailable(retry_after=7))
        down = await client.get("/token")
        clock.advance(7)
        idp.script(Fault.invalid_grant())
        dead = await client.get("/token")
    assert_json_answer(
        down, 503, {"error": "token_refresh_unavailable", "reason": "provider_error"}
    )
    assert_json_answer(dead, 401, {"error": "reauthentication_required", "reason": "invalid_grant"})
    assert all("Max-Age=0" in cookie for cookie in set_cookies(dead))
