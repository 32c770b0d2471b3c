"""The web examples end to end, over real sockets, with the library's login (``OIDCLogin`` at
``/auth``) against a strict FakeIdP (rotation on, reuse revokes the grant); an httpx client with
a cookie jar plays the browser.

One worker: the FakeIdP and the example app each run in uvicorn on loopback in this process,
and time moves only with the shared FakeClock. Several workers: four uvicorn processes run the
example app and share nothing but ``SESSION_SECRET`` and Redis (or the files of
``ATR_COORDINATOR=file``); they and the FakeIdP read the wall time from a SharedClock that only
the test moves."""

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
from examples._common import Config

from .processes import RedisServer, Uvicorn, free_port, start_uvicorn, stop
from .workers.clock import SharedClock

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
EXAMPLE_ENV = ("OIDC_ISSUER", "OIDC_CLIENT_ID", "OIDC_CLIENT_SECRET", "OIDC_SCOPE", "APP_BASE_URL")
SHARING_ENV = ("SESSION_SECRET", "REDIS_URL", "ATR_COORDINATOR")


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
def example_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """None of the examples' variables set: whatever the developer's shell exports."""
    for name in (*EXAMPLE_ENV, *SHARING_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def stack(framework: str, store_kind: str, example_env: pytest.MonkeyPatch) -> Iterator[Stack]:
    clock = FakeClock()
    # Strict: rotation on, no grace, a reused refresh token revokes the grant.
    idp = FakeIdP(issuer=None, clock=clock)  # issuer = the URL it is served at
    servers = Servers()
    try:
        idp_url = servers.start(idp)
        example_env.setenv("OIDC_ISSUER", idp_url)
        example_env.setenv("OIDC_CLIENT_ID", "app")
        example_env.setenv("OIDC_CLIENT_SECRET", "app-secret")
        # No APP_BASE_URL: OIDCLogin derives the redirect URI from the request.
        if store_kind == "cookie":
            example_env.setenv("SESSION_SECRET", SESSION_SECRET)
        app_url = servers.start(CREATE_APP[framework](clock=clock))
        yield Stack(app_url, idp_url, idp, clock, COOKIE_NAMES[store_kind])
    finally:
        idp.close()
        servers.stop()


async def log_in(stack: Stack, browser: httpx.AsyncClient) -> httpx.Response:
    """/auth/login -> the IdP's /authorize -> /auth/callback -> /, following redirects across
    both hosts."""
    response = await browser.get("/auth/login", params={"next": "/"}, follow_redirects=True)
    assert response.status_code == 200, response.text
    assert str(response.url) == stack.app_url + "/"
    assert "Logged in as alice" in response.text
    assert browser.cookies.get(stack.cookie_name)
    return response


async def callback_url(browser: httpx.AsyncClient) -> str:
    """Start a login in ``browser`` and let the provider log it in: the callback URL (with its
    code and state) that the provider sends the browser back to."""
    to_idp = await browser.get("/auth/login")
    assert to_idp.status_code == 303
    async with httpx.AsyncClient() as user_agent:
        to_app = await user_agent.get(to_idp.headers["location"])
    assert to_app.status_code == 302
    return str(to_app.headers["location"])


async def log_out(browser: httpx.AsyncClient, url: str = "") -> httpx.Response:
    """The home page's logout form, as a browser submits it (same origin)."""
    origin = url or str(browser.base_url).rstrip("/")
    return await browser.post(
        url + "/auth/logout", headers={"origin": origin}, follow_redirects=True
    )


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


def login_cookies(browser: httpx.AsyncClient) -> list[str]:
    return [name for name in browser.cookies if name.startswith("atr_login_")]


async def get_me(browser: httpx.AsyncClient, n: int) -> list[httpx.Response]:
    return list(await asyncio.gather(*(browser.get("/api/me") for _ in range(n))))


def subjects(responses: list[httpx.Response]) -> set[str]:
    """Who userinfo says each answer is for, and who the verified ID token said at login."""
    return {r.json()["userinfo"]["sub"] for r in responses} | {
        r.json()["claims"]["sub"] for r in responses
    }


# -- login ------------------------------------------------------------------------------------


@BOTH_STORES
async def test_full_login_then_api_me_returns_the_subject(stack: Stack) -> None:
    async with stack.browser() as browser:
        home = await browser.get("/")
        assert "Not logged in" in home.text
        assert 'href="/auth/login' in home.text
        response = await log_in(stack, browser)
        login, authorize, callback, _ = (r.request.url for r in (*response.history, response))
        assert login.path == "/auth/login"
        query = parse_qs(urlsplit(str(authorize)).query)
        assert authorize.path == "/authorize"
        assert query["code_challenge_method"] == ["S256"]
        assert query["prompt"] == ["consent"]  # added for offline_access
        # Derived from the request under uvicorn, behind the /auth mount.
        assert query["redirect_uri"] == [stack.app_url + "/auth/callback"]
        assert query["state"]
        assert query["nonce"]
        assert callback.path == "/auth/callback"
        set_cookies = response.history[-1].headers.get_list("set-cookie")
        session_cookie = next(c for c in set_cookies if c.startswith(stack.cookie_name + "="))
        assert "HttpOnly" in session_cookie
        assert "SameSite=Lax" in session_cookie
        assert "Secure" not in session_cookie  # plain http on loopback
        assert not login_cookies(browser)  # the pending login is used up
        # The logout form posts to OIDCLogin.
        assert '<form method="post" action="/auth/logout">' in response.text

        me = await browser.get("/api/me")
        assert me.status_code == 200
        assert me.json()["userinfo"]["sub"] == "alice"
        claims = me.json()["claims"]  # verified at login
        assert claims["sub"] == "alice"
        assert claims["iss"] == stack.idp_url
        assert claims["aud"] == "app"
        assert claims["nonce"] == query["nonce"][0]
    assert stack.idp.token_calls("authorization_code", "success") == 1
    assert stack.idp.token_calls("refresh_token") == 0
    assert stack.idp.calls("jwks") == 1


async def test_login_returns_to_the_page_asked_for_and_never_off_site(stack: Stack) -> None:
    async with stack.browser() as browser:
        for asked, landed in [("/api/me", "/api/me"), ("//evil.test/x", "/")]:
            response = await browser.get(
                "/auth/login", params={"next": asked}, follow_redirects=True
            )
            assert response.url.host == "127.0.0.1"
            assert response.url.path == landed
            assert response.status_code == 200


async def test_callback_errors_answer_400_never_500(stack: Stack) -> None:
    async with stack.browser() as browser, stack.browser() as attacker:
        assert (await browser.get("/auth/callback")).status_code == 400
        refused = await browser.get("/auth/callback", params={"error": "access_denied"})
        assert refused.status_code == 400
        assert "access_denied" in refused.text
        unknown = await browser.get("/auth/callback", params={"code": "x", "state": "unknown"})
        assert unknown.status_code == 400
        assert "log in again" in unknown.text

        # Login CSRF: the attacker's callback URL in the victim's browser is refused.
        forced = await browser.get(await callback_url(attacker))
        assert forced.status_code == 400
        assert "another browser" in forced.text

        # A code the provider refuses, an ID token that does not verify, a provider outage.
        stack.idp.script(Fault.invalid_grant())
        bad_code = await browser.get(await callback_url(browser))
        assert bad_code.status_code == 400
        assert "invalid_grant" in bad_code.text
        url = await callback_url(browser)
        stack.idp.tamper_next_id_token("bad_signature")
        forged = await browser.get(url)
        assert forged.status_code == 400
        assert "signature does not verify" in forged.text
        stack.idp.script(Fault.unavailable(retry_after=7))
        down = await browser.get(await callback_url(browser))
        assert down.status_code == 503
        assert down.headers["retry-after"] == "7"
        assert (await browser.get("/api/me")).status_code == 401  # none of them logged in

        # A callback replayed after a successful login.
        url = await callback_url(browser)
        assert (await browser.get(url)).status_code == 303
        assert (await browser.get(url)).status_code == 400
        assert (await browser.get("/api/me")).status_code == 200


async def test_the_built_in_provider_is_mounted_at_idp_when_no_issuer_is_set(
    framework: str, example_env: pytest.MonkeyPatch
) -> None:
    """``uvicorn examples.starlette_app:app`` with nothing configured: the FakeIdP at /idp on
    the same server signs the ID tokens, and the app fetches its discovery and keys."""
    clock = FakeClock()
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    example_env.setenv("APP_BASE_URL", app_url)  # where the stand-in's issuer is
    with serve(CREATE_APP[framework](clock=clock), port=port):
        async with httpx.AsyncClient(base_url=app_url, timeout=10.0) as browser:
            response = await browser.get("/auth/login", follow_redirects=True)
            hops = [r.url.path for r in (*response.history, response)]
            assert hops == ["/auth/login", "/idp/authorize", "/auth/callback", "/"]
            assert "Logged in as alice" in response.text
            me = await browser.get("/api/me")
            assert me.json()["claims"]["iss"] == app_url + "/idp"
            assert me.json()["userinfo"]["sub"] == "alice"

            # The stand-in is strict too: a second refresh of the session would revoke it.
            clock.advance(EXPIRED)
            assert {r.status_code for r in await get_me(browser, 20)} == {200}
            clock.advance(EXPIRED)
            assert {r.status_code for r in await get_me(browser, 20)} == {200}

            out = await log_out(browser)
            assert [r.url.path for r in out.history] == ["/auth/logout", "/idp/logout"]
            assert "Not logged in" in out.text
            assert (await browser.get("/api/me")).status_code == 401


# -- refresh storms ---------------------------------------------------------------------------


@BOTH_STORES
async def test_50_parallel_requests_after_expiry_make_one_refresh(stack: Stack) -> None:
    async with stack.browser() as browser:
        await log_in(stack, browser)
        for round_ in (1, 2):
            stack.clock.advance(EXPIRED)
            responses = await get_me(browser, 50)
            assert [r.status_code for r in responses] == [200] * 50
            assert subjects(responses) == {"alice"}
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
            assert "Logged in as alice" in tabs[2].text
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
        assert subjects([late]) == {"alice"}
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
        assert subjects([me]) == {"alice"}
        assert stack.idp.token_calls("refresh_token") == 1
        assert stack.idp.calls("userinfo") == 2
        refreshed = await token_set_in(browser.cookies[stack.cookie_name])
        assert refreshed.access_token != tokens.access_token
        assert refreshed.claims is not None  # the claims from login are kept
        assert refreshed.claims["sub"] == "alice"


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
        assert subjects([response]) == {"alice"}
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

        # Only the home page's form logs out: no GET, nothing from another site.
        assert (await browser.get("/auth/logout")).status_code == 405
        for header in ({"origin": "https://evil.test"}, {"sec-fetch-site": "cross-site"}):
            assert (await browser.post("/auth/logout", headers=header)).status_code == 403
        assert (await browser.get("/api/me")).status_code == 200
        assert stack.idp.calls("revoke") == 0

        response = await log_out(browser)
        assert response.status_code == 200
        assert "Not logged in" in response.text
        # The app, then the provider's end-session endpoint, which sends the browser back.
        hops = [str(r.url).partition("?")[0] for r in response.history]
        assert hops == [stack.app_url + "/auth/logout", stack.idp_url + "/logout"]
        assert cleared(response.history[0], stack.cookie_name)
        assert stack.idp.calls("revoke") == 1
        assert stack.idp.grants_revoked == 1
        assert stack.idp.sessions_ended == 1
        if refresh_token is not None:
            assert not stack.idp.is_grant_active(refresh_token)
        assert (await browser.get("/api/me")).status_code == 401

    # The old cookie replayed after logout (a copy, another tab's request in flight) is refused.
    async with stack.browser(cookies={stack.cookie_name: cookie}) as replay:
        response = await replay.get("/api/me")
        assert response.status_code == 401
        assert response.json()["error"] == "reauthentication_required"


# -- four workers: REDIS_URL and ATR_COORDINATOR=file -------------------------------------------


@dataclass
class SharedMode:
    """One of the multi-worker configurations: the environment its workers get."""

    name: str  # "redis" or "file"
    env: dict[str, str]
    redis: RedisServer | None

    @property
    def cookie_name(self) -> str:
        return "atr_sid" if self.name == "redis" else "atr_session"

    def redis_keys(self) -> list[str]:
        assert self.redis is not None
        return sorted(self.redis.cli("--scan").split())


@pytest.fixture
def shared_mode(request: pytest.FixtureRequest, tmp_path: Path) -> SharedMode:
    name: str = request.param
    env = {"SESSION_SECRET": SESSION_SECRET, "REDIS_URL": "", "ATR_COORDINATOR": ""}
    if name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        return SharedMode(name, env | {"REDIS_URL": server.url}, server)
    # The file coordinator's directory is under the temporary directory: this test's own.
    return SharedMode(name, env | {"ATR_COORDINATOR": "file", "TMPDIR": str(tmp_path)}, None)


SHARED_MODES = pytest.mark.parametrize("shared_mode", ["redis", "file"], indirect=True)


@contextlib.contextmanager
def example_servers(
    framework: str, env: dict[str, str], log_dir: Path, *, servers: int = 1, workers: int = 1
) -> Iterator[list[Uvicorn]]:
    """``servers`` uvicorn servers of ``workers`` worker processes each, running the example
    app with ``env``, every worker ready when this yields; always stopped (their logs are
    printed, shown when the test fails)."""
    started = [
        start_uvicorn(
            "tests.workers.example_app:create_app",
            workers=workers,
            env=env | {"ATR_EXAMPLE": framework},
            log=log_dir / f"server-{index}.log",
        )
        for index in range(servers)
    ]
    try:
        for server in started:
            server.wait_ready("/healthz")
        yield started
    finally:
        stop(*(server.process for server in started), timeout=5)
        for index, server in enumerate(started):
            print(f"--- server {index} ---\n{server.output()}")


def worker_env(shared_mode: SharedMode, idp_url: str, clock_path: Path) -> dict[str, str]:
    return shared_mode.env | {
        "OIDC_ISSUER": idp_url,
        "OIDC_CLIENT_ID": "app",
        "OIDC_CLIENT_SECRET": "app-secret",
        "OIDC_SCOPE": "",
        "APP_BASE_URL": "",
        "ATR_WORKER_CLOCK": str(clock_path),
    }


def shared_clock(tmp_path: Path) -> SharedClock:
    """FakeClock's start, in the past: FakeIdP checks a logout's id_token_hint with PyJWT,
    whose "iat is not in the future" check reads the real time, not the provider's clock."""
    (tmp_path / "wall-time").write_text(repr(FakeClock().time()))
    return SharedClock(tmp_path / "wall-time")


def at(base_url: str, url: str) -> str:
    """``url`` sent to the server at ``base_url``: what a load balancer in front of several
    workers may do with any request."""
    parts = urlsplit(url)
    return f"{base_url}{parts.path}?{parts.query}" if parts.query else base_url + parts.path


async def log_in_across(
    browser: httpx.AsyncClient, start: Uvicorn, finish: Uvicorn
) -> tuple[str, dict[str, str]]:
    """Log in with /auth/login on ``start`` and /auth/callback on ``finish``; returns the
    callback URL and the login cookie it carried."""
    started = await browser.get(start.url + "/auth/login")
    assert started.status_code == 303
    pending = {name: browser.cookies[name] for name in login_cookies(browser)}
    assert len(pending) == 1
    async with httpx.AsyncClient() as user_agent:
        back = await user_agent.get(started.headers["location"])
    callback = at(finish.url, back.headers["location"])
    landed = await browser.get(callback, follow_redirects=True)
    assert landed.status_code == 200, landed.text
    assert "Logged in as alice" in landed.text
    assert [r.url.port for r in (*landed.history, landed)] == [finish.port, finish.port]
    assert not login_cookies(browser)
    return callback, pending


@SHARED_MODES
async def test_four_workers_share_logins_sessions_and_refreshes(
    framework: str, shared_mode: SharedMode, tmp_path: Path
) -> None:
    """Four processes stand for the workers behind one address, and the test plays the load
    balancer. A login starts on one worker and its callback lands on another (the login in
    progress is a cookie sealed with SESSION_SECRET); storms over all four make one refresh
    per expiry; logout on yet another worker revokes the grant."""
    clock = shared_clock(tmp_path)
    idp = FakeIdP(issuer=None, clock=clock)  # strict: a second refresh would revoke the grant
    servers = Servers()
    try:
        env = worker_env(shared_mode, servers.start(idp), clock.path)
        with example_servers(framework, env, tmp_path, servers=4) as workers:
            # Cookies ignore ports: every worker gets the cookies any of them set.
            async with httpx.AsyncClient(timeout=30.0) as browser:
                callback, pending = await log_in_across(browser, workers[1], workers[2])
                if shared_mode.redis is not None:  # the login in progress never was in Redis
                    assert all(k.startswith("atr:session:") for k in shared_mode.redis_keys())

                # Replayed with its login cookie on a third worker, the callback opens there,
                # but the provider takes a code once and revokes what it issued (RFC 6749
                # §4.1.2): no session.
                async with httpx.AsyncClient(cookies=pending, timeout=30.0) as replay:
                    replayed = await replay.get(at(workers[0].url, callback))
                    assert replayed.status_code == 400
                    assert "invalid_grant" in replayed.text
                    assert not replay.cookies.get(shared_mode.cookie_name)
                assert idp.grants_revoked == 1

                await log_in_across(browser, workers[3], workers[0])
                assert browser.cookies.get(shared_mode.cookie_name)
                for rotation in range(1, 3):
                    clock.advance(EXPIRED)
                    responses = await asyncio.gather(
                        *(browser.get(w.url + "/api/me") for _ in range(10) for w in workers)
                    )
                    assert [r.status_code for r in responses] == [200] * 40
                    assert subjects(responses) == {"alice"}
                    assert idp.token_calls("refresh_token") == rotation
                if shared_mode.redis is not None:  # the leader published for the others
                    assert [k for k in shared_mode.redis_keys() if k.endswith(":result")]
                assert idp.grants_revoked == 1

                out = await log_out(browser, workers[1].url)
                assert "Not logged in" in out.text
                assert idp.calls("revoke") == 1
                assert idp.grants_revoked == 2
                statuses = [(await browser.get(w.url + "/api/me")).status_code for w in workers]
                assert statuses == [401] * 4
        assert idp.token_calls("authorization_code", "success") == 2
    finally:
        idp.close()
        servers.stop()


@SHARED_MODES
async def test_uvicorn_workers_4_on_one_port_refresh_once_per_rotation(
    shared_mode: SharedMode, tmp_path: Path
) -> None:
    """``uvicorn --workers 4`` as the README runs it: the kernel picks the worker of each
    connection, so which worker serves what is unknown, but not what must hold."""
    clock = shared_clock(tmp_path)
    idp = FakeIdP(issuer=None, clock=clock)
    servers = Servers()
    try:
        env = worker_env(shared_mode, servers.start(idp), clock.path)
        with example_servers("starlette", env, tmp_path, workers=4) as [server]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as browser:
                for _ in range(3):  # three logins, on whichever workers the kernel picks
                    browser.cookies.clear()
                    response = await browser.get("/auth/login", follow_redirects=True)
                    assert "Logged in as alice" in response.text
                for rotation in range(1, 3):
                    clock.advance(EXPIRED)
                    responses = await get_me(browser, 40)
                    assert [r.status_code for r in responses] == [200] * 40
                    assert idp.token_calls("refresh_token") == rotation
                out = await log_out(browser)
                assert "Not logged in" in out.text
        assert idp.token_calls("authorization_code", "success") == 3
        assert idp.grants_revoked == 1  # the logout; the two abandoned logins live on
    finally:
        idp.close()
        servers.stop()


# -- which configuration the environment selects ----------------------------------------------


@pytest.fixture
def bare_env(example_env: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No provider (the in-process FakeIdP), no secret, no Redis, no coordinator."""
    example_env.setattr(tempfile, "tempdir", str(tmp_path))
    return example_env


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, "REDIS_URL is set, so SESSION_SECRET"),
        ({"ATR_COORDINATOR": "file"}, "ATR_COORDINATOR=file is set, so SESSION_SECRET"),
        ({"ATR_COORDINATOR": "redis", "SESSION_SECRET": SESSION_SECRET}, "needs REDIS_URL"),
        ({"ATR_COORDINATOR": "zookeeper"}, "must be local, redis or file"),
        ({"OIDC_ISSUER": "https://idp.example"}, "OIDC_CLIENT_ID must be set"),
    ],
)
def test_multi_worker_modes_refuse_an_incomplete_environment(
    bare_env: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        bare_env.setenv(name, value)
    with pytest.raises(RuntimeError, match=message):
        Config.from_env()


@pytest.mark.parametrize(
    ("mode", "store", "coordinator"),
    [
        ("memory", MemorySessionStore, LocalCoordinator),
        ("cookie", CookieSessionStore, LocalCoordinator),
        ("redis", RedisSessionStore, RedisCoordinator),
        ("file", CookieSessionStore, FileCoordinator),
        ("file+redis", RedisSessionStore, FileCoordinator),
    ],
)
async def test_the_environment_selects_store_and_coordinator(
    request: pytest.FixtureRequest,
    bare_env: pytest.MonkeyPatch,
    mode: str,
    store: type,
    coordinator: type,
) -> None:
    if mode != "memory":
        bare_env.setenv("SESSION_SECRET", SESSION_SECRET)
    if "redis" in mode:
        server: RedisServer = request.getfixturevalue("redis_server")
        bare_env.setenv("REDIS_URL", server.url)
    if "file" in mode:
        bare_env.setenv("ATR_COORDINATOR", "file")
    config = Config.from_env()
    try:
        assert type(config.store) is store
        assert type(config.refresher.coordinator) is coordinator
        assert config.idp is not None  # no OIDC_ISSUER: the stand-in
        assert config.redirect_uri is None  # no APP_BASE_URL: derived from each request
        assert config.after_logout_uri is None
        assert not config.secure
        if mode == "memory":  # logins in progress are sealed with a key of this process
            assert len(config.secret_keys) == 1
            assert config.secret_keys != Config.from_env().secret_keys
        else:
            assert config.secret_keys == [SESSION_SECRET]
    finally:
        await config.aclose()


def test_app_base_url_sets_the_redirect_uri_and_secure_cookies(
    bare_env: pytest.MonkeyPatch,
) -> None:
    bare_env.setenv("APP_BASE_URL", "https://app.example/")
    bare_env.setenv("SESSION_SECRET", f"{SESSION_SECRET},old-{SESSION_SECRET}")
    config = Config.from_env()
    assert config.redirect_uri == "https://app.example/auth/callback"
    assert config.after_logout_uri == "https://app.example/"
    assert config.secure
    assert config.secret_keys == [SESSION_SECRET, f"old-{SESSION_SECRET}"]  # the first seals


@pytest.mark.parametrize(
    ("finishing_secret", "status"),
    [
        (SESSION_SECRET, 303),
        ("another-secret-" + "x" * 32, 400),
        ("new-secret-" + "x" * 32 + "," + SESSION_SECRET, 303),  # rotated: the old key opens
    ],
)
async def test_a_login_finishes_on_any_worker_that_shares_the_session_secret(
    framework: str, example_env: pytest.MonkeyPatch, finishing_secret: str, status: int
) -> None:
    idp = FakeIdP(issuer=None)
    servers = Servers()
    try:
        example_env.setenv("OIDC_ISSUER", servers.start(idp))
        example_env.setenv("OIDC_CLIENT_ID", "app")
        example_env.setenv("OIDC_CLIENT_SECRET", "app-secret")
        example_env.setenv("SESSION_SECRET", SESSION_SECRET)
        starting = servers.start(CREATE_APP[framework]())
        example_env.setenv("SESSION_SECRET", finishing_secret)
        finishing = servers.start(CREATE_APP[framework]())
        async with httpx.AsyncClient(base_url=starting, timeout=10.0) as browser:
            callback = await callback_url(browser)
            answer = await browser.get(at(finishing, callback))
        assert answer.status_code == status, answer.text
        if status == 400:
            assert "unknown or has expired" in answer.text
            assert idp.calls("token") == 0  # refused before the code was spent
    finally:
        idp.close()
        servers.stop()
