"""The example apps against real provider software: node oidc-provider (pinned in
tests/providers/node_oidc/package-lock.json), independently written, on loopback, its issuer
under a path prefix (``/oidc``). An httpx client with a cookie jar plays the browser and fills
in the provider's own login and consent forms.

The provider's policy is oidc-provider's: refresh tokens rotate, and a consumed refresh token
presented again revokes the whole grant, with no grace window. Every count asserted here is the
provider's own (its events, served on its admin port), never the library's.

Time: the provider keeps real time, and its access tokens really expire (``TTL`` seconds).
The apps read the wall time from a SharedClock (tests/workers/clock.py) that the test sets to
the real time at the start of each round, after the provider's token has expired: during a
round the apps' time stands still, so a token refreshed in a round never falls due again in
the same round, however slow the machine. The one thing a slow machine could still do is
outlive the new access token itself (a round longer than ``TTL``): the provider's userinfo
would then refuse it, and a refresh after that 401 is legitimate. So "exactly one refresh per
rotation" is asserted exactly whenever the provider refused no access token in the round,
which is every round but on a machine ``TTL`` seconds slower than this one needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from asgi_token_refresh import CookieSessionStore, TokenSet

from .processes import HOST, RedisServer, Uvicorn, free_port, start_uvicorn, stop
from .providers.node_oidc import (
    Counts,
    NodeOIDCProvider,
    TokenError,
    missing_runtime,
    running_node_oidc_provider,
)
from .providers.proxy import LossyProxy
from .workers.clock import SharedClock

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(missing_runtime() is not None, reason=missing_runtime() or ""),
]

TTL = 4  # the provider's access-token lifetime, in seconds
SESSION_SECRET = "real-provider-session-secret-" + "k" * 32
ROUND = 20  # concurrent requests per round


@dataclass
class Stack:
    """The provider, the example app's servers, and the apps' shared wall time."""

    provider: NodeOIDCProvider
    servers: list[Uvicorn]
    clock: SharedClock
    issued_by: float = field(default_factory=time.time)  # the newest tokens, issued by then

    def browser(self, cookies: dict[str, str] | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(cookies=cookies, timeout=30.0)

    def now(self) -> None:
        """The apps' wall time := the real time (it only moves forward)."""
        self.clock.advance(max(0.0, time.time() - self.clock.time()))

    async def after_real_expiry(self) -> None:
        """Wait until the provider's newest access token has really expired (it was issued by
        ``issued_by``, for ``TTL`` seconds: dead from ``exp`` = its issue second + ``TTL``),
        then move the apps' time there."""
        await asyncio.sleep(max(0.0, self.issued_by + TTL + 0.1 - time.time()))
        self.now()

    def issued(self) -> None:
        self.issued_by = time.time()


def app_env(provider: NodeOIDCProvider, app_url: str, clock: SharedClock) -> dict[str, str]:
    return {
        "OIDC_ISSUER": provider.issuer,
        "OIDC_CLIENT_ID": provider.client_id,
        "OIDC_CLIENT_SECRET": provider.client_secret,
        "OIDC_SCOPE": "",  # the example's default: openid offline_access
        "APP_BASE_URL": app_url,
        "SESSION_SECRET": SESSION_SECRET,
        "REDIS_URL": "",
        "ATR_COORDINATOR": "",
        "ATR_WORKER_CLOCK": str(clock.path),
    }


@contextlib.contextmanager
def example_stack(
    tmp_path: Path,
    *,
    framework: str = "starlette",
    servers: int = 1,
    shared: dict[str, str] | None = None,
    issuer_port: int | None = None,
) -> Iterator[Stack]:
    """node oidc-provider, and ``servers`` uvicorn processes of the example app configured for
    it by environment, as in production (``shared``: the multi-worker variables). Every process
    is stopped by PID; their logs are printed (shown when a test fails)."""
    ports: list[int] = []
    while len(ports) < servers:
        ports.append(free_port(avoid={*ports, issuer_port or 0}))
    urls = [f"http://{HOST}:{port}" for port in ports]
    clock = SharedClock.create(tmp_path / "wall-time")
    with running_node_oidc_provider(
        tmp_path,
        redirect_uris=[url + "/auth/callback" for url in urls],
        post_logout_redirect_uris=[url + "/" for url in urls],
        access_token_ttl=TTL,
        issuer_port=issuer_port,
    ) as provider:
        started: list[Uvicorn] = []
        try:
            for index, (port, url) in enumerate(zip(ports, urls, strict=True)):
                env = app_env(provider, url, clock) | (shared or {}) | {"ATR_EXAMPLE": framework}
                log = tmp_path / f"app-{index}.log"
                started.append(
                    start_uvicorn(
                        "tests.workers.example_app:create_app", env=env, log=log, port=port
                    )
                )
            for server in started:
                server.wait_ready("/healthz")
            yield Stack(provider, started, clock)
        finally:
            stop(*(server.process for server in started), timeout=5)
            for index, server in enumerate(started):
                print(f"--- app {index} ---\n{server.output()}")
            print(f"--- node oidc-provider ---\n{provider.output()}")


