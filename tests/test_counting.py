"""Exact counts: every refresh, dedupe hit and terminal failure is counted once, from every entry
point, and the series the dashboard and the alerts query exist from the start.

Each test drives one event through a real entry point (the middleware's accessor, async and
``.sync``, its per-request httpx clients, ``SessionTokens``, ``MachineTokens`` and their
``.sync`` forms, ``TokenAuth``, the login callback) against the FakeIdP and asserts every counter
point that moved: nothing more, nothing less. dashboards/README.md ("Events and the points they
record") is the table these tests hold the library to.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from asgi_token_refresh import (
    CookieSessionStore,
    FileCoordinator,
    MachineTokens,
    OAuth2Client,
    OIDCLogin,
    ReauthenticationRequired,
    Refresher,
    RefreshUnavailable,
    SessionTokens,
    TokenAuth,
    TokenEndpointError,
    TokenRefreshMiddleware,
    TokenSet,
)
from asgi_token_refresh._telemetry import (
    COORDINATOR_ERRORS,
    DUPLICATES,
    LOGOUTS,
    PROVIDER,
    REFRESH_ACTIVE,
    REFRESHES,
    TERMINAL_FAILURES,
    TOKEN_FRESH,
    TOKEN_REQUESTS,
)
from asgi_token_refresh.testing import CapturedTelemetry, FakeClock, FakeIdP, Fault
from asgi_token_refresh.testing import capture_telemetry as new_capture

from .helpers import ISSUER, login

pytestmark = pytest.mark.anyio

APP = "https://app.test"
API = "https://api.test"
KEY = "k" * 32
EXPIRED = 300.0  # the FakeIdP's access tokens live 300 s
STORM = 5

# -- the points, as short strings ---------------------------------------------------------------

#: Every counter the library records, by the short name the expectations use.
COUNTERS = {
    REFRESHES: "refreshes",
    TOKEN_REQUESTS: "token.requests",
    TERMINAL_FAILURES: "terminal_failures",
    TOKEN_FRESH: "token.fresh",
    LOGOUTS: "logouts",
    COORDINATOR_ERRORS: "coordinator.errors",
    DUPLICATES: "duplicates",
}
FRESH = "token.fresh{}"


def refreshes(outcome: str = "success", grant: str = "refresh_token") -> str:
    return f"refreshes{{grant={grant},outcome={outcome}}}"


def requests(dedupe: str) -> str:
    return f"token.requests{{dedupe={dedupe}}}"


def terminal(error_type: str, component: str) -> str:
    return f"terminal_failures{{component={component},error.type={error_type}}}"


def logouts(revocation: str) -> str:
    return f"logouts{{revocation={revocation}}}"


def _short(labels: dict[str, Any]) -> str:
    names = sorted((k.removeprefix("asgi_token_refresh."), v) for k, v in labels.items())
    return "{" + ",".join(f"{k}={v}" for k, v in names) + "}"


def moved(captured: CapturedTelemetry, provider: str = "fake") -> dict[str, float]:
    """Every counter point that is not zero, e.g. ``{"refreshes{grant=...,outcome=...}": 1}``;
    each one carries ``provider``."""
    found: dict[str, float] = {}
    for metric, short in COUNTERS.items():
        for labels, point in captured.points(metric):
            if point.value:
                assert labels.pop(PROVIDER) == provider, (metric, labels)
                found[short + _short(labels)] = point.value
    return found


# -- the world: provider, refresher, app, API ---------------------------------------------------


class World:
    """A FakeIdP, a refresher on captured telemetry, an app behind the middleware (cookie
    sessions, so that a copy of a cookie is a straggler holding older tokens), an API that
    answers 200 or, when ``refuse_api`` is set, 401."""

    def __init__(self, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry) -> None:
        self.idp, self.clock, self.captured = idp, clock, captured
        self.client = OAuth2Client.from_discovery(
            ISSUER,
            client_id="app",
            client_secret="app-secret",
            transport=idp.transport(),
            clock=clock,
            name="fake",
            telemetry=captured.telemetry,
        )
        self.refresher = Refresher(self.client, jitter=0)
        self.refuse_api = False
        self.api = httpx.MockTransport(lambda _: httpx.Response(401 if self.refuse_api else 200))
        self.app = self._app(on_terminal="401")
        self.anonymous_app = self._app(on_terminal="anonymous")
        self._seen: dict[str, float] = {}

    def counted(self) -> dict[str, float]:
        """What moved since the last call: ``{point: increase}``."""
        now = moved(self.captured)
        increase = {k: v - self._seen.get(k, 0) for k, v in now.items() if v != self._seen.get(k)}
        self._seen = now
        return increase

    def due(self) -> None:
        self.clock.advance(EXPIRED)

    def _app(self, on_terminal: str) -> Starlette:
        idp, api = self.idp, self.api

        async def login_route(request: Request) -> JSONResponse:
            await request.state.token.login(idp.issue("alice"))
            return JSONResponse({})

        async def token(request: Request) -> JSONResponse:
            return JSONResponse({"token": await request.state.token.get()})

        def sync_token(request: Request) -> JSONResponse:
            return JSONResponse({"token": request.state.token.sync.get()})

        async def call_api(request: Request) -> JSONResponse:
            async with request.state.token.client(base_url=API, transport=api) as client:
                response = await client.get("/me")
            return JSONResponse({}, status_code=200 if response.status_code == 200 else 502)

        def sync_call_api(request: Request) -> JSONResponse:
            with request.state.token.sync.client(base_url=API, transport=api) as client:
                response = client.get("/me")
            return JSONResponse({}, status_code=200 if response.status_code == 200 else 502)

        async def logout(request: Request) -> JSONResponse:
            revoke = request.query_params.get("revoke") != "no"
            await request.state.token.logout(revoke=revoke)
            return JSONResponse({})

        def sync_logout(request: Request) -> JSONResponse:
            request.state.token.sync.logout()
            return JSONResponse({})

        async def login_without_refresh_token(request: Request) -> JSONResponse:
            await request.state.token.login({"access_token": "opaque", "expires_in": 300})
            return JSONResponse({})

        return Starlette(
            routes=[
                Route("/login", login_route),
                Route("/login-without-refresh-token", login_without_refresh_token),
                Route("/token", token),
                Route("/sync-token", sync_token),
                Route("/api", call_api),
                Route("/sync-api", sync_call_api),
                Route("/logout", logout),
                Route("/sync-logout", sync_logout),
                Mount("/auth", app=OIDCLogin(self.client, secret_keys=[KEY], scope="openid")),
            ],
            middleware=[
                Middleware(
                    TokenRefreshMiddleware,
                    refresher=self.refresher,
                    store=CookieSessionStore([KEY], clock=self.clock),
                    on_terminal=on_terminal,
                )
            ],
        )


@pytest.fixture
def captured() -> Iterator[CapturedTelemetry]:
    capture = new_capture()
    yield capture
    capture.shutdown()


@pytest.fixture
def world(idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry) -> World:
    made = World(idp, clock, captured)
    made.counted()  # (the zeros of a new refresher are not a move)
    return made


# -- callers: one per entry point ---------------------------------------------------------------


class Asker(Protocol):
    async def get(self) -> str:
        """One token request: ``"ok"``, ``"terminal"`` or ``"unavailable"``."""
        ...


class Caller(Asker, Protocol):
    """Someone asking for a token for a user's session through one entry point."""

    def straggler(self) -> Caller:
        """Another caller holding the same tokens as this one now."""
        ...


