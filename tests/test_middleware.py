"""TokenRefreshMiddleware and request.state.token, in-process, on Starlette and FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from asgi_token_refresh import (
    ConfigurationError,
    CookieSessionStore,
    MemorySessionStore,
    ReauthenticationRequired,
    Refresher,
    ServerSideStore,
    Session,
    SessionStore,
    TokenRefreshMiddleware,
    TokenSet,
)
from asgi_token_refresh.fastapi import Token
from asgi_token_refresh.testing import FakeClock, FakeIdP, Fault

pytestmark = pytest.mark.anyio

EXPIRED = 300.0
APP = "https://app.test"


class CountingStore:
    """Wraps a store and counts its calls (to prove untouched routes cost nothing)."""

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def load(self, cookies: Mapping[str, str]) -> Session | None:
        self._count("load")
        return await self.inner.load(cookies)

    async def save(
        self,
        cookies: Mapping[str, str],
        previous: Session | None,
        token_set: TokenSet | None,
        *,
        new_session: bool = False,
    ) -> tuple[Session | None, list[str]]:
        self._count("save")
        return await self.inner.save(cookies, previous, token_set, new_session=new_session)


class CountingServerSideStore(CountingStore):
    """The same, for a store that can also be read and written without a response."""

    def __init__(self, inner: ServerSideStore) -> None:
        super().__init__(inner)
        self.server_side = inner

    async def read(self, session: Session) -> TokenSet | None:
        return await self.server_side.read(session)

    async def persist(self, session: Session, token_set: TokenSet) -> None:
        self._count("persist")
        await self.server_side.persist(session, token_set)


def starlette_app(idp: FakeIdP, **middleware: Any) -> Starlette:
    async def token(request: Request) -> JSONResponse:
        return JSONResponse({"token": await request.state.token.get()})

    async def headers(request: Request) -> JSONResponse:
        return JSONResponse(await request.state.token.headers())

    async def whoami(request: Request) -> JSONResponse:
        token_set = await request.state.token.token_set()
        return JSONResponse(
            {
                "authenticated": await request.state.token.is_authenticated(),
                "scope": token_set.scope if token_set else None,
            }
        )

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    async def login(request: Request) -> PlainTextResponse:
        await request.state.token.login(idp.issue(request.query_params.get("user", "alice")))
        return PlainTextResponse("welcome")

    async def logout(request: Request) -> PlainTextResponse:
        await request.state.token.logout()
        return PlainTextResponse("bye")

    async def boom(request: Request) -> Response:
        await request.state.token.get()
        raise RuntimeError("the endpoint failed after refreshing")

    async def stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first chunk\n"
            yield (await request.state.token.get()).encode()

        return StreamingResponse(body())

    def sync(request: Request) -> JSONResponse:
        return JSONResponse({"token": request.state.token.sync.get()})

    async def ws(websocket: WebSocket) -> None:
        token = await websocket.state.token.get()
        await websocket.accept()
        await websocket.send_text(token)
        await websocket.close()

    routes = [
        Route("/token", token),
        Route("/headers", headers),
        Route("/whoami", whoami),
        Route("/plain", plain),
        Route("/login", login),
        Route("/logout", logout),
        Route("/boom", boom),
        Route("/stream", stream),
        Route("/sync", sync),
        WebSocketRoute("/ws", ws),
    ]
    return Starlette(routes=routes, middleware=[Middleware(TokenRefreshMiddleware, **middleware)])


def fastapi_app(idp: FakeIdP, **middleware: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TokenRefreshMiddleware, **middleware)

    @app.get("/token")
    async def token(token: Token) -> dict[str, str]:
        return {"token": await token.get()}

    @app.get("/plain")
    async def plain() -> str:
        return "hello"

    @app.get("/login")
    async def login(token: Token, user: str = "alice") -> str:
        await token.login(idp.issue(user))
        return "welcome"

    @app.get("/logout")
    async def logout(token: Token) -> str:
        await token.logout()
        return "bye"

    return app


FRAMEWORKS = {"starlette": starlette_app, "fastapi": fastapi_app}


@pytest.fixture(params=["memory", "cookie"])
def store(request: pytest.FixtureRequest, clock: FakeClock) -> CountingStore:
    if request.param == "memory":
        return CountingServerSideStore(MemorySessionStore(clock=clock))
    return CountingStore(CookieSessionStore(["k" * 32]))


@pytest.fixture(params=list(FRAMEWORKS))
def make_app(
    request: pytest.FixtureRequest, idp: FakeIdP, refresher: Refresher, store: CountingStore
) -> Callable[..., Any]:
    build = FRAMEWORKS[request.param]

    def make(**options: Any) -> Any:
        return build(idp, refresher=refresher, store=store, **options)

    return make


@contextlib.asynccontextmanager
async def browser(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=APP) as client:
        yield client


def set_cookies(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


# -- the happy path ----------------------------------------------------------------------------


async def test_a_route_that_never_touches_the_token_costs_no_store_call(
    make_app: Callable[..., Any], store: CountingStore, idp: FakeIdP
) -> None:
    async with browser(make_app()) as client:
        await client.get("/login")
        store.calls.clear()
        response = await client.get("/plain")
    assert response.status_code == 200
    assert set_cookies(response) == []
    assert store.calls == {}
    assert idp.calls("token") == 0


async def test_login_then_fresh_tokens_write_nothing_back(
    make_app: Callable[..., Any], store: CountingStore, idp: FakeIdP
) -> None:
    async with browser(make_app()) as client:
        login = await client.get("/login")
        assert len(set_cookies(login)) == 1
        first = await client.get("/token")
        second = await client.get("/token")
    assert first.json() == second.json()
    assert set_cookies(first) == set_cookies(second) == []
    assert store.calls["save"] == 1
    assert idp.calls("token") == 0


async def test_an_expired_token_is_refreshed_once_for_50_parallel_requests(
    make_app: Callable[..., Any], idp: FakeIdP, clock: FakeClock
) -> None:
    async with browser(make_app()) as client:
        await client.get("/login")
        before = (await client.get("/token")).json()["token"]
        for _ in range(3):  # three expiry boundaries in a row
            clock.advance(EXPIRED)
            responses = await asyncio.gather(*(client.get("/token") for _ in range(50)))
            assert {r.status_code for r in responses} == {200}
            tokens = {r.json()["token"] for r in responses}
            assert len(tokens) == 1
            assert tokens != {before}
            before = tokens.pop()
    assert idp.token_calls("refresh_token") == 3
    assert idp.grants_revoked == 0


async def test_refreshed_cookie_sessions_are_written_back_and_straggler_cookies_are_served(
    idp: FakeIdP, refresher: Refresher, clock: FakeClock
) -> None:
    store = CookieSessionStore(["k" * 32])
    app = starlette_app(idp, refresher=refresher, store=store)
    async with browser(app) as client:
        await client.get("/login")
        old_cookie = client.cookies["atr_session"]
        clock.advance(EXPIRED)
        refreshed = await client.get("/token")
        assert len(set_cookies(refreshed)) == 1
        new_cookie = client.cookies["atr_session"]
        assert new_cookie != old_cookie
        client.cookies.set("atr_session", old_cookie, domain="app.test")  # a straggler tab
        straggler = await client.get("/token")
    assert straggler.json() == refreshed.json()
    assert len(set_cookies(straggler)) == 1  # handed the new generation
    assert idp.token_calls("refresh_token") == 1


async def test_headers_and_session_introspection(idp: FakeIdP, refresher: Refresher) -> None:
    app = starlette_app(idp, refresher=refresher, store=MemorySessionStore())
    async with browser(app) as client:
        anonymous = (await client.get("/whoami")).json()
        await client.get("/login")
        who = (await client.get("/whoami")).json()
        token = (await client.get("/token")).json()["token"]
        headers = (await client.get("/headers")).json()
    assert anonymous == {"authenticated": False, "scope": None}
    assert who == {"authenticated": True, "scope": "openid offline_access"}
    assert headers == {"Authorization": f"Bearer {token}"}


# -- terminal and transient outcomes ----------------------------------------------------------


async def test_invalid_grant_answers_401_and_clears_the_session(
    make_app: Callable[..., Any], idp: FakeIdP, clock: FakeClock
) -> None:
    async with browser(make_app()) as client:
        await client.get("/login")
        clock.advance(EXPIRED)
        idp.script(Fault.invalid_grant(status=403))
        response = await client.get("/token")
        assert response.status_code == 401
        assert response.json() == {"error": "reauthentication_required", "reason": "invalid_grant"}
        assert "invalid_token" in response.headers["www-authenticate"]
        assert set_cookies(response)
        assert all("Max-Age=0" in c for c in set_cookies(response))
        assert dict(client.cookies) == {}
        again = await client.get("/token")
    assert again.json() == {"error": "reauthentication_required", "reason": "no_session"}
    assert idp.token_calls() == 1


async def test_no_session_is_a_401_without_touching_the_provider(
    make_app: Callable[..., Any], idp: FakeIdP
) -> None:
    async with browser(make_app()) as client:
        response = await client.get("/token")
    assert response.status_code == 401
    assert response.json()["reason"] == "no_session"
    assert idp.calls("token") == 0


@pytest.mark.parametrize(
    "cookie", ["garbage", "v1.1.AAAA", "v1.3." + "A" * 100, "x" * 4000, "v1.1." + "B" * 3000]
)
async def test_garbage_cookies_are_no_session_never_a_500(
    idp: FakeIdP, refresher: Refresher, cookie: str
) -> None:
    store = CookieSessionStore(["k" * 32])
    app = starlette_app(idp, refresher=refresher, store=store)
    async with browser(app) as client:
        client.cookies.set("atr_session", cookie, domain="app.test")
        client.cookies.set("atr_session.1", cookie, domain="app.test")
        response = await client.get("/token")
        plain = await client.get("/plain")
    assert response.status_code == 401
    assert plain.status_code == 200
    assert store.rejected == 1


async def test_redirect_mode_answers_303_and_clears_the_session(
    idp: FakeIdP, refresher: Refresher, clock: FakeClock
) -> None:
    app = starlette_app(
        idp, refresher=refresher, store=MemorySessionStore(), on_terminal="redirect:/signin"
    )
    async with browser(app) as client:
        await client.get("/login")
        clock.advance(EXPIRED)
        idp.script(Fault.invalid_grant())
        response = await client.get("/token")
    assert response.status_code == 303
    assert response.headers["location"] == "/signin"
    assert "Max-Age=0" in response.headers["set-cookie"]


async def test_anonymous_mode_continues_with_a_client_credentials_token(
    idp: FakeIdP, refresher: Refresher, clock: FakeClock
) -> None:
    app = starlette_app(
        idp,
        refresher=refresher,
        store=MemorySessionStore(),
        on_terminal="anonymous",
        anonymous_scope="public",
    )
    async with browser(app) as client:
        nobody = await client.get("/token")
        await client.get("/login")
        clock.advance(EXPIRED)
        idp.script(Fault.invalid_grant())
        dead = await client.get("/token")
    assert nobody.status_code == dead.status_code == 200
    assert "Max-Age=0" in dead.headers["set-cookie"]
    # one machine token before, one after the clock moved past its expiry; no user token
    assert idp.token_calls("client_credentials", "success") == 2
    assert nobody.json() != dead.json()


async def test_raise_mode_lets_the_app_handle_it_and_still_clears_the_session(
    idp: FakeIdP, refresher: Refresher, clock: FakeClock
) -> None:
    async def handler(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ReauthenticationRequired)
        return PlainTextResponse(f"please log in again ({exc.reason})", status_code=401)

    app = starlette_app(idp, refresher=refresher, store=MemorySessionStore(), on_terminal="raise")
    app.add_exception_handler(ReauthenticationRequired, handler)
    async with browser(app) as client:
        await client.get("/login")
        clock.advance(EXPIRED)
        idp.script(Fault.invalid_grant())
        response = await client.get("/token")
    assert response.text == "please log in again (invalid_grant)"
    assert "Max-Age=0" in response.headers["set-cookie"]


async def test_a_provider_outage_answers_503_with_retry_after_and_keeps_the_session(
    make_app: Callable[..., Any], idp: FakeIdP, clock: FakeClock
) -> None:
    async with browser(make_app()) as client:
        await client.get("/login")
        clock.advance(EXPIRED)
        idp.script(Fault.unavailable(retry_after=7))
        down = await client.get("/token")
        assert down.status_code == 503
        assert down.headers["retry-after"] == "7"
        assert down.json() == {"error": "token_refresh_unavailable", "reason": "provider_error"}
        assert set_cookies(down) == []
        clock.advance(7)
        up = await client.get("/token")
    assert up.status_code == 200
    assert idp.token_calls("refresh_token", "success") == 1


# -- write-back edge cases --------------------------------------------------------------------


async def test_a_refresh_is_kept_when_the_endpoint_then_crashes(
    idp: FakeIdP, refresher: Refresher, clock: FakeClock, store: CountingStore
) -> None:
    app = starlette_app(idp, refresher=refresher, store=store)
    async with browser(app) as client:
        await client.get("/login")
        clock.advance(EXPIRED)
        crashed = await client.get("/boom")
        assert crashed.status_code == 500
        # Server-side: persisted by the flight. Cookies: the old cookie is a straggler the
        # grace cache serves. Either way the provider is not asked again and the grant lives.
        after = await client.get("/token")
    assert after.status_code == 200
    assert idp.token_calls("refresh_token") == 1
    assert idp.grants_revoked == 0


async def test_a_refresh_during_a_streamed_response_is_persisted_server_side(
    idp: FakeIdP, refresher: Refresher, clock: FakeClock
) -> None:
    store = CountingServerSideStore(MemorySessionStore(clock=clock))
    app = starlette_app(idp, refresher=refresher, store=store)
    async with browser(app) as client:
        await client.get("/login")
        clock.advance(EXPIRED)
        streamed = await client.get("/stream")
        assert set_cookies(streamed) == []  # headers were gone before the refresh
        token = streamed.text.splitlines()[-1]
        for _ in range(100):  # the flight persists right after releasing its waiters
            if store.calls.get("persist"):
                break
            await asyncio.sleep(0.01)
        again = await client.get("/token")
    assert again.json()["token"] == token
    assert idp.token_calls("refresh_token") == 1


# -- integration points -----------------------------------------------------------------------


def test_sync_endpoints_and_websockets_get_the_accessor_too(
    idp: FakeIdP, refresher: Refresher, clock: FakeClock
) -> None:
    app = starlette_app(idp, refresher=refresher, store=MemorySessionStore())
    with TestClient(app, base_url=APP) as client:
        client.get("/login")
        token = client.get("/token").json()["token"]
        assert client.get("/sync").json()["token"] == token
        clock.advance(EXPIRED)
        refreshed = client.get("/sync").json()["token"]
        assert refreshed != token
        # the test client's jar does not send Secure cookies over wss://; a browser does
        cookie = {"cookie": f"atr_sid={client.cookies['atr_sid']}"}
        with client.websocket_connect("/ws", headers=cookie) as ws:
            assert ws.receive_text() == refreshed
    assert idp.token_calls("refresh_token") == 1


async def test_lifespan_and_other_scopes_pass_through_untouched() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(dict(scope))

    middleware = TokenRefreshMiddleware(
        app, refresher=Refresher.shared(_client()), store=MemorySessionStore()
    )
    await middleware({"type": "lifespan"}, _never, _never)
    assert seen == [{"type": "lifespan"}]


async def test_wraps_any_asgi_callable(idp: FakeIdP, refresher: Refresher) -> None:
    async def raw(scope: Any, receive: Any, send: Any) -> None:
        token = await scope["state"]["token"].get()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": token.encode()})

    store = MemorySessionStore()
    session, _ = await store.save(
        {},
        None,
        TokenSet.from_token_response(idp.issue(), issued_at=idp.clock.time(), default_lifetime=300),
    )
    app = TokenRefreshMiddleware(raw, refresher=refresher, store=store)
    async with browser(app) as client:
        assert session is not None
        client.cookies.set("atr_sid", session.id or "", domain="app.test")
        response = await client.get("/")
    assert response.text == session.token_set.access_token


async def test_logout_revokes_at_the_provider_and_refuses_stragglers(
    make_app: Callable[..., Any], idp: FakeIdP, clock: FakeClock, store: CountingStore
) -> None:
    async with browser(make_app()) as client:
        await client.get("/login")
        cookies = dict(client.cookies)
        token = (await client.get("/token")).json()["token"]
        out = await client.get("/logout")
        assert "Max-Age=0" in out.headers["set-cookie"]
        for name, value in cookies.items():  # a tab that still has the old cookie
            client.cookies.set(name, value, domain="app.test")
        clock.advance(EXPIRED)
        straggler = await client.get("/token")
    assert idp.calls("revoke") == 1
    assert straggler.status_code == 401
    assert token not in straggler.text


def _client() -> Any:
    from asgi_token_refresh import OAuth2Client

    return OAuth2Client(client_id="m", client_secret="s", token_endpoint="https://idp.test/token")


async def _never(*args: Any) -> Any:
    raise AssertionError("not called")


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({}, "needs client="),
        ({"client": "x", "on_terminal": "teapot"}, "on_terminal must be"),
        ({"client": "x", "on_terminal": "redirect:login"}, "needs a path"),
        ({"client": "x", "store": object()}, "must implement SessionStore"),
    ],
)
def test_configuration_is_validated_at_construction(
    options: dict[str, Any], complaint: str
) -> None:
    if options.get("client") == "x":
        options["client"] = _client()
    with pytest.raises(ConfigurationError, match=complaint):
        TokenRefreshMiddleware(_never, **options)


def test_the_fastapi_dependency_explains_a_missing_middleware() -> None:
    app = FastAPI()

    @app.get("/")
    async def endpoint(token: Token) -> str:
        return await token.get()

    with (
        TestClient(app, raise_server_exceptions=True) as client,
        pytest.raises(ConfigurationError, match="add TokenRefreshMiddleware"),
    ):
        client.get("/")


# -- frameworks that catch exceptions themselves ------------------------------------------------


def catching_framework(inner: Any) -> Any:
    """An ASGI app that turns every exception into its own 500 page before it reaches the
    middleware, as Litestar and Quart do."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await inner(scope, receive, send)
        except Exception:
            headers = [(b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": b"Internal Server Error"})

    return app


@pytest.fixture
def behind_a_framework(idp: FakeIdP, refresher: Refresher, clock: FakeClock) -> Any:
    def make(**options: Any) -> Any:
        routes = starlette_app(idp).router  # the routes, without the middleware
        store = MemorySessionStore(clock=clock)
        return TokenRefreshMiddleware(
            catching_framework(routes), refresher=refresher, store=store, **options
        )

    return make


async def test_a_framework_500_page_for_a_dead_session_becomes_the_documented_401(
    behind_a_framework: Any, idp: FakeIdP, clock: FakeClock
) -> None:
    async with browser(behind_a_framework()) as client:
        await client.get("/login")
        clock.advance(EXPIRED)
        idp.script(Fault.invalid_grant())
        response = await client.get("/token")
        assert response.status_code == 401
        assert response.json() == {"error": "reauthentication_required", "reason": "invalid_grant"}
        assert all("Max-Age=0" in c for c in set_cookies(response))
        assert dict(client.cookies) == {}


async def test_a_framework_500_page_for_a_provider_outage_becomes_a_503_and_keeps_the_session(
    behind_a_framework: Any, idp: FakeIdP, clock: FakeClock
) -> None:
    async with browser(behind_a_framework(on_terminal="redirect:/login")) as client:
        await client.get("/login")
        clock.advance(EXPIRED)
        idp.script(Fault.unavailable(retry_after=7))
        response = await client.get("/token")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
        assert response.json()["error"] == "token_refresh_unavailable"
        clock.advance(7)
        recovered = await client.get("/token")
    assert recovered.status_code == 200
    assert idp.token_calls("refresh_token", "success") == 1


async def test_a_framework_500_unrelated_to_tokens_stays_the_frameworks(
    behind_a_framework: Any,
) -> None:
    async with browser(behind_a_framework()) as client:
        await client.get("/login")
        response = await client.get("/boom")  # the endpoint fails after a fresh get()
    assert response.status_code == 500
    assert response.text == "Internal Server Error"


async def test_starlettes_own_500_handler_does_not_hide_the_401_nor_leak_the_exception(
    idp: FakeIdP, refresher: Refresher, clock: FakeClock
) -> None:
    async def custom_500(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("custom error page", status_code=500)

    app = starlette_app(idp, refresher=refresher, store=MemorySessionStore(clock=clock))
    app.add_exception_handler(Exception, custom_500)  # Starlette sends it, then re-raises
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url=APP) as client:
        await client.get("/login")
        clock.advance(EXPIRED)
        idp.script(Fault.invalid_grant())
        response = await client.get("/token")  # no exception escapes the middleware
    assert response.status_code == 401
    assert response.json()["reason"] == "invalid_grant"


# -- logout always wins ---------------------------------------------------------------------


async def test_a_refresh_in_flight_when_logout_runs_never_brings_the_session_back(
    make_app: Callable[..., Any], idp: FakeIdP, clock: FakeClock, store: CountingStore
) -> None:
    async with browser(make_app()) as client:
        await client.get("/login")
        before_logout = dict(client.cookies)
        clock.advance(EXPIRED)
        gate = idp.pause_token_endpoint()
        parked = asyncio.create_task(client.get("/token"))  # its refresh waits at the provider
        await gate.arrived(1)
        await client.get("/logout")
        gate.release()
        answer = await parked
        for name, value in before_logout.items():  # a tab that still has the old cookie
            client.cookies.set(name, value, domain="app.test")
        replayed = await client.get("/token")
        clock.advance(EXPIRED)
        later = await client.get("/token")
    assert answer.status_code == 401  # the tokens issued after logout are nobody's
    assert all("Max-Age=0" in cookie for cookie in set_cookies(answer))
    assert replayed.status_code == later.status_code == 401
    assert idp.token_calls("refresh_token") == 1  # the parked one, refused: the grant is revoked
    assert idp.grants_revoked == 1
    if isinstance(store, CountingServerSideStore):
        assert len(store.server_side) == 0  # type: ignore[arg-type]


class HeldAnswers(httpx.AsyncBaseTransport):
    """Lets the provider process each request at once but holds its answer until released:
    a refresh that the provider has already answered when logout runs."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.answered = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if b"grant_type=refresh_token" in request.content:
            self.answered.set()
            await self.release.wait()
        return response


@pytest.mark.parametrize("store_kind", ["memory", "cookie"])
async def test_a_refresh_the_provider_answered_before_logout_never_brings_the_session_back(
    idp: FakeIdP, clock: FakeClock, store_kind: str
) -> None:
    from asgi_token_refresh import OAuth2Client

    held = HeldAnswers(idp.transport())
    client = OAuth2Client.from_discovery(
        "https://idp.test", client_id="app", client_secret="app-secret", transport=held, clock=clock
    )
    refresher = Refresher(client, jitter=0)
    memory = MemorySessionStore(clock=clock)
    store = memory if store_kind == "memory" else CookieSessionStore(["k" * 32])
    async with browser(starlette_app(idp, refresher=refresher, store=store)) as browser_:
        await browser_.get("/login")
        before_logout = dict(browser_.cookies)
        clock.advance(EXPIRED)
        parked = asyncio.create_task(browser_.get("/token"))
        await held.answered.wait()  # the provider has rotated the grant and answered
        await browser_.get("/logout")
        held.release.set()
        answer = await parked
        for name, value in before_logout.items():
            browser_.cookies.set(name, value, domain="app.test")
        replayed = await browser_.get("/token")
    assert idp.token_calls("refresh_token", "success") == 1
    assert answer.status_code == 401
    assert all("Max-Age=0" in cookie for cookie in set_cookies(answer))
    assert replayed.status_code == 401
    assert len(memory) == 0
    assert idp.calls("revoke") == 2  # the session's grant at logout, the orphaned tokens after


# -- login edges --------------------------------------------------------------------------------


async def test_tokens_too_large_for_cookies_are_refused_at_login_not_at_write_back(
    idp: FakeIdP, refresher: Refresher, clock: FakeClock
) -> None:
    huge = TokenSet("a" * 80_000, clock.time() + 300, clock.time(), "r" * 40)

    async def login(request: Request) -> PlainTextResponse:
        await request.state.token.login(huge)
        return PlainTextResponse("welcome")

    store = CookieSessionStore(["k" * 32])
    app = Starlette(
        routes=[Route("/login", login)],
        middleware=[Middleware(TokenRefreshMiddleware, refresher=refresher, store=store)],
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url=APP) as client:
        response = await client.get("/login")
    assert response.status_code == 400
    assert "too large to keep in cookies" in response.text
    assert "set-cookie" not in response.headers


async def test_secure_cookies_over_plain_http_are_called_out_once(
    make_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as client:
        for _ in range(3):  # the stores set Secure cookies, the client drops them
            await client.get("/login")
    assert caplog.text.count("came over plain http") == 1


def test_the_sync_accessor_logs_in_reads_claims_and_logs_out(
    idp: FakeIdP, refresher: Refresher, clock: FakeClock
) -> None:
    def login(request: Request) -> PlainTextResponse:
        request.state.token.sync.login(idp.issue("alice"))
        return PlainTextResponse("welcome")

    seen: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200)

    def me(request: Request) -> JSONResponse:
        token = request.state.token.sync
        with token.client(base_url="https://api.test", transport=httpx.MockTransport(api)) as c:
            status = c.get("/orders").status_code
        return JSONResponse({"claims": token.claims(), "api": status})

    def logout(request: Request) -> PlainTextResponse:
        request.state.token.sync.logout()
        return PlainTextResponse("bye")

    store = MemorySessionStore(secure=False, clock=clock)
    app = Starlette(
        routes=[Route("/login", login), Route("/me", me), Route("/logout", logout)],
        middleware=[Middleware(TokenRefreshMiddleware, refresher=refresher, store=store)],
    )
    with TestClient(app, base_url="http://app.test") as browser_:
        browser_.get("/login")
        assert browser_.get("/me").json() == {"claims": None, "api": 200}
        browser_.get("/logout")
        assert len(store) == 0
    assert idp.calls("revoke") == 1
    assert [header.split()[0] for header in seen] == ["Bearer"]
