"""A live ``/metrics`` page rendered from the library's real instruments.

The library's :class:`~asgi_token_refresh.Telemetry` is wired to an OpenTelemetry SDK
``MeterProvider`` whose reader is the OpenTelemetry Prometheus exporter (on a private
``CollectorRegistry``, so nothing global is touched). A small storm then runs against an
in-process ``FakeIdP`` and touches every instrument and every attribute key: fresh hits, one
flight with a leader and joined callers, grace-cache stragglers, a compare-and-refresh a few
seconds later (a short ``refresh.interval``), a transient provider error and the negative cache
it fills, a client-credentials token, a flight served by another "process" through a shared
coordinator and one whose coordinator is down, and — through ``TokenRefreshMiddleware`` and
``TokenAuth`` — terminal failures from ``invalid_grant`` and from an API that keeps answering
401. The page is what Prometheus would scrape from an app using the library. The series the
dashboard and the alerts query are on it even where the storm records nothing (duplicate
refreshes, login failures): the library starts them at zero (``Telemetry.preinitialise``).

    python -m dashboards.scrape            # the exposition text
    python -m dashboards.scrape --table    # the OTel -> Prometheus table of dashboards/README.md
    python -m dashboards.scrape --write-readme
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
TABLE_START = "<!-- metrics-table:start (python -m dashboards.scrape --write-readme) -->"
TABLE_END = "<!-- metrics-table:end -->"
#: Labels the OpenTelemetry Prometheus exporter adds to every series (the instrumentation scope).
SCOPE_LABELS = frozenset({"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"})

_ISSUER = "https://idp.scrape"


@dataclass(frozen=True)
class Family:
    """One metric family of the scrape: its ``# TYPE``, ``# HELP``, series names and labels."""

    name: str  # the family name as prometheus_client parses it (counters without _total)
    type: str  # counter | gauge | histogram | ...
    help: str
    series: tuple[str, ...]  # sample names, e.g. x_bucket, x_count, x_sum
    labels: tuple[str, ...]  # label keys, scope labels and le left out


@dataclass(frozen=True)
class Instrument:
    """One OpenTelemetry instrument as the SDK saw it."""

    name: str
    kind: str  # counter | up-down counter | histogram
    unit: str
    description: str


@dataclass(frozen=True)
class Scrape:
    text: str  # the exposition text, as GET /metrics returns it
    instruments: tuple[Instrument, ...]  # the library's instruments (OpenTelemetry names)

    def families(self) -> dict[str, Family]:
        return parse_families(self.text)

    def series_types(self) -> dict[str, str]:
        """Every sample name on the page -> the type of its family."""
        return {s: f.type for f in self.families().values() for s in f.series}


def parse_families(text: str) -> dict[str, Family]:
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, Family] = {}
    for family in text_string_to_metric_families(text):
        series = sorted({s.name for s in family.samples})
        labels = sorted(
            {k for s in family.samples for k in s.labels if k not in SCOPE_LABELS and k != "le"}
        )
        found[family.name] = Family(
            family.name, family.type, family.documentation, tuple(series), tuple(labels)
        )
    return found


