"""The web examples end to end, over real sockets: a strict FakeIdP and the example app each run
in uvicorn on loopback, the app talks to the IdP over HTTP, and an httpx client with a cookie
jar plays the browser. Time moves only with the shared FakeClock."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.applications import Starlette

from asgi_token_refresh import (
    CookieSessionStore,
    FileCoordinator,
    LocalCoordinator,
    MemorySessionStore,
    TokenSet,
)
from asgi_token_refresh.redis import RedisCoordinator, RedisSessionStore
from asgi_token_refresh.testing import FakeClock, FakeIdP, Fault, serve
from examples import fastapi_app, starlette_app
from examples._common import OIDC, FilePendingLogins, MemoryPendingLogins, RedisPendingLogins

from .processes import RedisServer, free_port

pytestmark = pytest.mark.anyio

CREATE_APP: dict[str, Callable[..., Starlette]] = {
    "starlette": starlette_app.create_app,
    "fastapi": fastapi_app.create_app,
}
SESSION_SECRET = "e2e-session-secret-" + "k" * 32
COOKIE_NAMES = {"memory": "atr_sid", "cookie": "atr_session"}
EXPIRED = 300.0  # FakeIdP's access-token lifetime: advancing this far makes tokens due
BOTH_STORES = pytest.mark.parametrize("store_kind", ["memory", "cookie"])
COOKIE_STORE = pytest.mark.parametrize("store_kind", ["cookie"])


@dataclass
class Stack:
    app_url: str
    idp_url: str
    idp: FakeIdP
    clock: FakeClock
    cookie_name: str  # the session cookie of the store in use

    def browser(self, cookies: dict[str, str] | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.app_url, cookies=cookies, timeout=10.0)


class Servers:
    """serve() apps one after the other; stop them all at once (each takes a uvicorn tick)."""

    def __init__(self) -> None:
        self._running: list[contextlib.AbstractContextManager[str]] = []

    def start(self, app: Callable[..., Awaitable[None]], port: int = 0) -> str:
        server = serve(app, port=port)
        url = server.__enter__()
        self._running.append(server)
        return url

    def stop(self) -> None:
        with ThreadPoolExecutor() as pool:
            list(pool.map(lambda server: server.__exit__(None, None, None), self._running))


@pytest.fixture(params=sorted(CREATE_APP))
def framework(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def store_kind() -> str:
    return "memory"


@pytest.fixture
def stack(framework: str, store_kind: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    clock = FakeClock()
    # Strict: rotation on, no grace, a reused refresh token revokes the grant.
    idp = FakeIdP(issuer=None, clock=clock)  # issuer = the URL it is served at
    servers = Servers()
    try:
        idp_url = servers.start(idp)
        # The app must know its own URL (the redirect URI) before it is served.
        port = free_port()
        app_url = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("OIDC_ISSUER", idp_url)
        monkeypatch.setenv("OIDC_CLIENT_ID", "app")
        monkeypatch.setenv("OIDC_CLIENT_SECRET", "app-secret")
        monkeypatch.setenv("APP_BASE_URL", app_url)
        monkeypatch.delenv("OIDC_SCOPE", raising=False)
        if store_kind == "cookie":
            monkeypatch.setenv("SESSION_SECRET", SESSION_SECRET)
        else:
            monkeypatch.delenv("SESSION_SECRET", raising=False)
        servers.start(CREATE_APP[framework](clock=clock), port=port)
        yield Stack(app_url, idp_url, idp, clock, COOKIE_NAMES[store_kind])
    finally:
        idp.close()
        servers.stop()


async def log_in(stack: Stack, browser: httpx.AsyncClient) -> httpx.Response:
    """/login -> the IdP's /authorize -> /callback -> /, following redirects across both hosts."""
    response = await browser.get("/login", follow_redirects=True)
    assert response.status_code == 200, response.text
    assert str(response.url) == stack.app_url + "/"
    assert "Logged in" in response.text
    assert browser.cookies.get(stack.cookie_name)
    return response


async def token_set_in(cookie: str) -> TokenSet:
    """What a CookieSessionStore cookie holds (the test knows the app's secret)."""
    store = CookieSessionStore([SESSION_SECRET], secure=False)
    session = await store.load({"atr_session": cookie})
    assert session is not None
    return session.token_set


def cleared(response: httpx.Response, cookie_name: str) -> bool:
    return any(
        c.startswith(f"{cookie_name}=;") and "Max-Age=0" in c
        for c in response.headers.get_list("set-cookie")
    )


async def get_me(browser: httpx.AsyncClient, n: int) -> list[httpx.Response]:
    return list(await asyncio.gather(*(browser.get("/api/me") for _ in range(n))))


