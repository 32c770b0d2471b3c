"""What TokenRefreshMiddleware costs an app per request, and what telemetry costs per refresh.

Run from the repository root::

    python benchmarks/overhead.py                  # full sizes (~1.5 min on 2 cores), markdown
    python benchmarks/overhead.py --quick          # small sizes: a smoke run of every measurement
    python benchmarks/overhead.py --harness httpx  # part 1 in one harness only (default: both)
    python benchmarks/overhead.py --write          # also write its section in RESULTS.md

Part 1 serves requests in-process in one or both of two harnesses:

- ``direct``: each Starlette app is called as an ASGI callable, with a new scope and a minimal
  ``receive``/``send`` per request: no server, no socket and no httpx in the timed loop, so
  the numbers are the app stack's own cost;
- ``httpx``: each request goes through ``httpx.AsyncClient(transport=httpx.ASGITransport(app))``
  (one client per app, for the whole run), as Starlette's and FastAPI's async test clients and
  other in-process callers send them: httpx builds the request, the scope and the response.

The apps differ only in the middleware and the route:

- A: the bare app, one route answering ``PlainTextResponse("hello world")``;
- B: A with TokenRefreshMiddleware, the route never touching the token;
- C: B, the route awaiting ``request.state.token.get()`` on a fresh token (session cookie
  from a MemorySessionStore in the request headers);
- D: C with an OpenTelemetry SDK MeterProvider and TracerProvider (``capture_telemetry()``);
- E: A with a BaseHTTPMiddleware that does nothing, for comparison;
- F: A with a pure-ASGI middleware that only wraps ``send``: the least any middleware that
  sets cookies costs, for comparison with B.

Each round serves the same number of requests with every app, in an order that rotates from
round to round; the result is each app's throughput as a ratio of A's in the same round (the
median and range over rounds), and the time it adds per request over A's. The ratio depends on
the harness's own cost per request (the denominator); the µs added is the middleware's cost,
much the same in both. Part 2 times sequential refresh flights (a new expiring session
each, FakeIdP in-process) with the no-op telemetry and with the SDK providers, interleaved.

Correctness is checked, never timing: every response is 200, C and D count exactly one
fresh-path hit per request and call the provider never, D records no span and no SDK metric
but the fresh-path counter, and every flight makes exactly one provider call.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import results  # this directory is on sys.path when a benchmark runs
from refresher import (  # the refresher benchmark's helpers (this directory is on sys.path)
    Series,
    code_version,
    cpu_model,
    nproc,
    version_of,
)
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

ISSUER = "https://idp.test"
EXPIRED = 300.0  # FakeIdP's default access-token lifetime: advancing this far makes tokens due
RESULTS_MD = Path(__file__).with_name("RESULTS.md")
BODY = b"hello world"


@dataclass(frozen=True)
class Sizes:
    requests: int  # part 1, direct harness: requests per app per round
    httpx_requests: int  # part 1, httpx harness: requests per app per round
    rounds: int
    flights: int  # part 2: sequential refreshes per telemetry setting per round
    flight_rounds: int


FULL = Sizes(requests=5_000, httpx_requests=1_000, rounds=21, flights=500, flight_rounds=11)
QUICK = Sizes(requests=200, httpx_requests=50, rounds=2, flights=20, flight_rounds=1)
HARNESSES = ("direct", "httpx")


def _check(condition: bool, message: str) -> None:
    """An assertion that ``python -O`` does not strip."""
    if not condition:
        raise AssertionError(message)


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


async def time_requests(app: ASGIApp, template: dict[str, Any], n: int) -> float:
    """ns per request, serving ``n`` requests one after another."""
    start = time.perf_counter_ns()
    for _ in range(n):
        channel = Channel()
        await app(dict(template), channel.receive, channel.send)
    elapsed = time.perf_counter_ns() - start
    _check(channel.status == 200 and channel.body == BODY, f"bad response {channel.status}")
    return elapsed / n


@dataclass
class Served:
    status: int
    set_cookies: int
    body: bytes


class DirectDriver:
    """Calls the app as an ASGI callable: a copy of the scope and a new ``Channel`` each time."""

    def __init__(self, app: ASGIApp, template: dict[str, Any]) -> None:
        self.app = app
        self.template = template

    async def once(self) -> Served:
        channel = await serve_once(self.app, self.template)
        cookies = sum(1 for k, _ in channel.headers if k == b"set-cookie")
        return Served(channel.status, cookies, channel.body)

    async def time(self, n: int) -> float:
        return await time_requests(self.app, self.template, n)

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
        _check(not self.client.cookies, "the client's cookie jar must stay empty")
        return Served(response.status_code, cookies, response.content)

    async def time(self, n: int) -> float:
        """ns per request, sending ``n`` requests one after another."""
        get = self.client.get
        start = time.perf_counter_ns()
        for _ in range(n):
            response = await get("/")
        elapsed = time.perf_counter_ns() - start
        _check(
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
    captured_metrics: list[str]  # D: SDK metrics with data points after the run
    captured_spans: int  # D: spans finished


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
        return OAuth2Client(
            client_id="app",
            client_secret="app-secret",
            token_endpoint=f"{ISSUER}/token",
            transport=self.idp.transport(),
            telemetry=captured.telemetry if captured is not None else None,
        )

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
        _check(channel.status == 200 and len(set_cookies) == 1, "login must set one cookie")
        _check(len(self.store) == 1, "login must store one session")
        return set_cookies[0].split(";", 1)[0].encode("latin-1")

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.sdk_client.aclose()
        self.captured.shutdown()
        self.idp.close()


def metrics_with_points(captured: CapturedTelemetry) -> list[str]:
    data = captured.reader.get_metrics_data()
    names = set()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            names |= {m.name for m in scope.metrics if list(m.data.data_points)}
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
        answer = await drivers[variant.key].once()
        _check(answer.status == 200 and answer.body == BODY, f"{variant.key}: bad response")
        _check(answer.set_cookies == 0, f"{variant.key}: a fresh session must not be written back")
        if variant.refresher is not None:
            _check(variant.refresher.fresh_hits == hits + 1, f"{variant.key}: not a fresh hit")
    for key in variants:  # warm up: the middleware stack, caches, specialisation
        await drivers[key].time(min(requests, 2_000))

    counted = {k: v.refresher.fresh_hits for k, v in variants.items() if v.refresher is not None}
    names = list(variants)
    for round_ in range(sizes.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()  # each app starts from the same heap; the GC stays on while it runs
            variants[name].ns.values.append(await drivers[name].time(requests))
    bare = variants["A"].ns.values
    for variant in variants.values():
        pairs = list(zip(bare, variant.ns.values, strict=True))
        variant.ratio = Series([a / x for a, x in pairs])
        variant.added_ns = Series([x - a for a, x in pairs])

    served = sizes.rounds * requests
    for key, before in counted.items():
        refresher = variants[key].refresher
        assert refresher is not None
        _check(
            refresher.fresh_hits - before == served,
            f"{key}: {refresher.fresh_hits - before} fresh-path hits for {served} requests",
        )
    _check(apps.idp.token_calls() == 0, "a fresh token must never reach the provider")
    spans = len(apps.captured.spans())
    _check(spans == 0, f"D: the fresh path must record no span ({spans} recorded)")
    fresh = apps.captured.value(TOKEN_FRESH)
    _check(
        fresh == apps.sdk_refresher.fresh_hits,
        f"D: the fresh-path counter reads {fresh}, not {apps.sdk_refresher.fresh_hits}",
    )
    recorded = metrics_with_points(apps.captured)
    _check(recorded == [TOKEN_FRESH], f"D: the fresh path recorded SDK metrics {recorded}")
    for driver in drivers.values():
        await driver.aclose()
    await apps.aclose()
    return StackResults(harness, requests, variants, recorded, spans)


# -- 2. telemetry per refresh flight -----------------------------------------------------------


@dataclass
class FlightResults:
    flights: int
    noop_us: Series
    sdk_us: Series
    diff_us: Series  # SDK minus no-op, per round
    spans_per_flight: dict[str, float]  # SDK: finished spans by name, per flight
    sdk_refreshes: float  # SDK: the refreshes counter at the end, all rounds


async def flight_round(n: int, captured: CapturedTelemetry | None) -> float:
    """µs per flight for ``n`` sequential refreshes, each of its own expiring session."""
    clock = FakeClock()
    idp = FakeIdP(issuer=ISSUER, clock=clock)
    client = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=idp.transport(),
        clock=clock,
        telemetry=captured.telemetry if captured is not None else None,
    )
    refresher = Refresher(client, jitter=0)
    sessions = [
        TokenSet.from_token_response(
            idp.issue(f"user{i}"), issued_at=clock.time(), default_lifetime=3600.0
        )
        for i in range(n + 1)
    ]
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
    _check(calls == n + 1, f"{n + 1} expiring sessions made {calls} provider calls")
    _check(
        all(r.refresh_token != s.refresh_token for r, s in zip(results, sessions[1:], strict=True)),
        "every session must be refreshed",
    )
    await client.aclose()
    idp.close()
    return elapsed / n / 1000


async def bench_flights(sizes: Sizes) -> FlightResults:
    captured = capture_telemetry()  # one set of SDK providers for all rounds, as in production
    out = FlightResults(sizes.flights, Series(), Series(), Series(), {}, 0.0)
    await flight_round(min(sizes.flights, 50), None)  # warm up: imports, the I/O loop
    await flight_round(min(sizes.flights, 50), captured)
    captured.exporter.clear()
    spans: dict[str, int] = {}
    for round_ in range(sizes.flight_rounds):
        order = (captured, None) if round_ % 2 else (None, captured)
        for telemetry in order:
            us = await flight_round(sizes.flights, telemetry)
            (out.noop_us if telemetry is None else out.sdk_us).values.append(us)
        for span in captured.spans():
            spans[span.name] = spans.get(span.name, 0) + 1
        captured.exporter.clear()
    flights = sizes.flight_rounds * (sizes.flights + 1)  # + the untimed first flight of each
    out.spans_per_flight = {name: count / flights for name, count in sorted(spans.items())}
    out.sdk_refreshes = captured.value(REFRESHES)
    warmup = min(sizes.flights, 50) + 1
    _check(
        out.sdk_refreshes == flights + warmup,
        f"SDK: the refreshes counter reads {out.sdk_refreshes}, not {flights + warmup}",
    )
    out.diff_us = Series(
        [s - n for s, n in zip(out.sdk_us.values, out.noop_us.values, strict=True)]
    )
    captured.shutdown()
    return out


# -- report ---------------------------------------------------------------------------------------


def fmt_us(ns: float) -> str:
    return f"{ns / 1000:.2f} µs"


def fmt_ratio(x: float) -> str:
    return f"{x:.3f}x"


def verdict(ok: bool) -> str:
    return "✅ met" if ok else "❌ missed"


@dataclass
class Report:
    command: str
    sizes: Sizes
    quick: bool
    stacks: list[StackResults]
    flights: FlightResults
    load: str
    when: str

    def environment(self) -> list[str]:
        libs = ", ".join(
            f"{name} {version_of(name)}"
            for name in ("starlette", "httpx", "opentelemetry-api", "opentelemetry-sdk")
            if version_of(name) is not None
        )
        return [
            f"- Date: {self.when}",
            f"- Python: {platform.python_implementation()} {platform.python_version()} "
            f"({platform.platform()}); {libs}",
            f"- Code: {code_version()}",
            f"- Machine: nproc {nproc()} ({os.cpu_count()} CPUs), {cpu_model()}; "
            f"load average at start {self.load}",
            f"- Command (from the repository root): `{self.command}`",
            "- Sizes: part 1, "
            + ", ".join(f"{s.requests:,} requests per app ({s.harness})" for s in self.stacks)
            + f" x {self.sizes.rounds} rounds; part 2, {self.sizes.flights:,} flights per "
            f"setting x {self.sizes.flight_rounds} rounds"
            + (" — **quick smoke run: sizes too small for the targets**" if self.quick else ""),
        ]

    def stack_table(self, stack: StackResults) -> list[str]:
        lines = [
            "| | app | per request (median) | range over rounds | requests/s | "
            "added per request vs A | throughput vs A | range over rounds | target | |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v in stack.variants.values():
            target, ok = "", ""
            if v.target is not None:
                target = f"≥ {v.target:.2f}x"
                ok = verdict(v.ratio.median >= v.target)
            if v.key == "A":
                added, ratio, spread = "", "1 (the reference)", ""
            else:
                added = fmt_us(v.added_ns.median)
                ratio = fmt_ratio(v.ratio.median)
                spread = f"{fmt_ratio(v.ratio.low)} to {fmt_ratio(v.ratio.high)}"
            lines.append(
                f"| {v.key} | {v.label} | {fmt_us(v.ns.median)} | "
                f"{fmt_us(v.ns.low)} to {fmt_us(v.ns.high)} | {1e9 / v.ns.median:,.0f} | "
                f"{added} | {ratio} | {spread} | {target} | {ok} |"
            )
        return lines

    def flight_table(self) -> list[str]:
        f = self.flights

        def us(x: float) -> str:
            return f"{x:.1f} µs"

        def span(s: Series) -> str:
            return f"{us(s.low)} to {us(s.high)}"

        spans = ", ".join(f"{name} {n:g}" for name, n in f.spans_per_flight.items())
        return [
            "| telemetry | per flight (median) | range over rounds |",
            "|---|---|---|",
            f"| no-op (OpenTelemetry API only, no SDK) | {us(f.noop_us.median)} | "
            f"{span(f.noop_us)} |",
            f"| SDK MeterProvider + TracerProvider (in-memory exporters) | "
            f"{us(f.sdk_us.median)} | {span(f.sdk_us)} |",
            f"| difference, SDK minus no-op (per round) | {us(f.diff_us.median)} | "
            f"{span(f.diff_us)} |",
            f"| spans per flight with the SDK | {sum(f.spans_per_flight.values()):g} ({spans}) | |",
        ]

    def markdown(self) -> str:
        return (
            "\n".join(
                [
                    *self.environment(),
                    "",
                    "Part 1: requests served in-process by each app, one after another (GC on, "
                    "a `gc.collect()` before each app's share of a round). Medians over rounds; "
                    "throughput vs A and the added time are taken within each round, A's time "
                    "per request over the app's. The targets are evaluated on the throughput "
                    "ratio in each harness; that ratio depends on what the harness itself costs "
                    "per request (A's time), while the µs added per request is the middleware's "
                    "own cost, the figure to compare across harnesses.",
                    "",
                    *self.stack_tables(),
                    f"Part 2: {self.flights.flights:,} sequential refresh flights per round, "
                    "each of a new expiring session (FakeIdP in-process, FakeClock).",
                    "",
                    *self.flight_table(),
                ]
            )
            + "\n"
        )

    def stack_tables(self) -> list[str]:
        intro = {
            "direct": "Harness `direct`: the app called as an ASGI callable, a new scope and a "
            "minimal `receive`/`send` per request (no httpx).",
            "httpx": "Harness `httpx`: `GET /` through `httpx.AsyncClient(transport="
            "httpx.ASGITransport(app=...))`, one client per app (as async test clients send "
            "requests in-process).",
        }
        lines: list[str] = []
        for stack in self.stacks:
            lines += [intro[stack.harness], "", *self.stack_table(stack), ""]
        return lines

    def missed(self) -> bool:
        return any(
            v.target is not None and v.ratio.median < v.target
            for stack in self.stacks
            for v in stack.variants.values()
        )


def write_section(path: Path, report: Report) -> None:
    """Replace this script's section of ``path`` (or add it), leaving the rest alone."""
    results.write_section(path, "overhead.py", "ASGI overhead", report.markdown())


