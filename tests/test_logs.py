"""Logs a person can follow: one DEBUG line per flight, one INFO line per terminal failure,
never a token, and nothing a client can make happen at request rate."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_token_refresh import (
    MemorySessionStore,
    OAuth2Client,
    Refresher,
    TokenRefreshMiddleware,
    TokenSet,
)
from asgi_token_refresh._logs import Throttle
from asgi_token_refresh.testing import FakeClock, FakeIdP, Fault

from .helpers import ISSUER, login, waiting

pytestmark = pytest.mark.anyio
EXPIRED = 300.0
FLIGHT = re.compile(
    r"refresh flight landed: outcome=(?P<outcome>\w+) grant=(?P<grant>[0-9a-f]{12}|-) "
    r"grant_type=refresh_token waiters=(?P<waiters>\d+) duration=\d+\.\d{3}s provider=fake "
)


@pytest.fixture
def refresher(idp: FakeIdP, clock: FakeClock) -> Refresher:
    client = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=idp.transport(),
        clock=clock,
        name="fake",
    )
    return Refresher(client, jitter=0)


def _library(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("asgi_token_refresh.") and r.levelno >= level
    ]


def _flights(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    said = [FLIGHT.match(r.getMessage()) for r in _library(caplog, logging.DEBUG)]
    return [m for m in said if m is not None]


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise TimeoutError("condition never held")


async def _storm(
    refresher: Refresher, idp: FakeIdP, session: TokenSet, callers: int
) -> list[TokenSet | BaseException]:
    gate = idp.pause_token_endpoint()
    tasks = [asyncio.create_task(refresher.ensure_fresh(session)) for _ in range(callers)]
    await gate.arrived(1)
    await _until(lambda: waiting(refresher) == callers)  # all joined the one flight
    gate.release()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_each_flight_is_one_debug_line_with_outcome_waiters_duration_and_no_token(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asgi_token_refresh")
    session = login(idp, clock)
    clock.advance(EXPIRED)
    [newer, *_] = await _storm(refresher, idp, session, 10)
    assert isinstance(newer, TokenSet)
    clock.advance(EXPIRED)
    await refresher.ensure_fresh(newer)

    first, second = _flights(caplog)
    assert (first["outcome"], first["waiters"]) == ("success", "10")
    assert (second["outcome"], second["waiters"]) == ("success", "1")
    assert first["grant"] != second["grant"]  # each grant (refresh token) by its own hash
    assert "-" not in (first["grant"], second["grant"])
    assert idp.token_calls("refresh_token") == 2
    secrets = {"app-secret"} | set(idp._refresh) | set(idp._access)
    assert len(secrets) > 4
    assert not [s for s in secrets if s in caplog.text]
    assert not _library(caplog, logging.INFO)  # a refresh that works is not news


async def test_a_terminal_failure_is_one_info_line_however_many_requests_shared_it(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def login_route(request: Request) -> JSONResponse:
        await request.state.token.login(idp.issue("alice"))
        return JSONResponse({})

    async def token(request: Request) -> JSONResponse:
        return JSONResponse({"token": await request.state.token.get()})

    store = MemorySessionStore(clock=clock)
    app = Starlette(
        routes=[Route("/login", login_route), Route("/token", token)],
        middleware=[Middleware(TokenRefreshMiddleware, refresher=refresher, store=store)],
    )
    transport = httpx.ASGITransport(app=app)
    caplog.set_level(logging.DEBUG, logger="asgi_token_refresh")
    async with httpx.AsyncClient(transport=transport, base_url="https://app.test") as browser:
        await browser.get("/login")
        session = (await browser.get("/token")).json()["token"]
        clock.advance(EXPIRED)
        idp.script(Fault.invalid_grant())
        gate = idp.pause_token_endpoint()
        requests = [asyncio.create_task(browser.get("/token")) for _ in range(5)]
        await gate.arrived(1)
        await _until(lambda: waiting(refresher) == 5)  # all five joined the one flight
        gate.release()
        responses = await asyncio.gather(*requests)

    assert [r.status_code for r in responses] == [401] * 5
    [line] = _library(caplog, logging.INFO)
    assert line.levelno == logging.INFO
    assert line.name == "asgi_token_refresh._caches"
    said = line.getMessage()
    assert re.fullmatch(r"session [0-9a-f]{12} needs reauthentication: invalid_grant", said)
    [flight] = _flights(caplog)
    assert (flight["outcome"], flight["waiters"]) == ("invalid_grant", "5")
    secrets = {"app-secret", session} | set(idp._refresh) | set(idp._access)
    assert not [s for s in secrets if s in caplog.text]


def test_a_throttle_says_one_line_per_reason_a_minute_and_then_how_many_it_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    say = Throttle(logging.getLogger("asgi_token_refresh.test"), logging.INFO, clock=clock)
    caplog.set_level(logging.INFO, logger="asgi_token_refresh")
    for _ in range(1000):
        say("bad", "rejected %s", "x")
        say("worse", "rejected %s", "y")
        clock.advance(0.05)  # 50 s in all
    clock.advance(11)
    say("bad", "rejected %s", "x")
    assert [r.getMessage() for r in caplog.records] == [
        "rejected x (bad)",
        "rejected y (worse)",
        "rejected x (bad; 999 more since the last such line, not logged)",
    ]
