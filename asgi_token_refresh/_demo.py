"""The demo: a real refresh storm over loopback, three ways of refreshing side by side.

For each column a strict FakeIdP (rotation on, a reused refresh token revokes the grant, short
access tokens, some latency) and a small Starlette app (``_demo_apps``: naive, authlib,
single-flight) are served with uvicorn. Browsers — one cookie jar per session, shared by its
tabs — log in, then at every expiry boundary every tab fires a burst of parallel API calls.
Each call makes the app get a token and call the provider's userinfo endpoint (the protected
API) with it. The columns run one after the other, each against a provider of its own.

Each provider is wrapped in a recorder that timestamps, from FakeIdP's public counters, every
refresh call, ``invalid_grant`` answer and grant revoked: the picture (``_demo_plot``) is drawn
from those.

``--serve`` keeps storming naive and single-flight until interrupted and exposes the metrics
for Prometheus. Needs the ``demo`` extra (uvicorn, starlette, Authlib, matplotlib, the
OpenTelemetry SDK and Prometheus exporter).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import httpx

from ._demo_apps import AUTHLIB_MISSING, CLIENT_ID, CLIENT_SECRET, authlib, build_app
from ._middleware import Message, Receive, Scope, Send
from ._oauth import OAuth2Client
from ._storm import side_by_side
from ._telemetry import Telemetry, default_telemetry
from .testing import FakeIdP, serve

__all__ = ["DemoConfig", "DemoReport", "Timeline", "available_modes", "run_demo", "serve_demo"]

MODES = ("naive", "authlib", "single-flight")
#: One line each, printed before the table.
LEGEND = {
    "naive": "each request that finds the token due refreshes it itself; last writer wins",
    "authlib": "Authlib as its Starlette integration is used: an AsyncOAuth2Client per request "
    "from the stored token refreshes it itself; update_token writes back, last writer wins",
    "single-flight": "this library's TokenRefreshMiddleware: one refresh per session, the "
    "session's other requests wait for it",
}
# Why a request failed, from the app's answer (see _demo_apps).
REFUSED_AT_REFRESH = "refused at refresh"  # the provider answered its refresh invalid_grant
REFUSED_BY_API = "refused by the API"  # it had a new token, from a grant revoked since
OTHER_FAILURE = "other failures"  # 5xx, a connection error


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
class Timeline:
    """When a column's provider did what: seconds since that column's browsers logged in."""

    refresh_calls: list[float] = field(default_factory=list)
    invalid_grant: list[float] = field(default_factory=list)
    revocations: list[float] = field(default_factory=list)  # grants revoked: sessions lost
    bursts: list[float] = field(default_factory=list)  # when each expiry-boundary burst began
    end: float = 0.0  # when the last burst was answered


@dataclass
class DemoReport:
    mode: str
    sessions: int = 0
    requests: int = 0
    failures: int = 0  # responses other than 200: what users see
    failure_kinds: Counter[str] = field(default_factory=Counter)
    provider_calls: int = 0
    invalid_grant: int = 0
    sessions_revoked: int = 0
    latencies: list[float] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def available_modes() -> tuple[tuple[str, ...], list[str]]:
    """The columns this installation can run, and a note for each one it cannot."""
    if authlib() is None:
        return tuple(m for m in MODES if m != "authlib"), [AUTHLIB_MISSING]
    return MODES, []


def _invalid_grant(idp: FakeIdP) -> int:
    return idp.token_calls("refresh_token", "invalid_grant") + idp.token_calls(
        "refresh_token", "reuse_revoked"
    )


class _ProviderRecorder:
    """An ASGI wrapper around a FakeIdP. A refresh call is timestamped when it arrives (the
    demo's only token requests are refreshes: logins use ``FakeIdP.issue``); invalid_grant
    answers and revoked grants when an answer goes out, by what FakeIdP's counters gained since
    the answer before (only token answers change them)."""

    def __init__(self, idp: FakeIdP) -> None:
        self.idp = idp
        self.timeline = Timeline()
        self.started = time.monotonic()
        self._seen = (0, 0)  # invalid_grant answers, grants revoked

    def now(self) -> float:
        return time.monotonic() - self.started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.idp(scope, receive, send)
            return
        if scope["method"] == "POST" and scope["path"].endswith("/token"):
            self.timeline.refresh_calls.append(self.now())

        async def answered(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.take()
            await send(message)

        await self.idp(scope, receive, answered)

    def take(self) -> None:
        counts = (_invalid_grant(self.idp), self.idp.grants_revoked)
        now, timeline = self.now(), self.timeline
        series = (timeline.invalid_grant, timeline.revocations)
        for times, new, old in zip(series, counts, self._seen, strict=True):
            times.extend([now] * (new - old))
        self._seen = counts


class _Stack(NamedTuple):
    app_url: str
    idp: FakeIdP
    recorder: _ProviderRecorder


@contextlib.contextmanager
def _stack(mode: str, config: DemoConfig, telemetry: Telemetry) -> Iterator[_Stack]:
    idp = FakeIdP(issuer=None, access_token_lifetime=config.token_lifetime, latency=config.latency)
    recorder = _ProviderRecorder(idp)
    with serve(recorder, host=config.host) as idp_url:
        client = OAuth2Client(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            issuer=idp_url,
            token_endpoint=f"{idp_url}/token",
            name=mode,
            telemetry=telemetry,
        )
        try:
            with serve(build_app(mode, idp, client, telemetry), host=config.host) as app_url:
                yield _Stack(app_url, idp, recorder)
        finally:
            idp.close()  # the client's pool closes with the app's loop


def _failure_kind(answer: httpx.Response | None) -> str:
    if answer is None or answer.status_code != 401:
        return OTHER_FAILURE
    with contextlib.suppress(ValueError):
        if answer.json().get("error") == "invalid_token":  # the API's own 401, passed through
            return REFUSED_BY_API
    return REFUSED_AT_REFRESH


async def _storm(
    stack: _Stack, mode: str, config: DemoConfig, progress: _Progress | None
) -> DemoReport:
    idp, recorder = stack.idp, stack.recorder
    report = DemoReport(mode=mode, sessions=config.sessions)
    limits = httpx.Limits(max_connections=config.tabs * config.parallel)
    browsers = [
        httpx.AsyncClient(base_url=stack.app_url, limits=limits, timeout=30)
        for _ in range(config.sessions)
    ]
    first_burst = config.first_burst or config.token_lifetime
    recorder.started = time.monotonic()
    try:
        idp.access_token_lifetime = first_burst  # the login tokens expire at the first burst
        try:
            for user, browser in enumerate(browsers):
                (await browser.get("/login", params={"user": f"user{user}"})).raise_for_status()
        finally:
            idp.access_token_lifetime = config.token_lifetime

        async def call(browser: httpx.AsyncClient) -> None:
            started = time.perf_counter()
            answer: httpx.Response | None = None
            with contextlib.suppress(httpx.HTTPError):
                answer = await browser.get("/api")
            report.latencies.append(time.perf_counter() - started)
            report.requests += 1
            if answer is None or answer.status_code != 200:
                report.failures += 1
                report.failure_kinds[_failure_kind(answer)] += 1

        burst = config.tabs * config.parallel
        for round_ in range(config.rounds):
            # Wake at every expiry boundary, when every session's access token has just expired.
            boundary = recorder.started + first_burst + round_ * config.token_lifetime
            await asyncio.sleep(max(0.0, boundary - time.monotonic()))
            recorder.timeline.bursts.append(recorder.now())
            await asyncio.gather(*(call(b) for b in browsers for _ in range(burst)))
            if progress is not None:
                progress.step(f"{mode} {round_ + 1}/{config.rounds}")
    finally:
        for browser in browsers:
            await browser.aclose()
    recorder.take()
    recorder.timeline.end = recorder.now()
    report.timeline = recorder.timeline
    report.provider_calls = idp.token_calls("refresh_token")
    report.invalid_grant = _invalid_grant(idp)
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


def run_demo(
    config: DemoConfig, telemetry: Telemetry | None = None, modes: tuple[str, ...] | None = None
) -> list[DemoReport]:
    """Run the storm once per column (by default every one available), in that order."""
    telemetry = telemetry or default_telemetry()
    modes = modes if modes is not None else available_modes()[0]
    progress = _Progress(config.rounds * len(modes))
    reports = []
    for mode in modes:
        with _stack(mode, config, telemetry) as stack:
            reports.append(asyncio.run(_storm(stack, mode, config, progress)))
    return reports


def serve_demo(config: DemoConfig, metrics_port: int, duration: float | None) -> None:
    """Storm naive and single-flight side by side until interrupted (or for ``duration``
    seconds) and expose the metrics at ``http://host:metrics_port/metrics``."""
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
            print(f"naive app {naive.app_url}, single-flight app {single.app_url}", file=sys.stderr)

            async def forever() -> None:
                while deadline is None or time.monotonic() < deadline:
                    # Each storm records a fresh timeline: nothing grows while serving.
                    naive.recorder.timeline = single.recorder.timeline = Timeline()
                    await asyncio.gather(
                        _storm(naive, "naive", config, None),
                        _storm(single, "single-flight", config, None),
                    )

            asyncio.run(forever())
    finally:
        metrics_server.shutdown()


def format_reports(reports: list[DemoReport]) -> str:
    rows: list[tuple[str, list[str]]] = [
        ("requests", [f"{r.requests:,}" for r in reports]),
        ("provider token calls", [f"{r.provider_calls:,}" for r in reports]),
        ("invalid_grant answers", [f"{r.invalid_grant:,}" for r in reports]),
        ("sessions revoked", [f"{r.sessions_revoked:,}" for r in reports]),
        ("user-visible failures", [f"{r.failures:,}" for r in reports]),
    ]
    kinds = [REFUSED_AT_REFRESH, REFUSED_BY_API]
    kinds += [OTHER_FAILURE] if any(r.failure_kinds[OTHER_FAILURE] for r in reports) else []
    rows += [(f"  {kind}", [f"{r.failure_kinds[kind]:,}" for r in reports]) for kind in kinds]
    rows += [
        ("latency p50", [f"{r.percentile(0.5) * 1000:.1f} ms" for r in reports]),
        ("latency p99", [f"{r.percentile(0.99) * 1000:.1f} ms" for r in reports]),
    ]
    return side_by_side([r.mode for r in reports], rows)


def legend(modes: tuple[str, ...]) -> str:
    """One entry per column, wrapped to the table's width."""
    return "\n".join(
        textwrap.fill(
            LEGEND[mode], 96, initial_indent=f"  {mode + ':':<15}", subsequent_indent=" " * 17
        )
        for mode in modes
    )


AUTHLIB_NOTE = """\
The authlib column's latency is mostly its clients: its Starlette integration builds an httpx
client per request, and each one loads the CA bundle (some 20 ms of CPU), even for http://."""
NOTES = f"""\
Why user-visible failures can exceed invalid_grant answers: nothing is retried, so each refused
refresh is one failure ({REFUSED_AT_REFRESH!r}); and a request that got a new token, from its
own refresh or from the store where a sibling wrote it, still fails when another sibling's
reuse of the old refresh token made the provider revoke the whole grant, that new token with it
({REFUSED_BY_API!r}): a failure with no invalid_grant of its own.
The naive and authlib columns vary from run to run (who wins each race is a matter of
timing); the single-flight column must not: one provider call per session per expiry
boundary and no session lost, or the demo exits 1."""
