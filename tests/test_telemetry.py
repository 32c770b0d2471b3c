"""Spans and metric points for every refresh, dedupe hit and terminal failure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

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
)
from asgi_token_refresh._telemetry import (
    OUTCOME,
    PROVIDER,
    REFRESH_ACTIVE,
    REFRESH_DURATION,
    REFRESH_INTERVAL,
    REFRESH_WAITERS,
    REFRESHES,
    SERVER_ADDRESS,
    SERVER_PORT,
    SPAN_ACQUIRE,
    SPAN_REFRESH,
    TERMINAL_FAILURES,
    TOKEN_FRESH,
    TOKEN_REQUESTS,
    server_attributes,
)
from asgi_token_refresh.testing import (
    CapturedTelemetry,
    FakeClock,
    FakeIdP,
    Fault,
    capture_telemetry,
)

from .helpers import ISSUER, login, waiting

pytestmark = pytest.mark.anyio
EXPIRED = 300.0


@pytest.fixture
def captured() -> Iterator[CapturedTelemetry]:
    capture = capture_telemetry()
    yield capture
    capture.shutdown()


@pytest.fixture
def traced_client(idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry) -> OAuth2Client:
    return OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        userinfo_endpoint=f"{ISSUER}/userinfo",
        transport=idp.transport(),
        clock=clock,
        name="fake",
        telemetry=captured.telemetry,
    )


@pytest.fixture
def refresher(traced_client: OAuth2Client) -> Refresher:
    return Refresher(traced_client, jitter=0)


async def test_a_100_caller_storm_is_one_refresh_one_leader_and_99_linked_joiners(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    gate = idp.pause_token_endpoint()
    callers = [asyncio.create_task(refresher.ensure_fresh(session)) for _ in range(100)]
    await gate.arrived(1)
    await _until(lambda: waiting(refresher) == 100)  # nobody comes late to the grace cache
    gate.release()
    await asyncio.gather(*callers)

    assert captured.value(REFRESHES, outcome="success", grant="refresh_token", provider="fake") == 1
    assert captured.value(TOKEN_REQUESTS, dedupe="leader") == 1
    assert captured.value(TOKEN_REQUESTS, dedupe="joined") == 99
    [flight] = captured.spans(SPAN_REFRESH)
    assert flight.attributes["asgi_token_refresh.outcome"] == "success"
    assert flight.attributes["asgi_token_refresh.rotated"] is True
    assert flight.attributes["asgi_token_refresh.waiters"] == 100
    caller_spans = captured.spans(SPAN_ACQUIRE)
    assert len(caller_spans) == 100
    leader = [s for s in caller_spans if s.attributes["asgi_token_refresh.dedupe"] == "leader"]
    joiners = [s for s in caller_spans if s.attributes["asgi_token_refresh.dedupe"] == "joined"]
    assert len(leader) == 1
    assert flight.parent.span_id == leader[0].context.span_id
    assert len(joiners) == 99
    assert all(
        [link.context.span_id for link in s.links] == [flight.context.span_id] for s in joiners
    )
    # the token-endpoint POST is an httpx client span inside the flight
    posts = [
        s
        for s in captured.spans()
        if s.parent is not None and s.parent.span_id == flight.context.span_id
    ]
    assert [
        s.attributes.get("http.request.method", s.attributes.get("http.method")) for s in posts
    ] == ["POST"]

    [(labels, waiters)] = captured.points(REFRESH_WAITERS)
    assert (waiters.count, waiters.sum) == (1, 100)
    [(labels, duration)] = captured.points(REFRESH_DURATION)
    assert labels == {OUTCOME: "success", PROVIDER: "fake"}
    assert duration.count == 1
    assert [p.value for _, p in captured.points(REFRESH_ACTIVE)] == [0]


async def test_stragglers_count_as_grace_cache_hits(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    await refresher.ensure_fresh(session)
    await asyncio.gather(*(refresher.ensure_fresh(session) for _ in range(7)))
    assert captured.value(TOKEN_REQUESTS, dedupe="grace_cache") == 7
    assert captured.value(REFRESHES) == 1


async def test_a_re_refresh_inside_seconds_shows_as_a_short_interval(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    first = await refresher.ensure_fresh(session)
    clock.advance(3)
    await refresher.renew(first)  # say, an API rejected the fresh token at once
    [(_, interval)] = captured.points(REFRESH_INTERVAL)
    assert interval.count == 1
    assert interval.sum == pytest.approx(3.0)


async def test_the_fresh_path_records_no_span_and_only_the_plain_counter(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    session = login(idp, clock)
    for _ in range(25):
        assert await refresher.ensure_fresh(session) is session
    assert captured.spans() == []
    # (the series start at zero when the refresher is made: only the plain counter moves)
    assert [p.value for _, p in captured.points(TOKEN_REQUESTS)] == [0] * 5
    assert captured.value(TOKEN_FRESH, provider="fake") == 25


async def test_invalid_grant_is_one_refresh_and_a_terminal_failure_per_caller_surfaced(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    app = _app(refresher, idp)
    async with _browser(app) as browser:
        await browser.get("/login")
        clock.advance(EXPIRED)
        idp.script(Fault.invalid_grant())
        gate = idp.pause_token_endpoint()
        requests = [asyncio.create_task(browser.get("/token")) for _ in range(5)]
        await gate.arrived(1)
        await _until(lambda: waiting(refresher) == 5)  # all five joined the one flight
        gate.release()
        responses = await asyncio.gather(*requests)
    assert [r.status_code for r in responses] == [401] * 5
    assert captured.value(REFRESHES, outcome="invalid_grant") == 1
    assert captured.value(TERMINAL_FAILURES, error_type="invalid_grant", component="asgi") == 5
    [flight] = captured.spans(SPAN_REFRESH)
    assert flight.attributes["error.type"] == "invalid_grant"
    assert flight.status.status_code.name == "ERROR"


async def test_downstream_401_then_success_is_one_refresh_and_one_retry_with_the_new_token(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    first_round = asyncio.Barrier(50)
    seen: list[str] = []

    async def api(scope: Any, receive: Any, send: Any) -> None:
        """The provider's userinfo as the API; the first 50 calls are held until all arrived."""
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode()
        seen.append(authorization)
        if len(seen) <= 50:
            await first_round.wait()
        await idp(scope, receive, send)

    app = _app(refresher, idp, api=api)
    async with _browser(app) as browser:
        await browser.get("/login")
        stale = (await browser.get("/token")).json()["token"]
        await _revoke_access_token(idp, stale)  # the API now rejects it although not expired
        responses = await asyncio.gather(*(browser.get("/me") for _ in range(50)))
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["sub"] for r in responses} == {"alice"}
    assert idp.token_calls("refresh_token") == 1  # 50 concurrent downstream 401s, one refresh
    assert captured.value(REFRESHES) == 1
    assert seen[:50] == [f"Bearer {stale}"] * 50
    assert len(seen) == 100  # each request: one 401, then one retry with the new token
    assert len(set(seen[50:])) == 1
    assert stale not in seen[50]
    assert captured.value(TERMINAL_FAILURES) == 0