# -- login ------------------------------------------------------------------------------------


@BOTH_STORES
async def test_full_login_then_api_me_returns_the_subject(stack: Stack) -> None:
    async with stack.browser() as browser:
        assert "Not logged in" in (await browser.get("/")).text
        response = await log_in(stack, browser)
        login, authorize, callback, _ = (r.request.url for r in (*response.history, response))
        assert login.path == "/login"
        query = parse_qs(urlsplit(str(authorize)).query)
        assert authorize.path == "/authorize"
        assert query["code_challenge_method"] == ["S256"]
        assert query["prompt"] == ["consent"]  # added for offline_access
        assert query["redirect_uri"] == [stack.app_url + "/callback"]
        assert query["state"]
        assert query["nonce"]
        assert callback.path == "/callback"
        session_cookie = next(
            c
            for c in response.history[-1].headers.get_list("set-cookie")
            if c.startswith(stack.cookie_name + "=")
        )
        assert "HttpOnly" in session_cookie
        assert "SameSite=Lax" in session_cookie

        me = await browser.get("/api/me")
        assert me.status_code == 200
        assert me.json()["sub"] == "alice"
    assert stack.idp.token_calls("authorization_code", "success") == 1
    assert stack.idp.token_calls("refresh_token") == 0


async def test_callback_errors_answer_400_never_500(stack: Stack) -> None:
    async with stack.browser() as browser, stack.browser() as attacker:
        assert (await browser.get("/callback")).status_code == 400
        refused = await browser.get("/callback", params={"error": "access_denied"})
        assert refused.status_code == 400
        assert "access_denied" in refused.text
        unknown = await browser.get("/callback", params={"code": "x", "state": "unknown"})
        assert unknown.status_code == 400
        assert "log in again" in unknown.text

        async def callback_url(client: httpx.AsyncClient) -> str:
            to_idp = await client.get("/login")
            assert to_idp.status_code == 303
            async with httpx.AsyncClient() as user_agent:
                to_app = await user_agent.get(to_idp.headers["location"])
            assert to_app.status_code == 302
            return str(to_app.headers["location"])

        # Login CSRF: the attacker's callback URL in the victim's browser is refused.
        forced = await browser.get(await callback_url(attacker))
        assert forced.status_code == 400
        assert "another browser" in forced.text

        # A code the provider refuses, then a provider outage during the exchange.
        stack.idp.script(Fault.invalid_grant())
        bad_code = await browser.get(await callback_url(browser))
        assert bad_code.status_code == 400
        assert "invalid_grant" in bad_code.text
        stack.idp.script(Fault.unavailable(retry_after=7))
        down = await browser.get(await callback_url(browser))
        assert down.status_code == 503
        assert down.headers["retry-after"] == "7"

        # A callback replayed after a successful login.
        url = await callback_url(browser)
        assert (await browser.get(url)).status_code == 303
        assert (await browser.get(url)).status_code == 400
        assert (await browser.get("/api/me")).status_code == 200


# -- refresh storms ---------------------------------------------------------------------------


@BOTH_STORES
async def test_50_parallel_requests_after_expiry_make_one_refresh(stack: Stack) -> None:
    async with stack.browser() as browser:
        await log_in(stack, browser)
        for round_ in (1, 2):
            stack.clock.advance(EXPIRED)
            responses = await get_me(browser, 50)
            assert [r.status_code for r in responses] == [200] * 50
            assert {r.json()["sub"] for r in responses} == {"alice"}
            assert stack.idp.token_calls("refresh_token") == round_
        assert stack.idp.grants_revoked == 0
        assert stack.idp.token_calls("refresh_token", "success") == 2


@BOTH_STORES
async def test_three_tabs_over_five_rotations_are_never_revoked(stack: Stack) -> None:
    async with stack.browser() as browser:
        await log_in(stack, browser)
        for rotation in range(1, 6):
            stack.clock.advance(EXPIRED)
            tabs = await asyncio.gather(
                browser.get("/api/me"), browser.get("/api/me"), browser.get("/")
            )
            assert [r.status_code for r in tabs] == [200, 200, 200]
            assert "Logged in" in tabs[2].text
            assert stack.idp.token_calls("refresh_token") == rotation
    assert stack.idp.grants_revoked == 0
    assert stack.idp.token_calls("refresh_token", "success") == 5