async def log_in(stack: Stack, browser: httpx.AsyncClient, server: int = 0) -> httpx.Response:
    """/auth/login on ``server`` → the provider's login form → its consent form → back to
    the app's /auth/callback → /."""
    stack.now()
    app = stack.servers[server].url
    at_provider = await browser.get(
        app + "/auth/login", params={"next": "/"}, follow_redirects=True
    )
    landed = await stack.provider.through_forms(browser, at_provider, login="alice")
    stack.issued()
    assert landed.status_code == 200, landed.text
    assert str(landed.url) == app + "/"
    assert "Logged in as alice" in landed.text
    return landed


async def storm(stack: Stack, browser: httpx.AsyncClient, n: int = ROUND) -> list[httpx.Response]:
    """``n`` concurrent /api/me, spread over the servers in turn (the test is the load
    balancer); the newest tokens are issued by the time it returns."""
    urls = [stack.servers[i % len(stack.servers)].url + "/api/me" for i in range(n)]
    responses = list(await asyncio.gather(*(browser.get(url) for url in urls)))
    stack.issued()
    return responses


def session_cookies(cookies: httpx.Cookies) -> dict[str, str]:
    return {c.name: c.value or "" for c in cookies.jar if c.name.startswith("atr_session")}


async def token_set_in(cookies: httpx.Cookies) -> TokenSet:
    """The token set a CookieSessionStore cookie holds (the test knows the app's secret)."""
    session = await CookieSessionStore([SESSION_SECRET], secure=False).load(
        session_cookies(cookies)
    )
    assert session is not None
    return session.token_set


def assert_one_refresh(before: Counts, after: Counts) -> None:
    """The provider's counts over one round: every refresh it was asked for succeeded, none
    reused a refresh token, no grant was revoked, and there was exactly one, unless the round
    outlived the new access token (the provider refused it at userinfo: see the module)."""
    refreshes = after.token_calls("refresh_token") - before.token_calls("refresh_token")
    succeeded = after.token_calls("refresh_token", "success") - before.token_calls(
        "refresh_token", "success"
    )
    refused_at_userinfo = after.requests("userinfo", 401) - before.requests("userinfo", 401)
    assert refreshes == succeeded, after.token_errors
    assert after.grants_revoked == before.grants_revoked
    if refused_at_userinfo == 0:
        assert succeeded == 1
    else:  # a round slower than TTL: each refusal may have cost one refresh and a retry
        assert 1 <= succeeded <= 1 + refused_at_userinfo


def cleared(response: httpx.Response, cookie_name: str) -> bool:
    return any(
        c.startswith(f"{cookie_name}=;") and "Max-Age=0" in c
        for c in response.headers.get_list("set-cookie")
    )


# -- the provider's policy, as the suite relies on it -----------------------------------------


def test_the_provider_rotates_and_a_reused_refresh_token_revokes_the_whole_grant(
    tmp_path: Path,
) -> None:
    with running_node_oidc_provider(tmp_path, access_token_ttl=TTL) as provider:
        first = provider.log_in("alice")
        assert first["expires_in"] == TTL
        assert first["scope"] == "openid offline_access"
        assert first["refresh_token"]
        assert first["id_token"]

        rotated = provider.refresh(first["refresh_token"])
        assert rotated.status_code == 200
        second = rotated.json()
        assert second["refresh_token"] != first["refresh_token"]  # rotation
        assert second["access_token"] != first["access_token"]
        assert second["id_token"]  # an ID token on refresh too
        # The old access token still works after rotation, until it expires.
        assert provider.userinfo(first["access_token"]).status_code == 200
        assert provider.inspect(refresh_token=first["refresh_token"])["refresh_token"] == {
            "found": True,
            "consumed": True,
            "expired": False,
            "grant_id": provider.inspect(refresh_token=second["refresh_token"])["grant"]["id"],
        }

        # The consumed refresh token again, at once (no grace window): refused, and the whole
        # grant goes with it, the newest refresh and access tokens included.
        reused = provider.refresh(first["refresh_token"])
        assert reused.status_code == 400
        assert reused.json()["error"] == "invalid_grant"
        newest = provider.refresh(second["refresh_token"])
        assert newest.status_code == 400
        assert newest.json()["error"] == "invalid_grant"
        assert provider.userinfo(second["access_token"]).status_code == 401
        assert provider.userinfo(first["access_token"]).status_code == 401

        counts = provider.counts()
        assert counts.token_calls("authorization_code", "success") == 1
        assert counts.token_calls("refresh_token", "success") == 1
        assert counts.token_errors == [
            TokenError("refresh_token", "invalid_grant", "refresh token already used", 400),
            TokenError("refresh_token", "invalid_grant", "refresh token not found", 400),
        ]
        assert counts.refresh_tokens_consumed == 1
        assert counts.grants_revoked == 1
        assert counts.server_errors == 0