_ANSWERS = {200: "ok", 401: "terminal", 503: "unavailable"}


class Browser:
    """A browser of the app; ``path`` says which endpoint asks for the token and how."""

    def __init__(self, world: World, path: str, app: Any = None, cookies: Any = None) -> None:
        self.world, self.path, self.app = world, path, app or world.app
        self.cookies = httpx.Cookies(cookies)

    async def visit(self, path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(
            transport=transport, base_url=APP, cookies=self.cookies
        ) as browser:
            response = await browser.get(path)
            self.cookies = httpx.Cookies(browser.cookies)
        return response

    async def get(self) -> str:
        return _ANSWERS.get((await self.visit(self.path)).status_code, "failed")

    def straggler(self) -> Browser:
        return Browser(self.world, self.path, self.app, self.cookies)


class Job:
    """A background job with a user's tokens: ``SessionTokens``, its ``.sync`` form in a worker
    thread, or a ``TokenAuth`` over either calling the API."""

    def __init__(self, world: World, tokens: SessionTokens, how: str) -> None:
        self.world, self.tokens, self.how = world, tokens, how

    async def get(self) -> str:
        try:
            if self.how == "SessionTokens":
                await self.tokens.get()
            elif self.how == "SessionTokens.sync":
                await asyncio.to_thread(self.tokens.sync.get)
            elif self.how == "TokenAuth(SessionTokens)":
                auth = TokenAuth(self.tokens)
                async with httpx.AsyncClient(auth=auth, transport=self.world.api) as client:
                    return _ANSWERS[(await client.get(f"{API}/me")).status_code]
            else:
                return await asyncio.to_thread(self._sync_call)
        except ReauthenticationRequired:
            return "terminal"
        except RefreshUnavailable:
            return "unavailable"
        return "ok"

    def _sync_call(self) -> str:
        auth = TokenAuth(self.tokens.sync)
        with httpx.Client(auth=auth, transport=self.world.api) as client:
            return _ANSWERS[client.get(f"{API}/me").status_code]

    def straggler(self) -> Job:
        tokens = SessionTokens(self.world.refresher, self.tokens.token_set)
        return Job(self.world, tokens, self.how)


@dataclass(frozen=True)
class Entry:
    """An entry point for a user's session."""

    name: str
    component: str  # where a dead session is counted: asgi (the accessor) or httpx
    session: Callable[[World], Awaitable[Caller]]  # a caller with a fresh session
    sessionless: Callable[[World], Caller]  # a caller whose session cannot be refreshed
    api: bool = False  # a TokenAuth calls the API: it can meet downstream 401s


def _browser_entry(path: str, api: bool = False) -> Entry:
    async def session(world: World) -> Caller:
        browser = Browser(world, path)
        await browser.visit("/login")
        return browser

    return Entry(path, "asgi", session, lambda world: Browser(world, path), api)


def _job_entry(how: str, api: bool = False) -> Entry:
    async def session(world: World) -> Caller:
        return Job(world, SessionTokens(world.refresher, login(world.idp, world.clock)), how)

    def sessionless(world: World) -> Caller:
        now = world.clock.time()
        no_refresh_token = TokenSet(access_token="opaque", expires_at=now, issued_at=now - 300)
        return Job(world, SessionTokens(world.refresher, no_refresh_token), how)

    return Entry(how, "httpx", session, sessionless, api)


ENTRIES = [
    _browser_entry("/token"),  # the accessor: await request.state.token.get()
    _browser_entry("/sync-token"),  # a sync endpoint: request.state.token.sync.get()
    _browser_entry("/api", api=True),  # the accessor's httpx client (TokenAuth)
    _browser_entry("/sync-api", api=True),  # the sync accessor's httpx client
    _job_entry("SessionTokens"),
    _job_entry("SessionTokens.sync"),
    _job_entry("TokenAuth(SessionTokens)", api=True),
    _job_entry("TokenAuth(SessionTokens.sync)", api=True),
]
API_ENTRIES = [e for e in ENTRIES if e.api]  # a TokenAuth in front of the API


@pytest.fixture(params=ENTRIES, ids=[e.name for e in ENTRIES])
def entry(request: pytest.FixtureRequest) -> Entry:
    chosen: Entry = request.param
    return chosen


async def storm(world: World, callers: Sequence[Asker]) -> list[str]:
    """Every caller at once, all of them on one flight: the provider holds the leader's call
    until all have boarded (real concurrency, no sleeping for time)."""
    gate = world.idp.pause_token_endpoint()
    tasks = [asyncio.ensure_future(caller.get()) for caller in callers]
    await gate.arrived(1)
    await until(lambda: world.refresher.waiting == len(callers))
    gate.release()
    return list(await asyncio.gather(*tasks))


async def until(condition: Callable[[], bool]) -> None:
    """Wait for other threads and tasks to reach a state (bounded; never asserts on time)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise TimeoutError("condition never held")


# -- a user's session, from every entry point ---------------------------------------------------


async def test_a_fresh_token_is_one_fresh_hit_and_nothing_else(world: World, entry: Entry) -> None:
    caller = await entry.session(world)
    assert await caller.get() == "ok"
    assert world.counted() == {FRESH: 1}


async def test_a_refresh_is_one_provider_call_and_one_leader(world: World, entry: Entry) -> None:
    caller = await entry.session(world)
    world.due()
    assert await caller.get() == "ok"
    assert world.counted() == {refreshes(): 1, requests("leader"): 1}
    assert await caller.get() == "ok"  # the new tokens, as the caller now holds them
    assert world.counted() == {FRESH: 1}


async def test_a_storm_is_one_provider_call_one_leader_and_the_rest_joined(
    world: World, entry: Entry
) -> None:
    caller = await entry.session(world)
    world.due()
    answers = await storm(world, [caller] * STORM)
    assert answers == ["ok"] * STORM
    assert world.counted() == {
        refreshes(): 1,
        requests("leader"): 1,
        requests("joined"): STORM - 1,
    }
    assert world.idp.token_calls("refresh_token") == 1


async def test_a_straggler_with_the_old_tokens_is_one_grace_cache_hit(
    world: World, entry: Entry
) -> None:
    caller = await entry.session(world)
    late = caller.straggler()
    world.due()
    assert await caller.get() == "ok"
    world.counted()
    assert await late.get() == "ok"
    assert world.counted() == {requests("grace_cache"): 1}


async def test_invalid_grant_is_one_refresh_and_one_terminal_failure_where_it_surfaced(
    world: World, entry: Entry
) -> None:
    caller = await entry.session(world)
    late = caller.straggler()
    world.due()
    world.idp.script(Fault.invalid_grant())
    assert await caller.get() == "terminal"
    assert world.counted() == {
        refreshes("invalid_grant"): 1,
        requests("leader"): 1,
        terminal("invalid_grant", entry.component): 1,
    }
    # Another caller with the same dead refresh token: the refusal remembered, not the provider.
    # It is a dedupe hit (how it was served) and a terminal failure (what it got): one each.
    assert await late.get() == "terminal"
    assert world.counted() == {
        requests("negative_cache"): 1,
        terminal("invalid_grant", entry.component): 1,
    }


async def test_a_storm_that_ends_invalid_grant_is_one_terminal_failure_per_caller(
    world: World, entry: Entry
) -> None:
    caller = await entry.session(world)
    world.due()
    world.idp.script(Fault.invalid_grant())
    assert await storm(world, [caller] * STORM) == ["terminal"] * STORM
    assert world.counted() == {
        refreshes("invalid_grant"): 1,
        requests("leader"): 1,
        requests("joined"): STORM - 1,
        terminal("invalid_grant", entry.component): STORM,
    }


async def test_a_refused_client_is_counted_as_invalid_client(world: World, entry: Entry) -> None:
    caller = await entry.session(world)
    world.due()
    world.idp.script(Fault.invalid_client())
    assert await caller.get() == "terminal"
    assert world.counted() == {
        refreshes("invalid_client"): 1,
        requests("leader"): 1,
        terminal("invalid_client", entry.component): 1,
    }


async def test_a_provider_outage_is_a_refresh_and_no_terminal_failure(
    world: World, entry: Entry
) -> None:
    caller = await entry.session(world)
    late = caller.straggler()
    world.due()
    world.idp.script(Fault.unavailable(retry_after=7))
    assert await caller.get() == "unavailable"
    assert world.counted() == {refreshes("provider_error"): 1, requests("leader"): 1}
    assert await late.get() == "unavailable"  # remembered for its Retry-After
    assert world.counted() == {requests("negative_cache"): 1}


async def test_a_caller_without_a_refreshable_session_is_one_no_session_failure(
    world: World, entry: Entry
) -> None:
    assert await entry.sessionless(world).get() == "terminal"
    assert world.counted() == {terminal("no_session", entry.component): 1}


@pytest.mark.parametrize("entry", API_ENTRIES, ids=[e.name for e in API_ENTRIES])
async def test_an_api_that_refuses_the_new_token_too_is_one_downstream_401(
    world: World, entry: Entry
) -> None:
    caller = await entry.session(world)
    world.refuse_api = True
    assert await caller.get() == "terminal"
    assert world.counted() == {
        FRESH: 1,  # the first try's token
        refreshes(): 1,  # the compare-and-refresh after the first 401
        requests("leader"): 1,
        terminal("downstream_401", "httpx"): 1,  # counted where the second 401 is met
    }


async def test_a_terminal_failure_on_a_background_jobs_token_auth_is_counted_once(
    world: World,
) -> None:
    session = SessionTokens(world.refresher, login(world.idp, world.clock))
    world.due()
    world.idp.script(Fault.invalid_grant())
    auth = TokenAuth(session, anonymous=MachineTokens(world.refresher))
    async with httpx.AsyncClient(auth=auth, transport=world.api) as client:
        assert (await client.get(f"{API}/me")).status_code == 200  # on, anonymously
    assert world.counted() == {
        refreshes("invalid_grant"): 1,
        refreshes("success", "client_credentials"): 1,
        requests("leader"): 2,  # the session's flight, then the machine token's
        terminal("invalid_grant", "httpx"): 1,  # the session died, though the job went on
    }


# -- machine tokens -------------------------------------------------------------------------------


class Machine:
    """Client-credentials tokens: ``MachineTokens``, its ``.sync`` form, a ``TokenAuth`` over it,
    or the middleware's ``on_terminal="anonymous"`` for a visitor without a session."""

    def __init__(self, world: World, how: str) -> None:
        self.world, self.how = world, how
        self.tokens = MachineTokens(world.refresher)

    async def get(self) -> str:
        try:
            if self.how == "MachineTokens":
                await self.tokens.get()
            elif self.how == "MachineTokens.sync":
                await asyncio.to_thread(self.tokens.sync.get)
            elif self.how == "TokenAuth(MachineTokens)":
                auth = TokenAuth(self.tokens)
                async with httpx.AsyncClient(auth=auth, transport=self.world.api) as client:
                    return _ANSWERS[(await client.get(f"{API}/me")).status_code]
            else:
                return await Browser(self.world, "/token", self.world.anonymous_app).get()
        except TokenEndpointError:
            return "refused"
        return "ok"


MACHINES = {  # how -> where its refusals are counted
    "MachineTokens": "httpx",
    "MachineTokens.sync": "httpx",
    "TokenAuth(MachineTokens)": "httpx",
    "anonymous visitor": "asgi",
}


@pytest.fixture(params=list(MACHINES))
def machine(request: pytest.FixtureRequest, world: World) -> Machine:
    return Machine(world, request.param)


async def test_a_machine_token_is_one_refresh_then_fresh_hits(machine: Machine) -> None:
    world = machine.world
    assert await machine.get() == "ok"
    assert world.counted() == {refreshes(grant="client_credentials"): 1, requests("leader"): 1}
    assert await machine.get() == "ok"
    assert world.counted() == {FRESH: 1}


async def test_a_machine_token_storm_is_one_refresh(machine: Machine) -> None:
    world = machine.world
    assert await storm(world, [machine] * STORM) == ["ok"] * STORM
    assert world.counted() == {
        refreshes(grant="client_credentials"): 1,
        requests("leader"): 1,
        requests("joined"): STORM - 1,
    }


async def test_a_refused_client_credentials_grant_is_a_terminal_failure_per_caller(
    machine: Machine,
) -> None:
    world, component = machine.world, MACHINES[machine.how]
    world.idp.script(Fault.invalid_client())
    assert await machine.get() != "ok"  # (the anonymous visitor gets a 503: see the README)
    assert world.counted() == {
        refreshes("invalid_client", "client_credentials"): 1,
        requests("leader"): 1,
        terminal("invalid_client", component): 1,
    }
    assert await machine.get() != "ok"
    assert world.counted() == {
        requests("negative_cache"): 1,
        terminal("invalid_client", component): 1,
    }


async def test_a_session_that_dies_under_on_terminal_anonymous_is_counted_once(
    world: World,
) -> None:
    browser = Browser(world, "/token", world.anonymous_app)
    await browser.visit("/login")
    world.due()
    world.idp.script(Fault.invalid_grant())
    assert await browser.get() == "ok"  # on as an anonymous visitor
    assert world.counted() == {
        refreshes("invalid_grant"): 1,
        refreshes("success", "client_credentials"): 1,
        requests("leader"): 2,
        terminal("invalid_grant", "asgi"): 1,
    }
    assert await browser.get() == "ok"  # no session at all now: not a failure when anonymous
    assert world.counted() == {FRESH: 1}


# -- across processes ---------------------------------------------------------------------------


async def test_a_flight_another_process_served_counts_its_callers_once(
    idp: FakeIdP, clock: FakeClock, tmp_path: Path
) -> None:
    """Two refreshers standing for two processes share a FileCoordinator: the second one's
    flight takes the first one's result. Its leader is counted as ``distributed`` (not also as
    ``leader``): every caller once."""
    here, there = new_capture(), new_capture()
    processes, coordinators = [], []
    for captured in (here, there):
        client = OAuth2Client.from_discovery(
            ISSUER,
            client_id="app",
            client_secret="app-secret",
            transport=idp.transport(),
            clock=clock,
            name="fake",
            telemetry=captured.telemetry,
        )
        coordinators.append(FileCoordinator(tmp_path, secret_keys=[KEY]))
        processes.append(Refresher(client, jitter=0, coordinator=coordinators[-1]))
    first, second = processes
    session = login(idp, clock)
    clock.advance(EXPIRED)
    try:
        await first.ensure_fresh(session)
        served = await asyncio.gather(*(second.ensure_fresh(session) for _ in range(3)))
        assert len({t.access_token for t in served}) == 1
        assert moved(here) == {refreshes(): 1, requests("leader"): 1}
        assert moved(there) == {requests("distributed"): 1, requests("joined"): 2}
        assert idp.token_calls("refresh_token") == 1
    finally:
        for refresher, coordinator, captured in zip(
            processes, coordinators, (here, there), strict=True
        ):
            await refresher.client.aclose()
            await coordinator.aclose()
            captured.shutdown()


# -- login and logout ---------------------------------------------------------------------------


async def _callback(world: World, browser: Browser) -> str:
    """Start a login; the callback (path and query) the provider sends the browser back to."""
    started = await browser.visit("/auth/login")
    assert started.status_code == 303
    async with httpx.AsyncClient(transport=world.idp.transport()) as provider:
        answer = await provider.get(started.headers["location"])
    callback = urlsplit(answer.headers["location"])
    return f"{callback.path}?{callback.query}"


@pytest.mark.parametrize("fault", ["invalid_grant", "invalid_client"])
async def test_a_refused_code_exchange_is_a_terminal_failure_of_the_login(
    world: World, fault: str
) -> None:
    browser = Browser(world, "/token")
    callback = await _callback(world, browser)
    world.idp.script(getattr(Fault, fault)())
    assert (await browser.visit(callback)).status_code == 400
    assert world.counted() == {terminal(fault, "login"): 1}


async def test_a_login_that_succeeds_or_that_the_user_declines_counts_nothing(
    world: World,
) -> None:
    browser = Browser(world, "/token")
    assert (await browser.visit(await _callback(world, browser))).status_code == 303
    assert await browser.get() == "ok"
    assert world.counted() == {FRESH: 1}  # the token request after login; the login nothing
    [state] = parse_qs(urlsplit(await _callback(world, browser)).query)["state"]
    declined = await browser.visit(f"/auth/callback?error=access_denied&state={state}")
    assert declined.status_code == 400
    assert world.counted() == {}


@pytest.mark.parametrize(
    ("path", "revocation"),
    [("/logout", "revoked"), ("/sync-logout", "revoked"), ("/logout?revoke=no", "skipped")],
)
async def test_a_logout_is_counted_once_by_what_became_of_the_grant(
    world: World, path: str, revocation: str
) -> None:
    browser = Browser(world, "/token")
    await browser.visit("/login")
    await browser.visit(path)
    assert world.counted() == {logouts(revocation): 1}
    await browser.visit(path)  # no session left: nothing ended, nothing counted
    assert world.counted() == {}


async def test_a_logout_of_a_session_without_a_refresh_token_is_counted_as_skipped(
    world: World,
) -> None:
    browser = Browser(world, "/token")
    await browser.visit("/login-without-refresh-token")
    await browser.visit("/logout")
    assert world.counted() == {logouts("skipped"): 1}


# -- series that exist from the start -------------------------------------------------------------


def _labels(captured: CapturedTelemetry, metric: str) -> dict[str, float]:
    return {_short(labels): point.value for labels, point in captured.points(metric)}


def _zeros(**values: tuple[str, ...]) -> set[str]:
    """Every combination of ``values`` (short keys), as ``_short`` writes label sets."""
    combos: list[dict[str, str]] = [{"provider": "fake"}]
    for key, options in values.items():
        combos = [{**c, key: option} for c in combos for option in options]
    return {_short(c) for c in combos}


OUTCOMES = (
    "success",
    "invalid_grant",
    "invalid_client",
    "provider_error",
    "timeout",
    "network_error",
)


async def test_a_new_refresher_exports_every_queried_series_at_zero(
    idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    world = World(idp, clock, captured)  # (kept: the fresh counter reads it weakly)
    series = {metric: _labels(captured, metric) for metric in (*COUNTERS, REFRESH_ACTIVE)}
    assert all(value == 0 for points in series.values() for value in points.values())
    assert set(series[REFRESHES]) == _zeros(
        grant=("refresh_token", "client_credentials"), outcome=OUTCOMES
    )
    assert set(series[TOKEN_REQUESTS]) == _zeros(
        dedupe=("leader", "joined", "grace_cache", "negative_cache", "distributed")
    )
    terminal_series = (
        _zeros(component=("asgi",), **{"error.type": ("invalid_grant", "invalid_client")})
        | _zeros(component=("asgi", "httpx"), **{"error.type": ("no_session",)})
        | _zeros(component=("httpx", "login"), **{"error.type": ("invalid_grant",)})
        | _zeros(component=("httpx", "login"), **{"error.type": ("invalid_client",)})
        | _zeros(component=("httpx",), **{"error.type": ("downstream_401",)})
    )
    assert set(series[TERMINAL_FAILURES]) == terminal_series
    assert len(terminal_series) == 9
    assert set(series[DUPLICATES]) == _zeros(
        detected_by=("store_conflict", "newer_stored", "spent_here")
    )
    assert set(series[LOGOUTS]) == _zeros(
        revocation=("revoked", "unsupported", "failed", "skipped")
    )
    assert set(series[COORDINATOR_ERRORS]) == _zeros(coordinator=("local",))
    assert set(series[REFRESH_ACTIVE]) == _zeros()
    assert set(series[TOKEN_FRESH]) == _zeros()  # the refresher's plain counter, read as 0
    assert world.refresher.fresh_hits == 0


async def test_after_one_event_its_series_reads_exactly_one(world: World) -> None:
    caller = await _browser_entry("/token").session(world)
    world.due()
    assert await caller.get() == "ok"
    points = _labels(world.captured, REFRESHES)
    assert len(points) == 12
    assert points.pop(_short({"provider": "fake", "grant": "refresh_token", "outcome": "success"}))
    assert set(points.values()) == {0}
    success = world.captured.value(REFRESHES, outcome="success", grant="refresh_token")
    assert success == 1  # not 2: the zero is a starting point, not a count


async def test_the_configured_coordinators_errors_start_at_zero_too(
    captured: CapturedTelemetry, idp: FakeIdP, clock: FakeClock, tmp_path: Path
) -> None:
    world = World(idp, clock, captured)
    coordinator = FileCoordinator(tmp_path, secret_keys=[KEY])
    Refresher(world.client, coordinator=coordinator)
    assert _labels(captured, COORDINATOR_ERRORS) == {
        _short({"provider": "fake", "coordinator": "local"}): 0,
        _short({"provider": "fake", "coordinator": "file"}): 0,
    }
    await coordinator.aclose()


def test_the_zeros_reach_a_meter_provider_set_up_after_the_client_was_made() -> None:
    """Apps often make their client at import time and install the SDK later (the API drops
    what is recorded before): the zeros are recorded again at the first collection."""
    script = textwrap.dedent(
        """
        import json
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from asgi_token_refresh import OAuth2Client, Refresher

        client = OAuth2Client(client_id="app", client_secret="s",
                              token_endpoint="https://idp.example/token", name="early")
        refresher = Refresher(client)  # on the global providers, before any SDK
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        points = {}
        for resource in reader.get_metrics_data().resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points[metric.name] = [p.value for p in metric.data.data_points]
        print(json.dumps(points))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    points = json.loads(done.stdout)
    assert points[REFRESHES] == [0] * 12
    assert points[TERMINAL_FAILURES] == [0] * 9
    assert points[TOKEN_REQUESTS] == [0] * 5
    assert points[COORDINATOR_ERRORS] == [0]
