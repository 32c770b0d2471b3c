"""OIDCLogin end to end, in process: login through the provider's authorize endpoint, the
callback's every refusal (a 400 with a reason and no session), logout (POST, same-origin only,
revocation, RP-initiated logout)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from asgi_token_refresh import (
    CookieSessionStore,
    MemorySessionStore,
    OAuth2Client,
    OIDCLogin,
    Refresher,
    SessionStore,
    TokenRefreshMiddleware,
)
from asgi_token_refresh._login_http import same_origin
from asgi_token_refresh.fastapi import RESPONSES, Token
from asgi_token_refresh.testing import FakeClock, FakeIdP, Fault, capture_telemetry

pytestmark = pytest.mark.anyio

APP = "https://app.test"
ISSUER = "https://idp.test"
KEY = "k" * 32


class Site:
    """An app with OIDCLogin at /auth, a browser with a cookie jar, and the provider."""

    def __init__(self, idp: FakeIdP, clock: FakeClock, store: SessionStore, **login: Any) -> None:
        self.idp = idp
        self.client = OAuth2Client.from_discovery(
            ISSUER,
            client_id="app",
            client_secret="app-secret",
            transport=idp.transport(),
            clock=clock,
        )
        self.store = store
        self.login = OIDCLogin(self.client, secret_keys=[KEY], **login)

        async def me(request: Request) -> JSONResponse:
            token = request.state.token
            if not await token.is_authenticated():
                return JSONResponse({"user": None})
            claims = await token.claims()
            return JSONResponse({"user": claims["sub"], "token": await token.get()})

        async def orders(request: Request) -> PlainTextResponse:
            return PlainTextResponse("orders")

        self.app = Starlette(
            routes=[Mount("/auth", app=self.login), Route("/me", me), Route("/orders", orders)],
            middleware=[
                Middleware(
                    TokenRefreshMiddleware,
                    refresher=Refresher(self.client, jitter=0),
                    store=store,
                )
            ],
        )

    @contextlib.asynccontextmanager
    async def browser(self) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url=APP) as browser:
            yield browser

    async def authorize(self, location: str) -> str:
        """What the provider's login page does: the callback URL (path and query) it sends
        the browser back to."""
        async with httpx.AsyncClient(transport=self.idp.transport()) as provider:
            answer = await provider.get(location)
        assert answer.status_code in (302, 303), answer.text
        callback = urlsplit(answer.headers["location"])
        assert f"{callback.scheme}://{callback.netloc}" == APP
        return f"{callback.path}?{callback.query}"

    async def start(self, browser: httpx.AsyncClient, next_: str = "/orders") -> str:
        started = await browser.get("/auth/login", params={"next": next_})
        assert started.status_code == 303
        return await self.authorize(started.headers["location"])

    async def log_in(self, browser: httpx.AsyncClient, next_: str = "/orders") -> httpx.Response:
        return await browser.get(await self.start(browser, next_))


@pytest.fixture(params=["cookie", "memory"])
def store(request: pytest.FixtureRequest, clock: FakeClock) -> SessionStore:
    if request.param == "cookie":
        return CookieSessionStore([KEY])
    return MemorySessionStore(clock=clock)


@pytest.fixture
def site(idp: FakeIdP, clock: FakeClock, store: SessionStore) -> Site:
    return Site(idp, clock, store)


async def who(browser: httpx.AsyncClient) -> Any:
    return (await browser.get("/me")).json()["user"]


# -- login ---------------------------------------------------------------------------------------


async def test_login_verifies_the_id_token_and_returns_to_the_page_asked_for(
    site: Site, idp: FakeIdP
) -> None:
    async with site.browser() as browser:
        started = await browser.get("/auth/login", params={"next": "/orders"})
        query = parse_qs(urlsplit(started.headers["location"]).query)
        assert query["code_challenge_method"] == ["S256"]
        assert query["prompt"] == ["consent"]  # offline_access is asked for
        assert {"state", "nonce", "code_challenge"} <= set(query)
        back = await browser.get(await site.authorize(started.headers["location"]))
        assert back.status_code == 303
        assert back.headers["location"] == "/orders"
        assert not [name for name in browser.cookies if name.startswith("atr_login_")]
        me = (await browser.get("/me")).json()
    assert me["user"] == idp.subject
    assert idp.calls("jwks") == 1


@pytest.mark.parametrize(
    "asked", ["//evil.test", "https://evil.test/x", "/\\evil.test", "/%2F/evil"]
)
async def test_the_return_path_never_leaves_the_site(site: Site, asked: str) -> None:
    async with site.browser() as browser:
        back = await site.log_in(browser, next_=asked)
    assert back.headers["location"] == "/"


async def test_ten_thousand_anonymous_logins_cancel_nobody_elses(
    idp: FakeIdP, clock: FakeClock
) -> None:
    site = Site(idp, clock, MemorySessionStore(clock=clock))  # pending logins: cookies anyway
    async with site.browser() as victim:
        callback = await site.start(victim)
        async with site.browser() as crowd:
            for _ in range(10_000):  # each one a new anonymous visitor
                crowd.cookies.clear()
                assert (await crowd.get("/auth/login")).status_code == 303
        back = await victim.get(callback)
        assert back.status_code == 303
        assert await who(victim) is not None


async def test_logins_started_in_two_tabs_both_finish(site: Site) -> None:
    async with site.browser() as browser:
        first, second = await site.start(browser), await site.start(browser)
        assert (await browser.get(second)).status_code == 303
        assert (await browser.get(first)).status_code == 303


# -- every bad callback is a 400 with a reason, and no session ----------------------------------


async def assert_refused(browser: httpx.AsyncClient, answer: httpx.Response, reason: str) -> None:
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    assert reason in answer.text
    assert await who(browser) is None


async def test_a_provider_error_is_refused(site: Site) -> None:
    async with site.browser() as browser:
        answer = await browser.get("/auth/callback?error=access_denied&state=x")
        await assert_refused(browser, answer, "refused the login (access_denied)")


@pytest.mark.parametrize("query", ["", "?code=abc", "?state=abc"])
async def test_a_callback_without_code_or_state_is_refused(site: Site, query: str) -> None:
    async with site.browser() as browser:
        answer = await browser.get(f"/auth/callback{query}")
        await assert_refused(browser, answer, "needs a code and a state")


async def test_an_unknown_state_is_refused(site: Site) -> None:
    async with site.browser() as browser:
        answer = await browser.get("/auth/callback?code=abc&state=never-issued")
        await assert_refused(browser, answer, "unknown or has expired")


async def test_another_browsers_state_is_refused_and_does_not_cancel_its_login(
    site: Site,
) -> None:
    async with site.browser() as victim, site.browser() as attacker:
        callback = await site.start(victim)
        stolen = await attacker.get(callback)  # the victim's code and state, without its cookie
        await assert_refused(attacker, stolen, "started in another browser")
        assert (await victim.get(callback)).status_code == 303
        assert await who(victim) is not None


async def test_a_replayed_callback_is_refused(site: Site) -> None:
    async with site.browser() as browser:
        callback = await site.start(browser)
        assert (await browser.get(callback)).status_code == 303
        await browser.get("/auth/logout")  # (a GET: refused, the session stays)
        replayed = await browser.get(callback)
    assert replayed.status_code == 400
    assert "unknown or has expired" in replayed.text


async def test_an_expired_login_is_refused(site: Site, clock: FakeClock) -> None:
    async with site.browser() as browser:
        callback = await site.start(browser)
        clock.advance(601)
        answer = await browser.get(callback)
        await assert_refused(browser, answer, "unknown or has expired")


async def test_a_code_the_provider_refuses_is_refused(site: Site) -> None:
    async with site.browser() as browser:
        callback = await site.start(browser)
        forged = callback.replace("code=", "code=forged", 1)
        answer = await browser.get(forged)
        await assert_refused(browser, answer, "refused the code (invalid_grant)")


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("bad_signature", "signature does not verify"),
        ("unknown_kid", "key the provider does not publish"),
        ("wrong_issuer", "another issuer"),
        ("wrong_audience", "another client"),
        ("expired", "has expired"),
        ("nonce_mismatch", "nonce does not match"),
        ("alg_none", "not allowed"),
        ("hs256_with_public_key", "not allowed"),
        ("missing_exp", "no exp claim"),
    ],
)
async def test_every_bad_id_token_is_refused(
    site: Site, idp: FakeIdP, kind: str, reason: str
) -> None:
    async with site.browser() as browser:
        callback = await site.start(browser)
        idp.tamper_next_id_token(kind)
        answer = await browser.get(callback)
        await assert_refused(browser, answer, reason)


async def test_a_provider_outage_during_the_exchange_is_a_503(site: Site, idp: FakeIdP) -> None:
    async with site.browser() as browser:
        callback = await site.start(browser)
        idp.script(Fault.unavailable(retry_after=9))
        answer = await browser.get(callback)
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "9"
        assert await who(browser) is None


# -- logout ---------------------------------------------------------------------------------------


async def test_logout_is_post_only(site: Site) -> None:
    async with site.browser() as browser:
        await site.log_in(browser)
        answer = await browser.get("/auth/logout")
        assert answer.status_code == 405
        assert answer.headers["allow"] == "POST"
        assert await who(browser) is not None


@pytest.mark.parametrize(
    "headers",
    [
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
        {"origin": "https://evil.test"},
        {"origin": "null"},
    ],
)
async def test_a_cross_site_logout_is_refused(site: Site, headers: dict[str, str]) -> None:
    async with site.browser() as browser:
        await site.log_in(browser)
        answer = await browser.post("/auth/logout", headers=headers)
        assert answer.status_code == 403
        assert await who(browser) is not None


def test_an_origin_is_never_same_origin_with_a_request_that_names_no_host() -> None:
    for origin in (b"null", b"https://evil.test"):
        assert not same_origin({"type": "http", "headers": [(b"origin", origin)]})
    app = [(b"origin", b"https://app.test"), (b"host", b"app.test")]
    assert same_origin({"type": "http", "headers": app})
    assert same_origin({"type": "http", "headers": []})  # not a browser's cross-site request


async def test_logout_revokes_and_ends_the_provider_session_too(site: Site, idp: FakeIdP) -> None:
    async with site.browser() as browser:
        await site.log_in(browser)
        answer = await browser.post("/auth/logout", headers={"origin": APP})
        assert answer.status_code == 303
        target = urlsplit(answer.headers["location"])
        assert f"{target.scheme}://{target.netloc}{target.path}" == f"{ISSUER}/logout"
        params = parse_qs(target.query)
        assert params["post_logout_redirect_uri"] == [f"{APP}/"]
        assert "id_token_hint" in params
        assert await who(browser) is None
        async with httpx.AsyncClient(transport=idp.transport()) as provider:
            ended = await provider.get(answer.headers["location"])
    assert ended.headers["location"] == f"{APP}/"
    assert idp.calls("revoke") == 1
    assert idp.sessions_ended == 1


async def test_revocation_published_only_in_rfc_8414_metadata_is_used(
    clock: FakeClock, store: SessionStore
) -> None:
    idp = FakeIdP(issuer=ISSUER, clock=clock, revocation_in_oauth_metadata_only=True)
    site = Site(idp, clock, store)
    async with site.browser() as browser:
        await site.log_in(browser)
        await browser.post("/auth/logout", headers={"sec-fetch-site": "same-origin"})
    assert idp.calls("revoke") == 1
    assert idp.grants_revoked == 1
    idp.close()


async def test_a_public_client_logs_in_with_pkce_alone(
    clock: FakeClock, store: SessionStore
) -> None:
    idp = FakeIdP(issuer=ISSUER, clock=clock, clients={"app": None})
    site = Site(idp, clock, store)
    site.client = OAuth2Client.from_discovery(
        ISSUER, client_id="app", auth_method="none", transport=idp.transport(), clock=clock
    )
    site.login.client = site.client
    async with site.browser() as browser:
        assert (await site.log_in(browser)).status_code == 303
        assert await who(browser) == idp.subject
    idp.close()


# -- the README's few lines, per kind of app -----------------------------------------------------
# (refresher=Refresher(client) where the README says client=: each test has its own FakeIdP,
# and client= shares one refresher per provider and client id for the whole process)


def fastapi_app(client: OAuth2Client, store: SessionStore) -> Any:
    app = FastAPI(responses=RESPONSES)
    app.add_middleware(TokenRefreshMiddleware, refresher=Refresher(client), store=store)
    app.mount("/auth", OIDCLogin(client, secret_keys=[KEY]))

    @app.get("/me")
    async def me(token: Token) -> dict[str, Any]:
        return {"user": ((await token.claims()) or {}).get("sub")}

    return app


def raw_asgi_app(client: OAuth2Client, store: SessionStore) -> Any:
    login = OIDCLogin(client, secret_keys=[KEY])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/auth/"):
            return await login({**scope, "root_path": "/auth"}, receive, send)
        claims = await scope["state"]["token"].claims()
        body = JSONResponse({"user": (claims or {}).get("sub")})
        await body(scope, receive, send)
        return None

    return TokenRefreshMiddleware(app, refresher=Refresher(client), store=store)


@pytest.mark.parametrize("build", [fastapi_app, raw_asgi_app])
async def test_fastapi_and_raw_asgi_apps_log_in_and_out_with_the_same_few_lines(
    idp: FakeIdP, clock: FakeClock, store: SessionStore, build: Any
) -> None:
    site = Site(idp, clock, store)
    site.app = build(site.client, store)
    async with site.browser() as browser:
        back = await site.log_in(browser)
        assert back.status_code == 303
        assert await who(browser) == idp.subject
        out = await browser.post("/auth/logout", headers={"sec-fetch-site": "same-origin"})
        assert out.status_code == 303
        assert await who(browser) is None
    assert idp.calls("revoke") == 1


async def test_a_logout_that_cannot_revoke_says_so_once_and_is_counted(
    idp: FakeIdP, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    captured = capture_telemetry()
    client = OAuth2Client(  # endpoints given, no revocation endpoint among them
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=idp.transport(),
        clock=clock,
        telemetry=captured.telemetry,
    )
    refresher = Refresher(client)

    async def login(request: Request) -> PlainTextResponse:
        await request.state.token.login(idp.issue())
        return PlainTextResponse("in")

    async def logout(request: Request) -> PlainTextResponse:
        await request.state.token.logout()
        return PlainTextResponse("out")

    app = Starlette(
        routes=[Route("/login", login), Route("/logout", logout)],
        middleware=[
            Middleware(TokenRefreshMiddleware, refresher=refresher, store=MemorySessionStore())
        ],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=APP) as browser:
        for _ in range(2):
            await browser.get("/login")
            await browser.get("/logout")
    assert caplog.text.count("publishes no revocation endpoint") == 1
    assert captured.value("asgi_token_refresh.logouts", revocation="unsupported") == 2
    assert idp.calls("revoke") == 0
    captured.shutdown()


async def test_a_callback_query_that_is_not_utf8_is_a_400_not_a_500(site: Site) -> None:
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/auth/callback",
        "root_path": "/auth",
        "query_string": b"state=\xff\xfe&code=x",  # what httptools lets through
        "headers": [(b"host", b"app.test")],
        "scheme": "https",
        "state": {"token": object()},
    }
    await site.login(scope, receive, send)
    assert sent[0]["status"] == 400