@COOKIE_STORE
async def test_a_straggler_with_the_pre_rotation_cookie_is_served_and_handed_the_new_one(
    stack: Stack,
) -> None:
    async with stack.browser() as browser:
        await log_in(stack, browser)
        old_cookie = browser.cookies[stack.cookie_name]
        stack.clock.advance(EXPIRED)
        first = await browser.get("/api/me")
        assert first.status_code == 200
        new_cookie = browser.cookies[stack.cookie_name]
        assert new_cookie != old_cookie

    async with stack.browser(cookies={stack.cookie_name: old_cookie}) as straggler:
        late = await straggler.get("/api/me")
        assert late.status_code == 200
        assert late.json()["sub"] == "alice"
        handed = late.cookies[stack.cookie_name]
    assert handed not in (old_cookie, new_cookie)  # encrypted afresh
    old, new, straggler_tokens = [await token_set_in(c) for c in (old_cookie, new_cookie, handed)]
    assert straggler_tokens.refresh_token == new.refresh_token != old.refresh_token
    assert straggler_tokens.access_token == new.access_token
    assert stack.idp.token_calls("refresh_token") == 1
    assert stack.idp.grants_revoked == 0


@COOKIE_STORE
async def test_an_access_token_the_api_rejects_is_refreshed_once_and_retried(
    stack: Stack,
) -> None:
    async with stack.browser() as browser:
        await log_in(stack, browser)
        tokens = await token_set_in(browser.cookies[stack.cookie_name])
        async with httpx.AsyncClient(auth=("app", "app-secret")) as backchannel:
            revoked = await backchannel.post(
                stack.idp_url + "/revoke",
                data={"token": tokens.access_token, "token_type_hint": "access_token"},
            )
        assert revoked.status_code == 200
        me = await browser.get("/api/me")  # still fresh here, but userinfo says 401
        assert me.status_code == 200
        assert me.json()["sub"] == "alice"
        assert stack.idp.token_calls("refresh_token") == 1
        assert stack.idp.calls("userinfo") == 2
        refreshed = await token_set_in(browser.cookies[stack.cookie_name])
        assert refreshed.access_token != tokens.access_token


# -- failures ---------------------------------------------------------------------------------


@BOTH_STORES
async def test_tampered_garbage_and_oversized_cookies_are_no_session_never_500(
    stack: Stack,
) -> None:
    async with stack.browser() as browser:
        await log_in(stack, browser)
        valid = browser.cookies[stack.cookie_name]
    middle = len(valid) // 2
    tampered = valid[:middle] + ("A" if valid[middle] != "A" else "B") + valid[middle + 1 :]
    name = stack.cookie_name
    bad: list[bytes] = [
        f"{name}={tampered}".encode(),
        f"{name}={valid[:-4]}".encode(),  # truncated
        f"{name}=garbage".encode(),
        f"{name}=v1.3.{valid[-40:]}".encode(),  # claims chunks that are absent
        f"{name}=v1.1.%%%%; {name}.1=???".encode(),
        f"{name}={'A' * 12_000}".encode(),  # oversized (under uvicorn's 16 KiB header limit)
        b"atr_session=\xff\xfe\x80; atr_sid=\xff",  # not even ASCII
        b"atr_session; atr_sid; =; ;;",
    ]
    async with stack.browser() as client:
        for cookie in bad:
            me = await client.get("/api/me", headers=[(b"cookie", cookie)])
            assert me.status_code == 401, cookie
            assert me.json()["error"] == "reauthentication_required"
            home = await client.get("/", headers=[(b"cookie", cookie)])
            assert home.status_code == 200
            assert "Not logged in" in home.text
    assert stack.idp.token_calls("refresh_token") == 0


@BOTH_STORES
async def test_invalid_grant_answers_401_and_clears_the_session_cookie(stack: Stack) -> None:
    async with stack.browser() as browser:
        await log_in(stack, browser)
        stack.idp.script(Fault.invalid_grant())
        stack.clock.advance(EXPIRED)
        response = await browser.get("/api/me")
        assert response.status_code == 401
        assert response.json()["error"] == "reauthentication_required"
        assert response.json()["reason"] == "invalid_grant"
        assert cleared(response, stack.cookie_name)
        assert stack.cookie_name not in browser.cookies
        assert (await browser.get("/api/me")).status_code == 401
    assert stack.idp.token_calls("refresh_token") == 1


@BOTH_STORES
async def test_a_provider_outage_answers_503_and_keeps_the_session(stack: Stack) -> None:
    async with stack.browser() as browser:
        await log_in(stack, browser)
        stack.idp.script(Fault.unavailable(retry_after=7))
        stack.clock.advance(EXPIRED)
        for _ in range(2):  # the outage is remembered for Retry-After: one provider call
            response = await browser.get("/api/me")
            assert response.status_code == 503
            assert response.headers["retry-after"] == "7"
            assert response.json()["error"] == "token_refresh_unavailable"
            assert not cleared(response, stack.cookie_name)
        assert stack.idp.token_calls("refresh_token") == 1

        stack.clock.advance(7)
        response = await browser.get("/api/me")
        assert response.status_code == 200
        assert response.json()["sub"] == "alice"
    assert stack.idp.token_calls("refresh_token", "success") == 1
    assert stack.idp.grants_revoked == 0


