"""The demo: a real refresh storm over loopback, naive per-request refresh vs single-flight.

For each mode a strict FakeIdP (rotation on, a reused refresh token revokes the grant, short
access tokens, some latency) and a small Starlette app are served with uvicorn. Browsers — one
cookie jar per session, shared by its tabs — log in, then at every expiry boundary every tab
fires a burst of parallel API calls. Each call makes the app get a token and call the
provider's userinfo endpoint (the protected API) with it.

- naive: what teams ship first. Each request that finds the token due refreshes it itself and
  stores the result, last writer wins. It reports the same metrics the library does, so the
  dashboards show what the storm looks like.
- single-flight: ``TokenRefreshMiddleware`` and ``request.state.token.client()``.

``--serve`` keeps storming both until interrupted and exposes the metrics for Prometheus.
Needs the ``demo`` extra (uvicorn, starlette, the OpenTelemetry SDK and Prometheus exporter).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from ._cookies import parse_cookie_header
from ._errors import RefreshUnavailable, TokenEndpointError
from ._memory_store import MemorySessionStore
from ._oauth import OAuth2Client
from ._refresher import Refresher
from ._storm import side_by_side
from ._telemetry import (
    COMPONENT,
    DEDUPE,
    ERROR_TYPE,
    GRANT,
    OUTCOME,
    PROVIDER,
    Telemetry,
    default_telemetry,
)
from ._tokens import TokenSet
from .testing import FakeIdP, serve

if TYPE_CHECKING:
    from starlette.responses import JSONResponse

__all__ = ["DemoConfig", "DemoReport", "run_demo", "serve_demo"]

MODES = ("naive", "single-flight")


@dataclass(frozen=True)
class DemoConfig:
    sessions: int = 20
    tabs: int = 3
    parallel: int = 3  # concurrent requests per tab and burst
    rounds: int = 3  # expiry boundaries crossed
    token_lifetime: float = 4.0  # seconds
    # Seconds from login to the first burst (the login tokens expire then); None: token_lifetime.
    # Later bursts come every token_lifetime after it.
    first_burst: float | None = None
    latency: float = 0.02  # the provider's token-endpoint latency, seconds
    host: str = "127.0.0.1"


@dataclass
class DemoReport:
    mode: str
    requests: int = 0
    failures: int = 0  # responses other than 200: what users see
    provider_calls: int = 0
    invalid_grant: int = 0
    sessions_revoked: int = 0
    latencies: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the two apps ---------------------------------------------------------------------------


def _build_app(mode: str, idp: FakeIdP, client: OAuth2Client, telemetry: Telemetry) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from ._middleware import TokenRefreshMiddleware

    issuer = client.issuer or ""

    if mode == "single-flight":
        store = MemorySessionStore(secure=False)

        async def login(request: Request) -> Response:
            await request.state.token.login(idp.issue(request.query_params["user"]))
            return Response("ok")

        async def api(request: Request) -> Response:
            async with request.state.token.client(base_url=issuer) as http:
                answer = await http.get("/userinfo")
            return JSONResponse(answer.json(), status_code=answer.status_code)

        refresher = Refresher(client, jitter=0.2)
        middleware = [Middleware(TokenRefreshMiddleware, refresher=refresher, store=store)]
        return Starlette(routes=[Route("/login", login), Route("/api", api)], middleware=middleware)

    naive = _NaiveSessions(client, telemetry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await naive.http.aclose()

    async def naive_login(request: Request) -> Response:
        session_id = naive.login(idp.issue(request.query_params["user"]))
        response = Response("ok")
        response.set_cookie("sid", session_id, httponly=True)
        return response

    async def naive_api(request: Request) -> Response:
        return await naive.api(parse_cookie_header(request.headers.get("cookie", "")).get("sid"))

    routes = [Route("/login", naive_login), Route("/api", naive_api)]
    return Starlette(routes=routes, lifespan=lifespan)


class _NaiveSessions:
    """Hand-rolled refresh, no coordination: the pattern the field reports start from."""

    def __init__(self, client: OAuth2Client, telemetry: Telemetry) -> None:
        self.client = client
        self.telemetry = telemetry
        self.sessions: dict[str, TokenSet] = {}
        self.last_refresh: dict[str, float] = {}
        self.metric_attributes = {PROVIDER: client.name}
        self.http = httpx.AsyncClient(base_url=client.issuer or "")
        # Requests served with the stored token, reported as the library's fresh-path counter.
        self.fresh_hits = 0
        telemetry.observe_fresh(self)

    def login(self, body: dict[str, Any]) -> str:
        session_id = secrets.token_urlsafe(16)
        self.sessions[session_id] = TokenSet.from_token_response(
            body, issued_at=self.client.clock.time(), default_lifetime=60
        )
        return session_id

    async def api(self, session_id: str | None) -> JSONResponse:
        from starlette.responses import JSONResponse

        token_set = self.sessions.get(session_id or "")
        if session_id is None or token_set is None:
            return JSONResponse({"error": "no session"}, status_code=401)
        # the hand-rolled check: refresh a minute early (at most half the lifetime)
        if self.client.clock.time() >= token_set.expires_at - min(60.0, token_set.lifetime / 2):
            try:
                token_set = await self._refresh(session_id, token_set)
            except TokenEndpointError:
                return JSONResponse({"error": "reauthentication_required"}, status_code=401)
            except RefreshUnavailable:
                return JSONResponse({"error": "unavailable"}, status_code=503)
        else:
            self.fresh_hits += 1
        answer = await self.http.get(
            "/userinfo", headers={"Authorization": f"Bearer {token_set.access_token}"}
        )
        return JSONResponse(answer.json(), status_code=answer.status_code)

    async def _refresh(self, session_id: str, token_set: TokenSet) -> TokenSet:
        telemetry, attributes = self.telemetry, self.metric_attributes
        telemetry.token_requests.add(1, {DEDUPE: "leader", **attributes})
        now = time.monotonic()
        if session_id in self.last_refresh:
            telemetry.interval.record(now - self.last_refresh[session_id], attributes)
        self.last_refresh[session_id] = now
        started = time.perf_counter()
        outcome = "success"
        try:
            assert token_set.refresh_token is not None
            new = await self.client.refresh(token_set.refresh_token, previous=token_set)
        except TokenEndpointError as exc:
            outcome = "invalid_grant" if exc.error == "invalid_grant" else "provider_error"
            telemetry.terminal_failures.add(
                1, {ERROR_TYPE: outcome, COMPONENT: "asgi", **attributes}
            )
            raise
        except RefreshUnavailable as exc:
            outcome = exc.reason
            raise
        finally:
            telemetry.refreshes.add(1, {OUTCOME: outcome, GRANT: "refresh_token", **attributes})
            telemetry.duration.record(
                time.perf_counter() - started, {OUTCOME: outcome, **attributes}
            )
        self.sessions[session_id] = new  # last writer wins: may be an already-revoked grant
        return new


# -- the storm --------------------------------------------------------------------------------


@contextlib.contextmanager
def _stack(mode: str, config: DemoConfig, telemetry: Telemetry) -> Iterator[tuple[str, FakeIdP]]:
    idp = FakeIdP(issuer=None, access_token_lifetime=config.token_lifetime, latency=config.latency)
    with serve(idp, host=config.host) as idp_url:
        client = OAuth2Client(
            client_id="app",
            client_secret="app-secret",
            issuer=idp_url,
            token_endpoint=f"{idp_url}/token",
            name=mode,
            telemetry=telemetry,
        )
        try:
            with serve(_build_app(mode, idp, client, telemetry), host=config.host) as app_url:
                yield app_url, idp
        finally:
            idp.close()  # the client's pool closes with the app's loop


async def _storm(
    app_url: str, idp: FakeIdP, mode: str, config: DemoConfig, progress: _Progress | None
) -> DemoReport:
    report = DemoReport(mode=mode)
    limits = httpx.Limits(max_connections=config.tabs * config.parallel)
    browsers = [
        httpx.AsyncClient(base_url=app_url, limits=limits, timeout=30)
        for _ in range(config.sessions)
    ]
    first_burst = config.first_burst or config.token_lifetime
    try:
        idp.access_token_lifetime = first_burst  # the login tokens expire at the first burst
        try:
            for user, browser in enumerate(browsers):
                (await browser.get("/login", params={"user": f"user{user}"})).raise_for_status()
        finally:
            idp.access_token_lifetime = config.token_lifetime

        async def call(browser: httpx.AsyncClient) -> None:
            started = time.perf_counter()
            try:
                status = (await browser.get("/api")).status_code
            except httpx.HTTPError:
                status = 0
            report.latencies.append(time.perf_counter() - started)
            report.requests += 1
            report.failures += status != 200

        burst = config.tabs * config.parallel
        start = time.monotonic()
        for round_ in range(config.rounds):
            # Wake at every expiry boundary, when every session's access token has just expired.
            boundary = start + first_burst + round_ * config.token_lifetime
            await asyncio.sleep(max(0.0, boundary - time.monotonic()))
            await asyncio.gather(*(call(b) for b in browsers for _ in range(burst)))
            if progress is not None:
                progress.step(f"{mode} {round_ + 1}/{config.rounds}")
    finally:
        for browser in browsers:
            await browser.aclose()
    report.provider_calls = idp.token_calls("refresh_token")
    report.invalid_grant = idp.token_calls("refresh_token", "invalid_grant") + idp.token_calls(
        "refresh_token", "reuse_revoked"
    )
    report.sessions_revoked = idp.grants_revoked
    return report


class _Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def step(self, label: str) -> None:
        self.done += 1
        filled = round(30 * self.done / self.total)
        bar = "#" * filled + "." * (30 - filled)
        end = "\n" if self.done == self.total else ""
        print(f"\r[{bar}] {label:<24}", end=end, file=sys.stderr, flush=True)


def run_demo(config: DemoConfig, telemetry: Telemetry | None = None) -> list[DemoReport]:
    """Run the storm once per mode; returns the naive and the single-flight report."""
    telemetry = telemetry or default_telemetry()
    progress = _Progress(config.rounds * len(MODES))
    reports = []
    for mode in MODES:
        with _stack(mode, config, telemetry) as (app_url, idp):
            reports.append(asyncio.run(_storm(app_url, idp, mode, config, progress)))
    return reports


def serve_demo(config: DemoConfig, metrics_port: int, duration: float | None) -> None:
    """Storm both modes side by side until interrupted (or for ``duration`` seconds) and
    expose the metrics at ``http://host:metrics_port/metrics``."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    metrics_server, _ = start_http_server(metrics_port, addr=config.host)
    telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[PrometheusMetricReader()]))
    print(f"metrics at http://{config.host}:{metrics_port}/metrics", file=sys.stderr, flush=True)
    deadline = time.monotonic() + duration if duration is not None else None
    try:
        with (
            _stack("naive", config, telemetry) as naive,
            _stack("single-flight", config, telemetry) as single,
        ):
            print(f"naive app {naive[0]}, single-flight app {single[0]}", file=sys.stderr)

            async def forever() -> None:
                while deadline is None or time.monotonic() < deadline:
                    await asyncio.gather(
                        _storm(*naive, "naive", config, None),
                        _storm(*single, "single-flight", config, None),
                    )

            asyncio.run(forever())
    except KeyboardInterrupt:
        pass
    finally:
        metrics_server.shutdown()


def format_reports(reports: list[DemoReport]) -> str:
    rows: list[tuple[str, list[str]]] = [
        ("requests", [f"{r.requests:,}" for r in reports]),
        ("provider token calls", [f"{r.provider_calls:,}" for r in reports]),
        ("invalid_grant answers", [f"{r.invalid_grant:,}" for r in reports]),
        ("sessions revoked", [f"{r.sessions_revoked:,}" for r in reports]),
        ("user-visible failures", [f"{r.failures:,}" for r in reports]),
        ("latency p50", [f"{r.percentile(0.5) * 1000:.1f} ms" for r in reports]),
        ("latency p99", [f"{r.percentile(0.99) * 1000:.1f} ms" for r in reports]),
    ]
    return side_by_side([r.mode for r in reports], rows)