def scrape() -> Scrape:
    """Run the storm and return the ``/metrics`` page and the instruments behind it."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry, generate_latest

    from asgi_token_refresh import OAuth2Client, Telemetry
    from asgi_token_refresh.testing import FakeClock, FakeIdP

    registry = CollectorRegistry()
    otel = InMemoryMetricReader()  # the same points, by OpenTelemetry name, for the table
    meter_provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry), otel])
    tracer_provider = TracerProvider()
    telemetry = Telemetry(meter_provider=meter_provider, tracer_provider=tracer_provider)
    clock = FakeClock()
    idp = FakeIdP(issuer=_ISSUER, clock=clock, access_token_lifetime=300)
    client = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{_ISSUER}/token",
        userinfo_endpoint=f"{_ISSUER}/userinfo",
        transport=idp.transport(),
        clock=clock,
        name="scrape",
        telemetry=telemetry,
    )
    try:
        asyncio.run(_storm(client, idp, clock))
        text = generate_latest(registry).decode()
        instruments = _instruments(otel)
    finally:
        idp.close()
        meter_provider.shutdown()
        tracer_provider.shutdown()
    return Scrape(text, instruments)


async def _storm(client: Any, idp: Any, clock: Any) -> None:
    from asgi_token_refresh import Refresher, TokenRefreshError, TokenSet
    from asgi_token_refresh.testing import Fault

    refresher = Refresher(client, jitter=0)

    def login(subject: str) -> TokenSet:
        return TokenSet.from_token_response(
            idp.issue(subject), issued_at=clock.time(), default_lifetime=300
        )

    session = login("alice")
    for _ in range(5):  # fresh path
        await refresher.ensure_fresh(session)
    clock.advance(300)
    gate = idp.pause_token_endpoint()  # hold the flight until every caller has joined it
    callers = [asyncio.create_task(refresher.ensure_fresh(session)) for _ in range(10)]
    await gate.arrived(1)
    await _until(lambda: refresher.waiting == len(callers))
    gate.release()
    renewed = (await asyncio.gather(*callers))[0]
    for _ in range(3):  # stragglers holding the old refresh token: grace cache
        await refresher.ensure_fresh(session)
    clock.advance(3)  # the API rejects the new token at once: compare-and-refresh
    renewed = await refresher.renew(renewed, failed_access_token=renewed.access_token)
    clock.advance(300)
    idp.script(Fault.unavailable(retry_after=7))  # a transient failure, then its negative cache
    for _ in range(2):
        with contextlib.suppress(TokenRefreshError):
            await refresher.ensure_fresh(renewed)
    await refresher.client_credentials()
    await refresher.end_session(login("erin"))  # a logout, revoked at the provider
    await _across_processes(client, login, clock)
    await _through_the_middleware(refresher, idp, clock)


async def _across_processes(client: Any, login: Any, clock: Any) -> None:
    """Two refreshers standing for two processes share a coordinator: the second one is served
    the first one's result (dedupe ``distributed``); a third one's coordinator is down."""
    from asgi_token_refresh import Refresher

    shared = _SharedCoordinator()
    here, there = (Refresher(client, jitter=0, coordinator=shared) for _ in range(2))
    down = Refresher(client, jitter=0, coordinator=_DownCoordinator())
    carol, dave = login("carol"), login("dave")
    clock.advance(300)
    await here.ensure_fresh(carol)
    await there.ensure_fresh(carol)
    await down.ensure_fresh(dave)  # falls back to local coordination: a coordinator error


class _SharedCoordinator:
    """In memory, on the library's I/O loop (one thread): what Redis is between processes."""

    name = "shared"

    def __init__(self) -> None:
        self.published: dict[str, Any] = {}
        self.leases: dict[str, Any] = {}

    def grant_key(self, *parts: str | None) -> str:
        joined = "\x00".join(part or "" for part in parts).encode()
        return hashlib.blake2b(joined, digest_size=16).hexdigest()

    async def try_lead(self, key: str, ttl: float) -> Any:
        from asgi_token_refresh import Lease

        if key in self.published:
            return self.published[key]
        if key in self.leases:
            return None
        lease = self.leases[key] = Lease(key, "scrape")
        return lease

    async def publish(self, lease: Any, outcome: Any, ttl: float) -> None:
        self.published[lease.key] = outcome
        self.leases.pop(lease.key, None)

    async def release(self, lease: Any) -> None:
        self.leases.pop(lease.key, None)

    async def lookup(self, key: str) -> Any:
        return self.published.get(key)

    async def wait(self, key: str, timeout: float) -> Any:  # noqa: ASYNC109
        return self.published.get(key)


class _DownCoordinator(_SharedCoordinator):
    name = "down"

    async def try_lead(self, key: str, ttl: float) -> Any:
        raise ConnectionError("the coordinator is unreachable")