@BOTH_STORES
async def test_logout_revokes_the_grant_at_the_provider(stack: Stack, store_kind: str) -> None:
    async with stack.browser() as browser:
        await log_in(stack, browser)
        cookie = browser.cookies[stack.cookie_name]
        refresh_token = None
        if store_kind == "cookie":  # memory sessions keep the tokens server-side
            refresh_token = (await token_set_in(cookie)).refresh_token
            assert refresh_token is not None
            assert stack.idp.is_grant_active(refresh_token)

        response = await browser.get("/logout", follow_redirects=True)
        assert response.status_code == 200
        assert "Not logged in" in response.text
        assert cleared(response.history[0], stack.cookie_name)
        assert stack.idp.calls("revoke") == 1
        assert stack.idp.grants_revoked == 1
        if refresh_token is not None:
            assert not stack.idp.is_grant_active(refresh_token)
        assert (await browser.get("/api/me")).status_code == 401

    # The old cookie replayed after logout (a copy, another tab's request in flight) is refused.
    async with stack.browser(cookies={stack.cookie_name: cookie}) as replay:
        response = await replay.get("/api/me")
        assert response.status_code == 401
        assert response.json()["error"] == "reauthentication_required"


# -- several workers: REDIS_URL and ATR_COORDINATOR=file ----------------------------------------


@dataclass
class SharedMode:
    """One of the multi-worker configurations, its environment already set."""

    name: str  # "redis" or "file"
    redis: RedisServer | None

    @property
    def cookie_name(self) -> str:
        return "atr_sid" if self.name == "redis" else "atr_session"

    def redis_keys(self) -> list[str]:
        assert self.redis is not None
        return sorted(self.redis.cli("--scan").split())