# -- main -----------------------------------------------------------------------------------------


async def run(sizes: Sizes, harnesses: Sequence[str]) -> tuple[list[StackResults], FlightResults]:
    stacks = [await bench_stack(sizes, harness) for harness in harnesses]
    flights = await bench_flights(sizes)
    return stacks, flights


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description="Benchmark the middleware's per-request overhead and telemetry's per-flight "
        "cost."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a fast smoke run")
    parser.add_argument("--write", action="store_true", help=f"update the section in {RESULTS_MD}")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="file for --write")
    parser.add_argument(
        "--harness",
        choices=[*HARNESSES, "both"],
        default="both",
        help="part 1: call the apps directly, through httpx's ASGITransport, or both (default)",
    )
    parser.add_argument(
        "--requests", type=int, help="part 1, direct harness: requests per app per round"
    )
    parser.add_argument(
        "--httpx-requests", type=int, help="part 1, httpx harness: requests per app per round"
    )
    parser.add_argument("--rounds", type=int, help="part 1: rounds")
    parser.add_argument("--flights", type=int, help="part 2: flights per setting per round")
    parser.add_argument("--flight-rounds", type=int, help="part 2: rounds")
    parser.add_argument(
        "--fail-on-miss", action="store_true", help="exit 1 if a throughput target is missed"
    )
    args = parser.parse_args(args_list)

    base = QUICK if args.quick else FULL
    sizes = Sizes(
        requests=args.requests or base.requests,
        httpx_requests=args.httpx_requests or base.httpx_requests,
        rounds=args.rounds or base.rounds,
        flights=args.flights or base.flights,
        flight_rounds=args.flight_rounds or base.flight_rounds,
    )
    command = shlex.join(["python", "benchmarks/overhead.py", *args_list])
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    harnesses = HARNESSES if args.harness == "both" else (args.harness,)
    stacks, flights = asyncio.run(run(sizes, harnesses))
    report = Report(command, sizes, args.quick, stacks, flights, load, when)
    print(report.markdown())
    if args.write:
        write_section(args.results, report)
        print(f"wrote {args.results}")
    return 1 if report.missed() and args.fail_on_miss else 0


if __name__ == "__main__":
    raise SystemExit(main())