async def test_401_after_the_retry_is_a_terminal_downstream_failure(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    app = _app(refresher, idp, api=_always_401)
    async with _browser(app) as browser:
        await browser.get("/login")
        response = await browser.get("/me")
    assert response.status_code == 401
    assert response.json()["reason"] == "downstream_401"
    assert captured.value(TERMINAL_FAILURES, error_type="downstream_401", component="httpx") == 1
    assert idp.token_calls("refresh_token") == 1


async def test_no_token_or_secret_in_any_span_attribute_event_or_metric_label(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    app = _app(refresher, idp)
    secrets: set[str] = {"app-secret"}
    async with _browser(app) as browser:
        await browser.get("/login")
        for round_ in range(3):
            clock.advance(EXPIRED)
            responses = await asyncio.gather(*(browser.get("/token") for _ in range(10)))
            secrets |= {r.json()["token"] for r in responses}
            if round_ == 1:
                await _revoke_access_token(idp, responses[0].json()["token"])
                await browser.get("/me")
        idp.script(Fault.invalid_grant())
        clock.advance(EXPIRED)
        await browser.get("/token")
    secrets |= set(idp._refresh)  # every refresh and access token the provider ever issued
    secrets |= set(idp._access)
    rendered: list[str] = []
    for span in captured.spans():
        rendered += [span.name, repr(dict(span.attributes or {}))]
        rendered += [repr(dict(e.attributes or {})) + e.name for e in span.events]
        rendered += [repr(dict(link.attributes or {})) for link in span.links]
    for metric in (REFRESHES, TOKEN_REQUESTS, TERMINAL_FAILURES, REFRESH_DURATION, REFRESH_WAITERS):
        rendered += [repr(labels) for labels, _ in captured.points(metric)]
    text = "\n".join(rendered)
    assert len(captured.spans()) > 10
    assert len(secrets) > 10
    assert not [s for s in secrets if s and s in text]


@pytest.fixture
def stable_http_semconv(monkeypatch: pytest.MonkeyPatch) -> None:
    """What an app gets with ``OTEL_SEMCONV_STABILITY_OPT_IN=http`` in its environment. The
    instrumentation reads the variable once per process; the test makes it read it again,
    and monkeypatch puts the process's reading back afterwards."""
    semconv = pytest.importorskip("opentelemetry.instrumentation._semconv")
    stability = semconv._OpenTelemetrySemanticConventionStability
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    monkeypatch.setattr(stability, "_initialized", False)
    monkeypatch.setattr(stability, "_OTEL_SEMCONV_STABILITY_SIGNAL_MAPPING", {})


@pytest.mark.usefixtures("stable_http_semconv")
async def test_the_flight_span_names_the_token_endpoint_host_and_its_post_uses_stable_http_names(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    await refresher.ensure_fresh(session)
    [flight] = captured.spans(SPAN_REFRESH)
    assert flight.attributes[SERVER_ADDRESS] == "idp.test"
    assert SERVER_PORT not in flight.attributes  # https on 443: the default is left out
    [acquire] = captured.spans(SPAN_ACQUIRE)
    assert SERVER_ADDRESS not in acquire.attributes  # a wait, not a call (may be a cache hit)
    flight_id = flight.context.span_id
    [post] = [s for s in captured.spans() if s.parent and s.parent.span_id == flight_id]
    assert post.kind.name == "CLIENT"
    attributes = dict(post.attributes or {})
    assert attributes["http.request.method"] == "POST"
    assert attributes["url.full"] == f"{ISSUER}/token"
    assert attributes["server.address"] == "idp.test"  # no server.port on 443 there either
    assert attributes["http.response.status_code"] == 200
    old = {"http.method", "http.url", "http.status_code", "http.host", "net.peer.name"}
    assert not old & set(attributes)


async def test_a_discovered_token_endpoint_is_named_from_the_first_flight_on(
    idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    client = OAuth2Client.from_discovery(
        ISSUER,
        client_id="app",
        client_secret="app-secret",
        transport=idp.transport(),
        clock=clock,
        telemetry=captured.telemetry,
    )
    assert client.server_attributes() == {}  # not discovered yet
    refresher = Refresher(client, jitter=0)
    session = login(idp, clock)
    for _ in range(2):
        clock.advance(EXPIRED)
        session = await refresher.ensure_fresh(session)
    flights = captured.spans(SPAN_REFRESH)
    assert [f.attributes[SERVER_ADDRESS] for f in flights] == ["idp.test", "idp.test"]


@pytest.mark.parametrize(
    ("url", "attributes"),
    [
        ("https://idp.test/token", {SERVER_ADDRESS: "idp.test"}),
        ("http://idp.test:80/token", {SERVER_ADDRESS: "idp.test"}),
        (
            "https://app:s3cret@Login.Example.COM:8443/t/realm/token?tenant=x#f",
            {SERVER_ADDRESS: "login.example.com", SERVER_PORT: 8443},
        ),
        ("http://[::1]:8080/token", {SERVER_ADDRESS: "::1", SERVER_PORT: 8080}),
    ],
)
def test_server_address_is_the_host_only_and_the_port_only_when_not_the_default(
    url: str, attributes: dict[str, object]
) -> None:
    assert server_attributes(url) == attributes


# -- helpers ------------------------------------------------------------------------------------


def _browser(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://app.test")


async def _until(condition: Any) -> None:
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise TimeoutError("condition never held")


async def _revoke_access_token(idp: FakeIdP, token: str) -> None:
    async with httpx.AsyncClient(transport=idp.transport(), base_url=ISSUER) as http:
        response = await http.post(
            "/revoke",
            data={"token": token, "token_type_hint": "access_token"},
            auth=("app", "app-secret"),
        )
    response.raise_for_status()


async def _always_401(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 401, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _app(refresher: Refresher, idp: FakeIdP, api: Any = None) -> Starlette:
    """/login (as alice), /token, and /me: the provider's userinfo (or ``api``) as the API."""
    api_transport = httpx.ASGITransport(app=api or idp)

    async def login_route(request: Request) -> JSONResponse:
        await request.state.token.login(idp.issue("alice"))
        return JSONResponse({})

    async def token(request: Request) -> JSONResponse:
        return JSONResponse({"token": await request.state.token.get()})

    async def me(request: Request) -> JSONResponse:
        async with request.state.token.client(
            base_url=ISSUER, transport=api_transport
        ) as api_client:
            response = await api_client.get("/userinfo")
        return JSONResponse(response.json(), status_code=response.status_code)

    return Starlette(
        routes=[Route("/login", login_route), Route("/token", token), Route("/me", me)],
        middleware=[
            Middleware(TokenRefreshMiddleware, refresher=refresher, store=MemorySessionStore())
        ],
    )


async def test_the_token_endpoint_calls_http_metrics_go_to_the_clients_own_meter_provider(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry
) -> None:
    """opentelemetry-instrumentation-httpx records a duration histogram per request: with
    ``Telemetry(meter_provider=...)`` it goes there, like our own metrics, not to the global
    provider."""
    session = login(idp, clock)
    clock.advance(EXPIRED)
    await refresher.ensure_fresh(session)
    data = captured.reader.get_metrics_data()
    assert data is not None
    names = {
        metric.name
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    assert names & {"http.client.duration", "http.client.request.duration"}, names