@pytest.fixture
def shared_mode(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> SharedMode:
    name: str = request.param
    monkeypatch.setenv("SESSION_SECRET", SESSION_SECRET)
    monkeypatch.delenv("ATR_COORDINATOR", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    if name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        monkeypatch.setenv("REDIS_URL", server.url)
        return SharedMode(name, server)
    monkeypatch.setenv("ATR_COORDINATOR", "file")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # under the coordinator's directory
    return SharedMode(name, None)


SHARED_MODES = pytest.mark.parametrize("shared_mode", ["redis", "file"], indirect=True)


@SHARED_MODES
async def test_two_workers_share_logins_sessions_and_refreshes(
    framework: str, shared_mode: SharedMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two app instances stand for two uvicorn workers: each has its own refresher, store and
    pending logins, and nothing in common but Redis (or the files). The login starts on one and
    its callback lands on the other; then a storm over both makes one refresh per expiry."""
    clock = FakeClock()
    idp = FakeIdP(issuer=None, clock=clock)  # strict: a second refresh would revoke the grant
    servers = Servers()
    try:
        idp_url = servers.start(idp)
        port_a = free_port()
        port_b = free_port(avoid={port_a})
        app_url = f"http://127.0.0.1:{port_a}"  # the public URL: callbacks go to worker A
        monkeypatch.setenv("OIDC_ISSUER", idp_url)
        monkeypatch.setenv("OIDC_CLIENT_ID", "app")
        monkeypatch.setenv("OIDC_CLIENT_SECRET", "app-secret")
        monkeypatch.setenv("APP_BASE_URL", app_url)
        monkeypatch.delenv("OIDC_SCOPE", raising=False)
        servers.start(CREATE_APP[framework](clock=clock), port=port_a)
        worker_b = servers.start(CREATE_APP[framework](clock=clock), port=port_b)

        # Cookies ignore ports: worker B gets the cookies worker A sets, as behind one address.
        async with httpx.AsyncClient(timeout=10.0) as browser:
            response = await browser.get(worker_b + "/login", follow_redirects=True)
            assert response.status_code == 200, response.text
            assert "Logged in" in response.text
            hops = [r.url for r in (*response.history, response)]
            assert [(u.port, u.path) for u in hops] == [
                (port_b, "/login"),
                (urlsplit(idp_url).port, "/authorize"),
                (port_a, "/callback"),
                (port_a, "/"),
            ]
            assert browser.cookies.get(shared_mode.cookie_name)
            if shared_mode.redis is not None:
                keys = shared_mode.redis_keys()
                assert [k for k in keys if k.startswith("atr:session:")]
                assert not [k for k in keys if k.startswith("atr-example:login:")]  # used up

            for rotation in range(1, 3):
                clock.advance(EXPIRED)
                responses = await asyncio.gather(
                    *(
                        browser.get(url + "/api/me")
                        for _ in range(10)
                        for url in (app_url, worker_b)
                    )
                )
                assert [r.status_code for r in responses] == [200] * 20
                assert {r.json()["sub"] for r in responses} == {"alice"}
                assert idp.token_calls("refresh_token") == rotation
        if shared_mode.redis is not None:
            assert [k for k in shared_mode.redis_keys() if k.endswith(":result")]  # published
        assert idp.token_calls("authorization_code", "success") == 1
        assert idp.grants_revoked == 0
    finally:
        idp.close()
        servers.stop()


# -- which configuration the environment selects ----------------------------------------------


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No provider (the in-process FakeIdP), no secret, no Redis, no coordinator."""
    for name in ("OIDC_ISSUER", "SESSION_SECRET", "REDIS_URL", "ATR_COORDINATOR", "OIDC_SCOPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("APP_BASE_URL", "http://127.0.0.1:8000")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, "REDIS_URL is set, so SESSION_SECRET"),
        ({"ATR_COORDINATOR": "file"}, "ATR_COORDINATOR=file is set, so SESSION_SECRET"),
        ({"ATR_COORDINATOR": "redis", "SESSION_SECRET": SESSION_SECRET}, "needs REDIS_URL"),
        ({"ATR_COORDINATOR": "zookeeper"}, "must be local, redis or file"),
    ],
)
def test_multi_worker_modes_refuse_an_incomplete_environment(
    bare_env: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        bare_env.setenv(name, value)
    with pytest.raises(RuntimeError, match=message):
        OIDC.from_env()


@pytest.mark.parametrize(
    ("mode", "store", "coordinator", "pending"),
    [
        ("memory", MemorySessionStore, LocalCoordinator, MemoryPendingLogins),
        ("cookie", CookieSessionStore, LocalCoordinator, MemoryPendingLogins),
        ("redis", RedisSessionStore, RedisCoordinator, RedisPendingLogins),
        ("file", CookieSessionStore, FileCoordinator, FilePendingLogins),
        ("file+redis", RedisSessionStore, FileCoordinator, RedisPendingLogins),
    ],
)
async def test_the_environment_selects_store_coordinator_and_pending_logins(
    request: pytest.FixtureRequest,
    bare_env: pytest.MonkeyPatch,
    mode: str,
    store: type,
    coordinator: type,
    pending: type,
) -> None:
    if mode != "memory":
        bare_env.setenv("SESSION_SECRET", SESSION_SECRET)
    if "redis" in mode:
        server: RedisServer = request.getfixturevalue("redis_server")
        bare_env.setenv("REDIS_URL", server.url)
    if "file" in mode:
        bare_env.setenv("ATR_COORDINATOR", "file")
    oidc = OIDC.from_env()
    try:
        assert type(oidc.store) is store
        assert type(oidc.refresher.coordinator) is coordinator
        assert type(oidc.pending) is pending
    finally:
        await oidc.aclose()


@pytest.mark.parametrize("mode", ["redis", "file"])
async def test_a_pending_login_is_taken_once_by_any_worker(
    request: pytest.FixtureRequest, bare_env: pytest.MonkeyPatch, mode: str
) -> None:
    bare_env.setenv("SESSION_SECRET", SESSION_SECRET)
    if mode == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        bare_env.setenv("REDIS_URL", server.url)
    else:
        bare_env.setenv("ATR_COORDINATOR", "file")
    workers = [OIDC.from_env() for _ in range(3)]
    try:
        started = await workers[0].start_login()
        # Three workers race for the callback: exactly one gets the login.
        taken = await asyncio.gather(*(w.pending.take(started.state) for w in workers))
        assert [t for t in taken if t is not None] == [started]
        assert await workers[1].pending.take(started.state) is None

        # A login sealed with other keys, or for another state, is no login.
        bare_env.setenv("SESSION_SECRET", "another-secret-" + "x" * 32)
        stranger = OIDC.from_env()
        try:
            foreign = await stranger.start_login()
            assert await workers[0].pending.take(foreign.state) is None
        finally:
            await stranger.aclose()
        again = await workers[2].start_login()
        assert await workers[0].pending.take(again.state + "x") is None
        assert await workers[0].pending.take(again.state) == again
    finally:
        for worker in workers:
            await worker.aclose()