def test_revocation_ends_the_grant_and_without_rotation_a_refresh_token_is_kept(
    tmp_path: Path,
) -> None:
    with running_node_oidc_provider(tmp_path / "revocation") as provider:
        tokens = provider.log_in("bob")
        assert provider.revoke(tokens["refresh_token"], "refresh_token").status_code == 200
        refused = provider.refresh(tokens["refresh_token"])
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
        assert provider.userinfo(tokens["access_token"]).status_code == 401
        assert provider.counts().grants_revoked == 1
        assert provider.metadata["revocation_endpoint"] == provider.url + "/token/revocation"

    with running_node_oidc_provider(
        tmp_path / "no-rotation", rotate_refresh_tokens=False
    ) as provider:
        tokens = provider.log_in("carol")
        for _ in range(2):
            again = provider.refresh(tokens["refresh_token"])
            assert again.status_code == 200
            assert again.json()["refresh_token"] == tokens["refresh_token"]
        counts = provider.counts()
        assert counts.token_calls("refresh_token", "success") == 2
        assert counts.refresh_tokens_consumed == 0
        assert counts.grants_revoked == 0


def test_by_default_the_provider_accepts_an_access_token_15_s_past_its_expiry(
    tmp_path: Path,
) -> None:
    """oidc-provider's clockTolerance (15 s unless configured) applies to its own opaque
    tokens too: an access token past its ``expires_in`` still works at userinfo. The suite's
    provider sets it to 0 so that "expired" means expired."""
    with running_node_oidc_provider(tmp_path, access_token_ttl=1, clock_tolerance=15) as provider:
        tokens = provider.log_in("dave")
        deadline = time.monotonic() + 10
        while not provider.inspect(access_token=tokens["access_token"])["access_token"]["expired"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert provider.userinfo(tokens["access_token"]).status_code == 200


# -- the example apps -------------------------------------------------------------------------


async def test_login_through_the_providers_own_forms(tmp_path: Path) -> None:
    with example_stack(tmp_path) as stack:
        async with stack.browser() as browser:
            app, issuer = stack.servers[0].url, stack.provider.issuer
            login_form = await browser.get(app + "/auth/login", follow_redirects=True)
            hops = [r.url for r in (*login_form.history, login_form)]
            assert [str(url).partition("?")[0] for url in hops[:2]] == [
                app + "/auth/login",
                issuer + "/auth",  # the authorization endpoint, under the issuer's path
            ]
            assert str(hops[2]).startswith(issuer + "/interaction/")  # its own login form
            query = parse_qs(hops[1].query.decode())
            assert query["scope"] == ["openid offline_access"]
            assert query["prompt"] == ["consent"]  # oidc-provider's condition for offline_access
            assert query["code_challenge_method"] == ["S256"]

            landed = await stack.provider.through_forms(browser, login_form, login="alice")
            assert str(landed.url) == app + "/"
            assert "Logged in as alice" in landed.text
            callback = landed.history[-1].url
            assert callback.path == "/auth/callback"
            assert parse_qs(callback.query.decode())["iss"] == [issuer]  # RFC 9207

            me = await browser.get(app + "/api/me")
            assert me.status_code == 200
            assert me.json()["userinfo"] == {"sub": "alice"}
            claims = me.json()["claims"]  # the ID token, verified at login
            assert (claims["iss"], claims["aud"], claims["sub"]) == (issuer, "app", "alice")
            tokens = await token_set_in(browser.cookies)
            assert tokens.refresh_token is not None
            assert tokens.lifetime == TTL
        counts = stack.provider.counts()
        assert counts.token_calls("authorization_code", "success") == 1
        assert counts.token_calls("refresh_token") == 0
        assert counts.requests("discovery", 200) >= 1  # the app found it under /oidc


async def test_20_requests_after_real_expiry_refresh_once_per_rotation_and_stragglers_are_served(
    tmp_path: Path,
) -> None:
    """Three rotations: each after the provider's access token has really expired, each by a
    round of 20 concurrent requests, each followed by a straggler holding the cookie from
    before the rotation."""
    with example_stack(tmp_path) as stack:
        provider, app = stack.provider, stack.servers[0].url
        async with stack.browser() as browser:
            await log_in(stack, browser)
            for _ in range(3):
                old_cookie = session_cookies(browser.cookies)
                old = await token_set_in(browser.cookies)
                await stack.after_real_expiry()
                dead = provider.userinfo(old.access_token)
                assert dead.status_code == 401  # really expired at the provider

                before = provider.counts()
                responses = await storm(stack, browser)
                after = provider.counts()
                assert [r.status_code for r in responses] == [200] * ROUND
                assert {r.json()["userinfo"]["sub"] for r in responses} == {"alice"}
                assert_one_refresh(before, after)
                # Every response handed out the same new token set.
                handed = {
                    (t.access_token, t.refresh_token)
                    for t in [await token_set_in(r.cookies) for r in responses]
                }
                new = await token_set_in(browser.cookies)
                assert handed == {(new.access_token, new.refresh_token)}
                assert new.refresh_token != old.refresh_token
                assert new.generation == old.generation + after.refresh_calls - before.refresh_calls
                rotated = provider.inspect(refresh_token=old.refresh_token)
                assert rotated["refresh_token"]["consumed"] is True
                assert rotated["grant"]["active"] is True

                # A straggler with the pre-rotation cookie is served and handed the new one,
                # without a call to the provider.
                async with stack.browser(cookies=old_cookie) as straggler:
                    late = await straggler.get(app + "/api/me")
                    assert late.status_code == 200
                    assert late.json()["userinfo"]["sub"] == "alice"
                    served = await token_set_in(late.cookies)
                assert served.refresh_token == new.refresh_token
                assert served.access_token == new.access_token
                assert provider.counts().refresh_calls == after.refresh_calls

        counts = provider.counts()
        assert counts.token_calls("refresh_token", "success") == counts.refresh_calls >= 3
        assert counts.token_errors == []
        assert counts.grants_revoked == 0
        assert counts.server_errors == 0


@pytest.fixture
def shared_mode(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The environment of four workers that share Redis, or the files of this test's own
    temporary directory (the file coordinator's)."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        return {"REDIS_URL": server.url}
    return {"ATR_COORDINATOR": "file", "TMPDIR": str(tmp_path)}


@pytest.mark.parametrize(
    ("shared_mode", "framework"),
    [("file", "fastapi"), ("redis", "starlette")],
    indirect=["shared_mode"],
)
async def test_four_workers_refresh_once_per_rotation_and_logout_revokes_the_grant(
    tmp_path: Path, shared_mode: dict[str, str], framework: str
) -> None:
    """Four processes of the example app that share nothing but SESSION_SECRET and Redis (or
    the files of the file coordinator), the test playing the load balancer: every round of 20
    requests reaches all four after real expiry, and the provider refreshes once."""
    with example_stack(tmp_path, framework=framework, servers=4, shared=shared_mode) as stack:
        provider, workers = stack.provider, stack.servers
        async with stack.browser() as browser:
            await log_in(stack, browser, server=1)
            for _ in range(2):
                before = provider.counts()
                old_cookie = session_cookies(browser.cookies)
                await stack.after_real_expiry()
                responses = await storm(stack, browser)
                after = provider.counts()
                assert [r.status_code for r in responses] == [200] * ROUND
                assert {r.json()["userinfo"]["sub"] for r in responses} == {"alice"}
                assert_one_refresh(before, after)
                if old_cookie:  # cookie sessions: a straggler on another worker is served too
                    async with stack.browser(cookies=old_cookie) as straggler:
                        late = await straggler.get(workers[3].url + "/api/me")
                        assert late.status_code == 200
                    assert provider.counts().refresh_calls == after.refresh_calls

            out = await browser.post(
                workers[2].url + "/auth/logout", headers={"origin": workers[2].url}
            )
            assert out.status_code == 303
            statuses = [(await browser.get(w.url + "/api/me")).status_code for w in workers]
            assert statuses == [401] * 4
        counts = provider.counts()
        assert counts.requests("revocation", 200) == 1
        assert counts.grants_revoked == 1
        assert counts.token_calls("refresh_token", "success") == counts.refresh_calls >= 2
        assert [e.error for e in counts.token_errors] == []
        assert counts.server_errors == 0


async def test_logout_revokes_the_grant_at_the_provider_and_ends_its_session(
    tmp_path: Path,
) -> None:
    with example_stack(tmp_path) as stack:
        provider, app = stack.provider, stack.servers[0].url
        async with stack.browser() as browser:
            await log_in(stack, browser)
            cookie = session_cookies(browser.cookies)
            tokens = await token_set_in(browser.cookies)
            assert tokens.refresh_token is not None
            grant = provider.inspect(refresh_token=tokens.refresh_token)["grant"]
            assert grant["active"] is True

            out = await browser.post(app + "/auth/logout", headers={"origin": app})
            assert out.status_code == 303
            assert cleared(out, "atr_session")
            assert out.headers["location"].startswith(provider.issuer + "/session/end?")
            # The provider asks its user to confirm (its own logout form), then sends the
            # browser back to the app.
            confirm = await browser.get(out.headers["location"], follow_redirects=True)
            back = await provider.through_forms(browser, confirm)
            assert str(back.url) == app + "/"
            assert "Not logged in" in back.text

        counts = provider.counts()
        assert counts.requests("revocation", 200) == 1
        assert counts.revoked_grant_ids == [grant["id"]]
        assert counts.requests("end_session_confirm") == 1
        assert provider.inspect(grant_id=grant["id"])["grant"]["active"] is False
        refused = provider.refresh(tokens.refresh_token)  # the refresh token no longer works
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
        assert provider.userinfo(tokens.access_token).status_code == 401
        async with stack.browser(cookies=cookie) as replay:  # the old cookie, replayed
            response = await replay.get(app + "/api/me")
            assert response.status_code == 401
            assert response.json()["error"] == "reauthentication_required"
        assert provider.counts().token_calls("refresh_token", "success") == 0


async def test_a_lost_refresh_answer_logs_the_user_out_because_reuse_revokes_the_grant(
    tmp_path: Path,
) -> None:
    """The provider rotates the refresh token but its answer never reaches the app (the
    connection closes on the way back). The app keeps the session (503, Retry-After) and tries
    again with the only refresh token it has: consumed, so oidc-provider takes it for theft and
    revokes the grant. With rotation, reuse revocation and no grace window, a lost refresh
    answer logs the user out: what ``probe`` warns about."""
    proxy_port = free_port()
    with example_stack(tmp_path, issuer_port=proxy_port) as stack:
        provider, app = stack.provider, stack.servers[0].url
        with LossyProxy(provider.port, port=proxy_port) as proxy:
            async with stack.browser() as browser:
                await log_in(stack, browser)
                tokens = await token_set_in(browser.cookies)
                assert tokens.refresh_token is not None
                grant_id = provider.inspect(refresh_token=tokens.refresh_token)["grant"]["id"]

                proxy.lose_answer_to(b"grant_type=refresh_token")
                await stack.after_real_expiry()
                lost = await asyncio.gather(*(browser.get(app + "/api/me") for _ in range(5)))
                assert proxy.lost == 1
                assert [r.status_code for r in lost] == [503] * 5
                assert {r.json()["error"] for r in lost} == {"token_refresh_unavailable"}
                retry_after = int(lost[0].headers["retry-after"])
                assert not any(cleared(r, "atr_session") for r in lost)  # session kept
                counts = provider.counts()
                assert counts.token_calls("refresh_token") == 1  # one flight, answered, lost
                assert counts.token_calls("refresh_token", "success") == 1
                assert counts.refresh_tokens_consumed == 1
                assert counts.grants_revoked == 0

                await asyncio.sleep(retry_after + 0.2)  # the app remembers the outage as long
                dead = await browser.get(app + "/api/me")
                assert dead.status_code == 401
                assert dead.json() == {
                    "error": "reauthentication_required",
                    "reason": "invalid_grant",
                }
                assert cleared(dead, "atr_session")
                assert (await browser.get(app + "/api/me")).status_code == 401

        counts = provider.counts()
        assert counts.token_calls("refresh_token") == 2
        assert counts.token_errors == [
            TokenError("refresh_token", "invalid_grant", "refresh token already used", 400)
        ]
        assert counts.revoked_grant_ids == [grant_id]  # the rotated token's grant, all of it
        assert provider.inspect(grant_id=grant_id)["grant"]["active"] is False
        assert provider.userinfo(tokens.access_token).status_code == 401
