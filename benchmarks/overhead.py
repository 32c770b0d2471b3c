"""What TokenRefreshMiddleware costs an app per request, and what telemetry costs per refresh.

Run from the repository root::

    python benchmarks/overhead.py                  # full sizes (~1.5 min on 2 cores), markdown
    python benchmarks/overhead.py --quick          # small sizes: a smoke run of every measurement
    python benchmarks/overhead.py --harness httpx  # part 1 in one harness only (default: both)
    python benchmarks/overhead.py --write          # also write its section in RESULTS.md

Part 1 serves the same requests with six apps (A: bare; B: + the middleware; C: + a fresh
``token.get()``; D: C with the OpenTelemetry SDK; E: a do-nothing BaseHTTPMiddleware; F: a
pure-ASGI middleware that only wraps ``send``) called directly or through httpx's ASGITransport;
part 2 times refresh flights with and without the SDK. What each measures, and how:
benchmarks/README.md. Correctness is checked, never timing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import common  # this directory is on sys.path when a benchmark runs
import httpx
from common import EXPIRED, ISSUER, Series, check, row, table, verdict
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_token_refresh import (
    MemorySessionStore,
    OAuth2Client,
    Refresher,
    TokenRefreshMiddleware,
    TokenSet,
)
from asgi_token_refresh._telemetry import REFRESHES, TOKEN_FRESH
from asgi_token_refresh.testing import CapturedTelemetry, FakeClock, FakeIdP, capture_telemetry

BODY = b"hello world"


@dataclass(frozen=True)
class Sizes:
    requests: int
    httpx_requests: int
    rounds: int
    flights: int
    flight_rounds: int


SIZES = {
    "requests": "part 1, direct harness: requests per app per round",
    "httpx_requests": "part 1, httpx harness: requests per app per round",
    "rounds": "part 1: rounds",
    "flights": "part 2: flights per setting per round",
    "flight_rounds": "part 2: rounds",
}
FULL = Sizes(requests=5_000, httpx_requests=1_000, rounds=21, flights=500, flight_rounds=11)
QUICK = Sizes(requests=200, httpx_requests=50, rounds=2, flights=20, flight_rounds=1)
HARNESSES = ("direct", "httpx")


# -- 1. the app stack -----------------------------------------------------------------------------


class Channel:
    """One request's ``receive`` and ``send``: the body once, then a disconnect; the response
    start and body are kept. The same in every app, so its cost cancels out of the ratios."""

    __slots__ = ("body", "headers", "received", "status")

    def __init__(self) -> None:
        self.received = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    async def receive(self) -> Message:
        if self.received:
            return {"type": "http.disconnect"}
        self.received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = message.get("headers", [])
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


def http_scope(path: str, cookie: bytes | None) -> dict[str, Any]:
    """A GET scope as uvicorn builds it (ASGI spec 2.4); copied per request, as the app mutates
    it (``app``, ``router``, ``endpoint``, ``state``...)."""
    headers = [(b"host", b"app.test"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
    if cookie is not None:
        headers.append((b"cookie", cookie))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def serve_once(app: ASGIApp, template: dict[str, Any]) -> Channel:
    channel = Channel()
    await app(dict(template), channel.receive, channel.send)
    return channel


Served = tuple[int, int, bytes]  # status, Set-Cookie headers, body


class DirectDriver:
    """Calls the app as an ASGI callable: a copy of the scope and a new ``Channel`` each time."""

    def __init__(self, app: ASGIApp, template: dict[str, Any]) -> None:
        self.app = app
        self.template = template

    async def once(self) -> Served:
        channel = await serve_once(self.app, self.template)
        cookies = sum(1 for k, _ in channel.headers if k == b"set-cookie")
        return channel.status, cookies, channel.body

    async def time(self, n: int) -> float:
        """ns per request, serving ``n`` requests one after another."""
        app, template = self.app, self.template
        start = time.perf_counter_ns()
        for _ in range(n):
            channel = Channel()
            await app(dict(template), channel.receive, channel.send)
        elapsed = time.perf_counter_ns() - start
        check(channel.status == 200 and channel.body == BODY, f"bad response {channel.status}")
        return elapsed / n

    async def aclose(self) -> None:
        pass


class HttpxDriver:
    """Sends ``GET /`` through one ``httpx.AsyncClient`` over ``httpx.ASGITransport``, with the
    same headers as the direct harness's scope (the session cookie among them)."""

    def __init__(self, app: ASGIApp, template: dict[str, Any]) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in template["headers"]}
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=template["client"]),
            base_url=f"http://{headers.pop('host')}",
            headers=headers,
        )

    async def once(self) -> Served:
        response = await self.client.get("/")
        cookies = len(response.headers.get_list("set-cookie"))
        check(not self.client.cookies, "the client's cookie jar must stay empty")
        return response.status_code, cookies, response.content

    async def time(self, n: int) -> float:
        """ns per request, sending ``n`` requests one after another."""
        get = self.client.get
        start = time.perf_counter_ns()
        for _ in range(n):
            response = await get("/")
        elapsed = time.perf_counter_ns() - start
        check(
            response.status_code == 200 and response.content == BODY,
            f"bad response {response.status_code}",
        )
        return elapsed / n

    async def aclose(self) -> None:
        await self.client.aclose()