async def _through_the_middleware(refresher: Any, idp: Any, clock: Any) -> None:
    """Terminal failures are counted where they reach a caller: the ASGI accessor and TokenAuth."""
    import httpx
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from asgi_token_refresh import MemorySessionStore, TokenRefreshMiddleware
    from asgi_token_refresh.testing import Fault

    async def always_401(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    api = httpx.ASGITransport(app=always_401)

    async def login(request: Request) -> JSONResponse:
        await request.state.token.login(idp.issue("bob"))
        return JSONResponse({})

    async def token(request: Request) -> JSONResponse:
        return JSONResponse({"token": await request.state.token.get()})

    async def me(request: Request) -> JSONResponse:
        async with request.state.token.client(base_url=_ISSUER, transport=api) as client:
            response = await client.get("/userinfo")
        return JSONResponse({}, status_code=response.status_code)

    app = Starlette(
        routes=[Route("/login", login), Route("/token", token), Route("/me", me)],
        middleware=[
            Middleware(TokenRefreshMiddleware, refresher=refresher, store=MemorySessionStore())
        ],
    )
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="https://app.test") as browser,
        httpx.AsyncClient(transport=transport, base_url="https://app.test") as other,
    ):
        await browser.get("/login")
        await other.get("/login")
        await browser.get("/me")  # 401, refresh, 401 again: downstream_401 (httpx)
        clock.advance(300)
        idp.script(Fault.invalid_grant())
        await other.get("/token")  # invalid_grant (asgi); the session is cleared
        await other.get("/token")  # no_session (asgi)


async def _until(condition: Any) -> None:
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise TimeoutError("condition never held")


def _instruments(reader: Any) -> tuple[Instrument, ...]:
    from opentelemetry.sdk.metrics.export import Histogram, Sum

    from asgi_token_refresh._telemetry import SCOPE

    found: list[Instrument] = []
    data = reader.get_metrics_data()
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            if scope.scope.name != SCOPE:
                continue
            for metric in scope.metrics:
                if isinstance(metric.data, Histogram):
                    kind = "histogram"
                elif isinstance(metric.data, Sum):
                    kind = "counter" if metric.data.is_monotonic else "up-down counter"
                else:  # pragma: no cover - the library has no gauges
                    kind = type(metric.data).__name__.lower()
                found.append(Instrument(metric.name, kind, metric.unit or "", metric.description))
    return tuple(sorted(found, key=lambda i: i.name))


# -- the README table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    otel: Instrument
    family: Family

    def prometheus_series(self) -> list[str]:
        return list(self.family.series)


def rows(result: Scrape) -> list[Row]:
    """Pair every instrument with the family the exporter made of it (same HELP text)."""
    by_help = {f.help: f for f in result.families().values()}
    paired = []
    for instrument in result.instruments:
        family = by_help.get(instrument.description)
        if family is None:
            raise LookupError(f"{instrument.name} is not on the /metrics page")
        paired.append(Row(instrument, family))
    return paired


def table(result: Scrape) -> str:
    """The Markdown table of dashboards/README.md, between its markers."""
    lines = [
        TABLE_START,
        "| OpenTelemetry instrument | kind | unit | Prometheus series | type | labels |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows(result):
        series = row.prometheus_series()
        if row.family.type == "histogram":
            base = row.family.name
            shown = f"`{base}_bucket`, `_sum`, `_count`"
            assert sorted(series) == sorted(f"{base}_{s}" for s in ("bucket", "count", "sum"))
        else:
            [only] = series
            shown = f"`{only}`"
        labels = ", ".join(f"`{label}`" for label in row.family.labels)
        unit = f"`{row.otel.unit}`" if row.otel.unit else ""
        lines.append(
            f"| `{row.otel.name}` | {row.otel.kind} | {unit} | {shown} | {row.family.type} "
            f"| {labels} |"
        )
    lines.append(TABLE_END)
    return "\n".join(lines)


def readme_table(text: str) -> str:
    """The table block as it stands in README.md."""
    start, end = text.index(TABLE_START), text.index(TABLE_END)
    return text[start : end + len(TABLE_END)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--table", action="store_true", help="print the README table")
    group.add_argument("--write-readme", action="store_true", help="update the README table")
    args = parser.parse_args(argv)
    result = scrape()
    if args.table:
        print(table(result))
    elif args.write_readme:
        text = README.read_text()
        README.write_text(text.replace(readme_table(text), table(result)))
    else:
        sys.stdout.write(result.text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