Driver = DirectDriver | HttpxDriver


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello world")


async def hello_with_token(request: Request) -> Response:
    await request.state.token.get()
    return PlainTextResponse("hello world")


class DoNothing(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


class WrapSend:
    """The least a pure-ASGI middleware that edits responses does: wrap ``send``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped(message: Message) -> None:
            await send(message)

        await self.app(scope, receive, wrapped)


def starlette_app(
    endpoint: Callable[[Request], Any], *middleware: Middleware, path: str = "/"
) -> Starlette:
    return Starlette(routes=[Route(path, endpoint)], middleware=list(middleware))


@dataclass
class Variant:
    key: str
    label: str
    app: ASGIApp
    target: float | None = None  # least throughput, as a fraction of A's
    refresher: Refresher | None = None  # counts one fresh-path hit per request
    ns: Series = field(default_factory=Series)
    ratio: Series = field(default_factory=Series)  # throughput / A's, per round
    added_ns: Series = field(default_factory=Series)  # time per request minus A's, per round


@dataclass
class StackResults:
    harness: str
    requests: int  # per app per round
    variants: dict[str, Variant]


B_TARGET = 0.95
C_TARGET = 0.90
D_TARGET = 0.90


class Apps:
    """The six apps, and the session (from a login through the middleware) C and D use."""

    def __init__(self) -> None:
        # Tokens come from a FakeIdP with a one-hour lifetime, on the real clock (as in
        # production: FakeClock takes a lock on every reading), so they stay fresh for the run.
        # Any refresh would reach this FakeIdP, and the run checks that none does.
        self.idp = FakeIdP(issuer=ISSUER, access_token_lifetime=3600.0)
        self.store = MemorySessionStore()
        self.client = self._client(None)
        self.refresher = Refresher(self.client, jitter=0)
        self.captured: CapturedTelemetry = capture_telemetry()
        self.sdk_client = self._client(self.captured)
        self.sdk_refresher = Refresher(self.sdk_client, jitter=0)

        def with_token(refresher: Refresher) -> Middleware:
            return Middleware(TokenRefreshMiddleware, refresher=refresher, store=self.store)

        self.variants = {
            "A": Variant("A", "bare Starlette app", starlette_app(hello)),
            "B": Variant(
                "B",
                "\\+ TokenRefreshMiddleware, route never touches the token",
                starlette_app(hello, with_token(self.refresher)),
                B_TARGET,
            ),
            "C": Variant(
                "C",
                "\\+ TokenRefreshMiddleware, route awaits `request.state.token.get()` (fresh)",
                starlette_app(hello_with_token, with_token(self.refresher)),
                C_TARGET,
                self.refresher,
            ),
            "D": Variant(
                "D",
                "C with OpenTelemetry SDK MeterProvider + TracerProvider",
                starlette_app(hello_with_token, with_token(self.sdk_refresher)),
                D_TARGET,
                self.sdk_refresher,
            ),
            "E": Variant(
                "E",
                "bare app + a BaseHTTPMiddleware that does nothing (for comparison)",
                starlette_app(hello, Middleware(DoNothing)),
            ),
            "F": Variant(
                "F",
                "bare app + a pure-ASGI middleware that only wraps `send` (B's floor, for "
                "comparison)",
                starlette_app(hello, Middleware(WrapSend)),
            ),
        }

    def _client(self, captured: CapturedTelemetry | None) -> OAuth2Client:
        telemetry = captured.telemetry if captured is not None else None
        return common.client(self.idp.transport(), telemetry=telemetry)

    async def login(self) -> bytes:
        """Log in through the middleware, as an app's login route does; the Cookie header
        value the browser sends back."""

        async def login(request: Request) -> Response:
            await request.state.token.login(self.idp.issue("alice"))
            return PlainTextResponse("welcome")

        app = starlette_app(
            login,
            Middleware(TokenRefreshMiddleware, refresher=self.refresher, store=self.store),
            path="/login",
        )
        channel = await serve_once(app, http_scope("/login", None))
        set_cookies = [v.decode("latin-1") for k, v in channel.headers if k == b"set-cookie"]
        check(channel.status == 200 and len(set_cookies) == 1, "login must set one cookie")
        check(len(self.store) == 1, "login must store one session")
        return set_cookies[0].split(";", 1)[0].encode("latin-1")

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.sdk_client.aclose()
        self.captured.shutdown()
        self.idp.close()


def metrics_with_points(captured: CapturedTelemetry) -> list[str]:
    """Metrics that recorded something: the zeros every series starts at do not count."""
    data = captured.reader.get_metrics_data()
    names = set()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            names |= {
                m.name
                for m in scope.metrics
                if any(getattr(p, "value", getattr(p, "count", 1)) for p in m.data.data_points)
            }
    return sorted(names)


async def bench_stack(sizes: Sizes, harness: str) -> StackResults:
    """Part 1 in one harness, with apps (and a session store, and SDK providers) of its own."""
    apps = Apps()
    cookie = await apps.login()
    template = http_scope("/", cookie)
    variants = apps.variants
    make = DirectDriver if harness == "direct" else HttpxDriver
    drivers: dict[str, Driver] = {k: make(v.app, template) for k, v in variants.items()}
    requests = sizes.requests if harness == "direct" else sizes.httpx_requests

    # Every app answers; C and D read the token on the fresh path and count it.
    for variant in variants.values():
        hits = variant.refresher.fresh_hits if variant.refresher is not None else 0
        status, set_cookies, body = await drivers[variant.key].once()
        check(status == 200 and body == BODY, f"{variant.key}: bad response")
        check(set_cookies == 0, f"{variant.key}: a fresh session must not be written back")
        if variant.refresher is not None:
            check(variant.refresher.fresh_hits == hits + 1, f"{variant.key}: not a fresh hit")
    for key in variants:  # warm up: the middleware stack, caches, specialisation
        await drivers[key].time(min(requests, 2_000))

    counted = {k: v.refresher.fresh_hits for k, v in variants.items() if v.refresher is not None}
    names = list(variants)
    for round_ in range(sizes.rounds):
        for name in common.rotated(names, round_):
            gc.collect()  # each app starts from the same heap; the GC stays on while it runs
            variants[name].ns.values.append(await drivers[name].time(requests))
    bare = variants["A"].ns
    for variant in variants.values():
        variant.ratio = common.pairwise(bare, variant.ns, operator.truediv)
        variant.added_ns = common.pairwise(variant.ns, bare, operator.sub)

    served = sizes.rounds * requests
    for key, before in counted.items():
        refresher = variants[key].refresher
        assert refresher is not None
        check(
            refresher.fresh_hits - before == served,
            f"{key}: {refresher.fresh_hits - before} fresh-path hits for {served} requests",
        )
    check(apps.idp.token_calls() == 0, "a fresh token must never reach the provider")
    spans = len(apps.captured.spans())
    check(spans == 0, f"D: the fresh path must record no span ({spans} recorded)")
    fresh = apps.captured.value(TOKEN_FRESH)
    check(
        fresh == apps.sdk_refresher.fresh_hits,
        f"D: the fresh-path counter reads {fresh}, not {apps.sdk_refresher.fresh_hits}",
    )
    recorded = metrics_with_points(apps.captured)
    check(recorded == [TOKEN_FRESH], f"D: the fresh path recorded SDK metrics {recorded}")
    for driver in drivers.values():
        await driver.aclose()
    await apps.aclose()
    return StackResults(harness, requests, variants)


# -- 2. telemetry per refresh flight -----------------------------------------------------------


@dataclass
class FlightResults:
    flights: int
    noop_us: Series
    sdk_us: Series
    diff_us: Series  # SDK minus no-op, per round
    spans_per_flight: dict[str, float]  # SDK: finished spans by name, per flight


async def flight_round(n: int, captured: CapturedTelemetry | None) -> float:
    """µs per flight for ``n`` sequential refreshes, each of its own expiring session."""
    clock = FakeClock()
    idp = FakeIdP(issuer=ISSUER, clock=clock)
    telemetry = captured.telemetry if captured is not None else None
    client = common.client(idp.transport(), clock, telemetry=telemetry)
    refresher = Refresher(client, jitter=0)
    sessions = [common.login(idp, clock, f"user{i}") for i in range(n + 1)]
    clock.advance(EXPIRED)
    # The first flight opens the HTTP client and the semaphore on the I/O loop: not timed.
    await refresher.ensure_fresh(sessions[0])
    results: list[TokenSet] = []
    gc.collect()
    start = time.perf_counter_ns()
    for session in sessions[1:]:
        results.append(await refresher.ensure_fresh(session))
    elapsed = time.perf_counter_ns() - start
    calls = idp.token_calls("refresh_token")
    check(calls == n + 1, f"{n + 1} expiring sessions made {calls} provider calls")
    check(
        all(r.refresh_token != s.refresh_token for r, s in zip(results, sessions[1:], strict=True)),
        "every session must be refreshed",
    )
    await client.aclose()
    idp.close()
    return elapsed / n / 1000


async def bench_flights(sizes: Sizes) -> FlightResults:
    captured = capture_telemetry()  # one set of SDK providers for all rounds, as in production
    out = FlightResults(sizes.flights, Series(), Series(), Series(), {})
    await flight_round(min(sizes.flights, 50), None)  # warm up: imports, the I/O loop
    await flight_round(min(sizes.flights, 50), captured)
    captured.exporter.clear()
    spans: dict[str, int] = {}
    for round_ in range(sizes.flight_rounds):
        for telemetry in common.rotated([None, captured], round_):
            us = await flight_round(sizes.flights, telemetry)
            (out.noop_us if telemetry is None else out.sdk_us).values.append(us)
        for span in captured.spans():
            spans[span.name] = spans.get(span.name, 0) + 1
        captured.exporter.clear()
    flights = sizes.flight_rounds * (sizes.flights + 1)  # + the untimed first flight of each
    out.spans_per_flight = {name: count / flights for name, count in sorted(spans.items())}
    refreshes, warmup = captured.value(REFRESHES), min(sizes.flights, 50) + 1
    check(
        refreshes == flights + warmup,
        f"SDK: the refreshes counter reads {refreshes}, not {flights + warmup}",
    )
    out.diff_us = common.pairwise(out.sdk_us, out.noop_us, operator.sub)
    captured.shutdown()
    return out


# -- report ---------------------------------------------------------------------------------------


def us(ns: float) -> str:
    return f"{ns / 1000:.2f} µs"


def ratio(x: float) -> str:
    return f"{x:.3f}x"


def flight_us(x: float) -> str:
    return f"{x:.1f} µs"


INTRO = {
    "direct": "Harness `direct`: the app called as an ASGI callable, a new scope and a minimal "
    "`receive`/`send` per request (no httpx).",
    "httpx": "Harness `httpx`: `GET /` through `httpx.AsyncClient(transport="
    "httpx.ASGITransport(app=...))`, one client per app (as async test clients send requests "
    "in-process).",
}


@dataclass
class Report:
    run: common.Run
    sizes: Sizes
    stacks: list[StackResults]
    flights: FlightResults

    def stack_table(self, stack: StackResults) -> list[str]:
        lines = table(
            "", "app", "per request (median)", "range over rounds", "requests/s",
            "added per request vs A", "throughput vs A", "range over rounds", "target", "",
        )  # fmt: skip
        for v in stack.variants.values():
            target, ok, added, versus, spread = "", "", "", "1 (the reference)", ""
            if v.target is not None:
                target, ok = f"≥ {v.target:.2f}x", verdict(v.ratio.median >= v.target)
            if v.key != "A":
                added, (versus, spread) = us(v.added_ns.median), v.ratio.cells(ratio)
            per_second = f"{1e9 / v.ns.median:,.0f}"
            cells = (*v.ns.cells(us), per_second, added, versus, spread, target, ok)
            lines.append(row(v.key, v.label, *cells))
        return lines

    def markdown(self) -> str:
        z, f = self.sizes, self.flights
        environment = self.run.environment(
            ["starlette", "httpx", "opentelemetry-api", "opentelemetry-sdk"],
            "part 1, "
            + ", ".join(f"{s.requests:,} requests per app ({s.harness})" for s in self.stacks)
            + f" x {z.rounds} rounds; part 2, {z.flights:,} flights per setting x "
            f"{z.flight_rounds} rounds",
        )
        lines = [
            *environment,
            "",
            "Part 1: requests served in-process by each app, one after another (GC on, a "
            "`gc.collect()` before each app's share of a round). Medians over rounds; throughput "
            "vs A and the added time are taken within each round, A's time per request over the "
            "app's. The targets are evaluated on the throughput ratio in each harness; that ratio "
            "depends on what the harness itself costs per request (A's time), while the µs added "
            "per request is the middleware's own cost, the figure to compare across harnesses.",
            "",
        ]
        for stack in self.stacks:
            lines += [INTRO[stack.harness], "", *self.stack_table(stack), ""]
        spans = ", ".join(f"{name} {n:g}" for name, n in f.spans_per_flight.items())
        lines += [
            f"Part 2: {f.flights:,} sequential refresh flights per round, each of a new expiring "
            "session (FakeIdP in-process, FakeClock).",
            "",
            *table("telemetry", "per flight (median)", "range over rounds"),
            row("no-op (OpenTelemetry API only, no SDK)", *f.noop_us.cells(flight_us)),
            row(
                "SDK MeterProvider + TracerProvider (in-memory exporters)",
                *f.sdk_us.cells(flight_us),
            ),
            row("difference, SDK minus no-op (per round)", *f.diff_us.cells(flight_us)),
            row(
                "spans per flight with the SDK",
                f"{sum(f.spans_per_flight.values()):g} ({spans})",
                "",
            ),
        ]
        return "\n".join(lines) + "\n"

    def missed(self) -> bool:
        return any(
            v.target is not None and v.ratio.median < v.target
            for stack in self.stacks
            for v in stack.variants.values()
        )


# -- main -----------------------------------------------------------------------------------------


async def run(sizes: Sizes, harnesses: Sequence[str]) -> tuple[list[StackResults], FlightResults]:
    stacks = [await bench_stack(sizes, harness) for harness in harnesses]
    flights = await bench_flights(sizes)
    return stacks, flights


def main(argv: Sequence[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--harness",
            choices=[*HARNESSES, "both"],
            default="both",
            help="part 1: call the apps directly, through httpx's ASGITransport, or both (default)",
        )
        parser.add_argument(
            "--fail-on-miss", action="store_true", help="exit 1 if a throughput target is missed"
        )

    run_ = common.parse(
        "overhead.py",
        "Benchmark the middleware's per-request overhead and telemetry's per-flight cost.",
        argv,
        SIZES,
        add_arguments,
    )
    sizes = common.sizes(run_.args, FULL, QUICK)
    harnesses = HARNESSES if run_.args.harness == "both" else (run_.args.harness,)
    stacks, flights = asyncio.run(run(sizes, harnesses))
    report = Report(run_, sizes, stacks, flights)
    common.publish(run_, "ASGI overhead", report.markdown())
    return 1 if report.missed() and run_.args.fail_on_miss else 0


if __name__ == "__main__":
    raise SystemExit(main())
