"""Benchmarks of the Refresher: the fresh-token path, a refresh storm, many sessions at once.

Run from the repository root::

    python benchmarks/refresher.py            # full sizes, prints a markdown table
    python benchmarks/refresher.py --quick    # small sizes: a smoke run of every measurement
    python benchmarks/refresher.py --write    # also write the section in benchmarks/RESULTS.md

Performance targets live here, never as timing assertions in tests. Correctness is asserted
even here: a storm makes exactly one provider call, N expiring sessions make exactly N, and no
more than ``max_concurrency`` token requests are ever in flight. The machine is noisy, so every
timing is the median of several rounds, and A/B pairs (the refresher and its baseline) run
interleaved, their order alternating from round to round.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import importlib
import importlib.metadata
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import results  # this directory is on sys.path when a benchmark runs

from asgi_token_refresh import OAuth2Client, Refresher, TokenParams, TokenSet
from asgi_token_refresh.testing import FakeClock, FakeIdP

ISSUER = "https://idp.test"
EXPIRED = 300.0  # FakeIdP's default access-token lifetime: advancing this far makes tokens due
RESULTS_MD = Path(__file__).with_name("RESULTS.md")

FRESH_TARGET_NS = 1_000.0  # the refresher's own cost on the fresh path
RELEASE_TARGET_US = 15.0  # per waiter, from the provider's response to the last waiter resumed


@dataclass(frozen=True)
class Sizes:
    calls: int  # fresh path: calls per measurement per round
    fresh_rounds: int
    waiters: int  # storm: concurrent callers on one session
    storm_rounds: int
    sessions: int  # distinct sessions expiring together
    session_rounds: int


FULL = Sizes(
    calls=100_000, fresh_rounds=9, waiters=10_000, storm_rounds=7, sessions=10_000, session_rounds=3
)
QUICK = Sizes(
    calls=2_000, fresh_rounds=3, waiters=500, storm_rounds=2, sessions=200, session_rounds=1
)


def _check(condition: bool, message: str) -> None:
    """An assertion that ``python -O`` does not strip."""
    if not condition:
        raise AssertionError(message)


# -- plumbing -------------------------------------------------------------------------------------


class RecordingTransport(httpx.AsyncBaseTransport):
    """Wraps the FakeIdP's transport: counts token requests, their peak concurrency, and notes
    ``time.perf_counter()`` when each response comes back.

    It yields to the event loop once before forwarding a request, as every network transport
    does; the in-process ASGI transport never suspends on its own, so without this no two token
    requests could ever overlap and the concurrency cap would be invisible.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.calls = 0
        self.in_flight = 0
        self.peak = 0
        self.responded_at: list[float] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0)
            response = await self.inner.handle_async_request(request)
        finally:
            self.in_flight -= 1
        self.responded_at.append(time.perf_counter())
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Provider:
    """A FakeIdP, a client wired to it through a RecordingTransport, and a Refresher."""

    clock: FakeClock
    idp: FakeIdP
    transport: RecordingTransport
    client: OAuth2Client
    refresher: Refresher

    @classmethod
    def create(cls, *, latency: float = 0.0) -> Provider:
        clock = FakeClock()
        idp = FakeIdP(issuer=ISSUER, clock=clock, latency=latency)
        transport = RecordingTransport(idp.transport())
        client = OAuth2Client(
            client_id="app",
            client_secret="app-secret",
            token_endpoint=f"{ISSUER}/token",
            transport=transport,
            clock=clock,
        )
        return cls(clock, idp, transport, client, Refresher(client, jitter=0))

    def login(self, subject: str = "alice") -> TokenSet:
        """A session's first token set, as the login callback would store it."""
        return TokenSet.from_token_response(
            self.idp.issue(subject), issued_at=self.clock.time(), default_lifetime=3600.0
        )

    async def aclose(self) -> None:
        await self.client.aclose()
        self.idp.close()


def rss_mib() -> float | None:
    """The resident set size now (VmRSS), in MiB; None where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (``ru_maxrss``: KiB on Linux)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def cpu_model() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def code_version() -> str:
    """The commit measured, and whether the library's files differ from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(  # noqa: S603 - fixed arguments, no shell
            ["git", *args],  # noqa: S607 - git from PATH, as a developer runs it
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "asgi_token_refresh")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not changed:
        return f"commit {commit}"
    return f"commit {commit} + uncommitted changes to {len(changed.splitlines())} library file(s)"


def nproc() -> int:
    """CPUs this process may run on, as ``nproc`` counts them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Series:
    """One measurement's value in every round."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


# -- 1. the fresh path ----------------------------------------------------------------------------


class _EnsureFresh(Protocol):
    async def ensure_fresh(self, token_set: TokenSet) -> TokenSet: ...

    def refresh_due(self, token_set: TokenSet) -> bool: ...


class Baseline:
    """The Refresher's call shapes doing nothing: the cost any async (or sync) API has."""

    async def ensure_fresh(
        self,
        token_set: TokenSet,
        *,
        params: TokenParams | None = None,
        current: object = None,
        on_refreshed: object = None,
    ) -> TokenSet:
        return token_set

    def refresh_due(self, token_set: TokenSet) -> bool:
        return False


async def time_ensure_fresh(subject: _EnsureFresh, token_set: TokenSet, n: int) -> float:
    """ns per ``await subject.ensure_fresh(token_set)``."""
    start = time.perf_counter_ns()
    for _ in range(n):
        await subject.ensure_fresh(token_set)
    return (time.perf_counter_ns() - start) / n


async def time_refresh_due(subject: _EnsureFresh, token_set: TokenSet, n: int) -> float:
    """ns per ``subject.refresh_due(token_set)`` (async only so that all runners look alike)."""
    start = time.perf_counter_ns()
    for _ in range(n):
        subject.refresh_due(token_set)
    return (time.perf_counter_ns() - start) / n


Runner = Callable[[int], Awaitable[float]]


@dataclass
class FreshRow:
    label: str
    series: Series
    baseline: str | None = None  # key of the baseline row this one is net of
    target_ns: float | None = None
    note: str = ""


@dataclass
class FreshResults:
    rows: dict[str, FreshRow]
    net: dict[str, Series]
    skipped: list[str]


async def _authlib_runner(
    skipped: list[str], cleanups: list[Callable[[], Awaitable[None]]]
) -> Runner | None:
    """Authlib's fresh path: ``await client.ensure_active_token(token)``, token not expired."""
    try:
        clients = importlib.import_module("authlib.integrations.httpx_client")
    except ImportError:
        skipped.append("Authlib (not installed: pip install -e '.[bench]')")
        return None
    client: Any = clients.AsyncOAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        token={
            "access_token": "at",
            "refresh_token": "rt",
            "token_type": "Bearer",
            "expires_in": 3600,
        },
    )
    cleanups.append(client.aclose)
    token = client.token
    _check(not token.is_expired(leeway=client.leeway), "the Authlib token must be fresh")

    async def run(n: int) -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            await client.ensure_active_token(token)
        return (time.perf_counter_ns() - start) / n

    return run


def _httpx_auth_runners(skipped: list[str]) -> tuple[Runner, Runner] | None:
    """httpx-auth's cached-token path: the whole ``auth_flow`` cycle as httpx drives it for
    one request (token lookup and Authorization header), and the cache lookup alone."""
    try:
        httpx_auth: Any = importlib.import_module("httpx_auth")
    except ImportError:
        skipped.append("httpx-auth (not installed: pip install -e '.[bench]')")
        return None
    auth = httpx_auth.OAuth2ClientCredentials(
        f"{ISSUER}/token", client_id="app", client_secret="app-secret"
    )
    cache = httpx_auth.OAuth2.token_cache
    # Put a token in the (process-wide) cache through its own API, as a first request would.
    cache.get_token(auth.state, on_missing_token=lambda: (auth.state, "at", 3600))
    request = httpx.Request("GET", "https://api.test/")
    response = httpx.Response(200, request=request)
    state, early_expiry = auth.state, auth.early_expiry

    async def flow(n: int) -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            steps = auth.auth_flow(request)
            next(steps)
            try:  # noqa: SIM105 - contextlib.suppress would add its own cost to the timing
                steps.send(response)
            except StopIteration:
                pass
        return (time.perf_counter_ns() - start) / n

    async def lookup(n: int) -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            cache.get_token(state, early_expiry=early_expiry)
        return (time.perf_counter_ns() - start) / n

    return flow, lookup


async def bench_fresh(sizes: Sizes, *, compare: bool) -> FreshResults:
    # The real clock, as in production (FakeClock takes a lock on every reading).
    client = OAuth2Client(
        client_id="app", client_secret="app-secret", token_endpoint=f"{ISSUER}/token"
    )
    refresher = Refresher(client, jitter=0)
    now = time.time()
    token_set = TokenSet(
        access_token="at", refresh_token="rt", issued_at=now, expires_at=now + 3600
    )
    _check(not refresher.refresh_due(token_set), "the token set must be fresh")
    baseline = Baseline()
    _check(await refresher.ensure_fresh(token_set) is token_set, "fresh path must return as is")

    runners: dict[str, Runner] = {
        "noop_async": lambda n: time_ensure_fresh(baseline, token_set, n),
        "ensure_fresh": lambda n: time_ensure_fresh(refresher, token_set, n),
        "noop_sync": lambda n: time_refresh_due(baseline, token_set, n),
        "refresh_due": lambda n: time_refresh_due(refresher, token_set, n),
    }
    rows = {
        "ensure_fresh": FreshRow(
            "`await refresher.ensure_fresh(ts)`", Series(), "noop_async", FRESH_TARGET_NS
        ),
        "noop_async": FreshRow("`await noop.ensure_fresh(ts)` (baseline)", Series()),
        "refresh_due": FreshRow("`refresher.refresh_due(ts)`", Series(), "noop_sync"),
        "noop_sync": FreshRow("`noop.refresh_due(ts)` (baseline)", Series()),
    }
    skipped: list[str] = []
    cleanups: list[Callable[[], Awaitable[None]]] = [client.aclose]
    if compare:
        authlib = await _authlib_runner(skipped, cleanups)
        if authlib is not None:
            runners["authlib"] = authlib
            rows["authlib"] = FreshRow(
                f"Authlib {version_of('authlib')} `await client.ensure_active_token(token)`",
                Series(),
                "noop_async",
            )
        httpx_auth = _httpx_auth_runners(skipped)
        if httpx_auth is not None:
            runners["httpx_auth_flow"], runners["httpx_auth_lookup"] = httpx_auth
            version = version_of("httpx-auth")
            rows["httpx_auth_flow"] = FreshRow(
                f"httpx-auth {version} `OAuth2ClientCredentials.auth_flow` (one request)",
                Series(),
                "noop_sync",
                note="sync; includes setting the Authorization header",
            )
            rows["httpx_auth_lookup"] = FreshRow(
                f"httpx-auth {version} `OAuth2.token_cache.get_token(key)`",
                Series(),
                "noop_sync",
                note="sync; the cached-token lookup alone",
            )

    names = list(runners)
    for name in names:  # warm up: first calls, caches, specialisation
        await runners[name](min(sizes.calls, 10_000))
    gc.collect()
    gc.disable()  # as timeit does: a collection mid-loop is noise, not the code's cost
    try:
        for round_ in range(sizes.fresh_rounds):
            # Rotate the order so that no measurement always runs first or after the same one.
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                rows[name].series.values.append(await runners[name](sizes.calls))
    finally:
        gc.enable()
    for cleanup in cleanups:
        await cleanup()

    net: dict[str, Series] = {}
    for name, row in rows.items():
        if row.baseline is not None:
            base = rows[row.baseline].series.values
            net[name] = Series([a - b for a, b in zip(row.series.values, base, strict=True)])
    return FreshResults(rows, net, skipped)


# -- 2. the storm ---------------------------------------------------------------------------------


@dataclass
class StormResults:
    waiters: int
    provider_calls: list[int]
    release_us: Series  # per waiter
    floor_us: Series  # per waiter, bare asyncio
    join_us: Series  # per caller: task creation up to waiting on the flight


async def storm_round(waiters: int) -> tuple[int, float, float]:
    """One session, ``waiters`` callers at once. Returns (provider calls, release µs per waiter,
    join µs per caller)."""
    provider = Provider.create()
    session = provider.login()
    provider.clock.advance(EXPIRED)
    gate = provider.idp.pause_token_endpoint()  # hold the flight until every caller waits on it
    loop = asyncio.get_running_loop()
    resumed = [0.0] * waiters
    results: list[TokenSet | None] = [None] * waiters
    remaining = waiters
    everyone: asyncio.Future[None] = loop.create_future()
    refresher = provider.refresher

    async def caller(i: int) -> None:
        nonlocal remaining
        result = await refresher.ensure_fresh(session)
        resumed[i] = time.perf_counter()
        results[i] = result
        remaining -= 1
        if remaining == 0:
            everyone.set_result(None)

    gc.collect()
    start = time.perf_counter()
    tasks = [loop.create_task(caller(i)) for i in range(waiters)]
    await asyncio.sleep(0)  # every task runs up to its wait on the (one) flight
    joined = time.perf_counter()
    await gate.arrived(1)
    _check(remaining == waiters, "no caller may finish before the provider answers")
    gate.release()
    await everyone
    calls = provider.idp.token_calls("refresh_token")
    _check(calls == 1, f"a storm on one session made {calls} provider calls, not 1")
    _check(provider.transport.calls == 1, "the transport saw more than one token request")
    first = results[0]
    _check(first is not None and first.refresh_token != session.refresh_token, "not refreshed")
    _check(all(r is first for r in results), "every waiter must get the same token set")
    _check(all(t.done() for t in tasks), "every task must have finished")
    released = (max(resumed) - provider.transport.responded_at[0]) / waiters
    await provider.aclose()
    return calls, released * 1e6, (joined - start) / waiters * 1e6


async def floor_round(waiters: int) -> float:
    """The same shape in bare asyncio: ``waiters`` tasks each awaiting a future, all futures
    resolved in one callback. µs per waiter from that callback to the last one resumed."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[None]] = [loop.create_future() for _ in range(waiters)]
    resumed = [0.0] * waiters
    remaining = waiters
    everyone: asyncio.Future[None] = loop.create_future()
    released_at = 0.0

    async def caller(i: int) -> None:
        nonlocal remaining
        await futures[i]
        resumed[i] = time.perf_counter()
        remaining -= 1
        if remaining == 0:
            everyone.set_result(None)

    def release() -> None:
        nonlocal released_at
        released_at = time.perf_counter()
        for future in futures:
            future.set_result(None)

    gc.collect()
    tasks = [loop.create_task(caller(i)) for i in range(waiters)]
    await asyncio.sleep(0)
    loop.call_soon(release)
    await everyone
    _check(all(t.done() for t in tasks), "every task must have finished")
    return (max(resumed) - released_at) / waiters * 1e6


async def bench_storm(sizes: Sizes) -> StormResults:
    out = StormResults(sizes.waiters, [], Series(), Series(), Series())
    await storm_round(min(sizes.waiters, 100))  # warm up (imports, the I/O loop, the pool)
    for round_ in range(sizes.storm_rounds):
        order = (False, True) if round_ % 2 else (True, False)
        for refresher_first in order:
            if refresher_first:
                calls, released, joined = await storm_round(sizes.waiters)
                out.provider_calls.append(calls)
                out.release_us.values.append(released)
                out.join_us.values.append(joined)
            else:
                out.floor_us.values.append(await floor_round(sizes.waiters))
    return out


# -- 3. many sessions -----------------------------------------------------------------------------


@dataclass
class SessionsResults:
    sessions: int
    max_concurrency: int
    provider_calls: list[int]
    peaks: list[int]
    wall_s: Series
    calls_per_s: Series
    round_growth_mib: Series
    rss_before_mib: float | None = None
    rss_after_mib: float | None = None


async def sessions_round(n: int, latency: float) -> tuple[int, int, float, float | None, int]:
    """``n`` distinct sessions expiring together, one caller each. Returns (provider calls,
    peak concurrent token requests, wall seconds, RSS growth MiB, max_concurrency)."""
    provider = Provider.create(latency=latency)
    sessions = [provider.login(f"user{i}") for i in range(n)]
    provider.clock.advance(EXPIRED)
    refresher = provider.refresher
    gc.collect()
    before = rss_mib()
    start = time.perf_counter()
    results = await asyncio.gather(*(refresher.ensure_fresh(s) for s in sessions))
    wall = time.perf_counter() - start
    after = rss_mib()
    calls = provider.idp.token_calls("refresh_token")
    _check(calls == n, f"{n} expiring sessions made {calls} provider calls")
    _check(provider.transport.calls == n, "the transport saw a different number of requests")
    peak = provider.transport.peak
    _check(
        peak == refresher.max_concurrency,
        f"peak of {peak} concurrent token requests, max_concurrency is {refresher.max_concurrency}",
    )
    _check(len({r.refresh_token for r in results}) == n, "every session must get its own tokens")
    _check(
        all(r.refresh_token != s.refresh_token for r, s in zip(results, sessions, strict=True)),
        "every session must be refreshed",
    )
    await provider.aclose()
    growth = after - before if after is not None and before is not None else None
    return calls, peak, wall, growth, refresher.max_concurrency


async def bench_sessions(sizes: Sizes, latency: float) -> SessionsResults:
    gc.collect()
    out = SessionsResults(sizes.sessions, 0, [], [], Series(), Series(), Series(), rss_mib())
    for _ in range(sizes.session_rounds):
        calls, peak, wall, growth, cap = await sessions_round(sizes.sessions, latency)
        out.max_concurrency = cap
        out.provider_calls.append(calls)
        out.peaks.append(peak)
        out.wall_s.values.append(wall)
        out.calls_per_s.values.append(calls / wall)
        if growth is not None:
            out.round_growth_mib.values.append(growth)
    gc.collect()
    out.rss_after_mib = rss_mib()
    return out


# -- report ---------------------------------------------------------------------------------------


def fmt_ns(ns: float) -> str:
    return f"{ns / 1000:.2f} µs" if abs(ns) >= 10_000 else f"{ns:.0f} ns"


def fmt_range(series: Series, fmt: Callable[[float], str]) -> str:
    return f"{fmt(series.low)} to {fmt(series.high)}"


def verdict(ok: bool) -> str:
    return "✅ met" if ok else "❌ missed"


@dataclass
class Report:
    command: str
    sizes: Sizes
    quick: bool
    latency: float
    fresh: FreshResults
    storm: StormResults
    sessions: SessionsResults
    peak_rss_mib: float
    rss_start_mib: float | None
    rss_end_mib: float | None
    when: str

    def environment(self) -> list[str]:
        libs = ", ".join(
            f"{name} {version_of(name)}"
            for name in ("httpx", "authlib", "httpx-auth")
            if version_of(name) is not None
        )
        return [
            f"- Date: {self.when}",
            f"- Python: {platform.python_implementation()} {platform.python_version()} "
            f"({platform.platform()}); {libs}",
            f"- Code: {code_version()}",
            f"- Machine: nproc {nproc()} ({os.cpu_count()} CPUs), {cpu_model()}",
            f"- Command (from the repository root): `{self.command}`",
            f"- Sizes: {self.sizes.calls:,} calls x {self.sizes.fresh_rounds} rounds (fresh path); "
            f"{self.sizes.waiters:,} waiters x {self.sizes.storm_rounds} rounds (storm); "
            f"{self.sizes.sessions:,} sessions x {self.sizes.session_rounds} rounds; "
            f"FakeIdP latency {self.latency * 1000:g} ms"
            + (" — **quick smoke run: sizes too small for the targets**" if self.quick else ""),
        ]

    def table(self) -> list[str]:
        lines = [
            "| # | measurement | median | range over rounds | target | |",
            "|---|---|---|---|---|---|",
        ]
        fresh = self.fresh
        for name, row in fresh.rows.items():
            note = f" ({row.note})" if row.note else ""
            lines.append(
                f"| 1 | {row.label}{note} | {fmt_ns(row.series.median)} | "
                f"{fmt_range(row.series, fmt_ns)} | | |"
            )
            if row.baseline is not None:
                net = fresh.net[name]
                target, ok = "", ""
                if row.target_ns is not None:
                    target = f"≤ {fmt_ns(row.target_ns)}"
                    ok = verdict(net.median <= row.target_ns)
                lines.append(
                    f"| 1 | ↳ net of {fresh.rows[row.baseline].label.split(' (')[0]} | "
                    f"{fmt_ns(net.median)} | {fmt_range(net, fmt_ns)} | {target} | {ok} |"
                )
        for skipped in fresh.skipped:
            lines.append(f"| 1 | {skipped} | skipped | | | |")

        storm = self.storm

        def us(x: float) -> str:
            return f"{x:.2f} µs"

        calls = sorted(set(storm.provider_calls))
        lines += [
            f"| 2 | storm: {storm.waiters:,} callers on one expiring session → provider calls | "
            f"{', '.join(map(str, calls))} (every round) | | exactly 1 | "
            f"{verdict(calls == [1])} |",
            f"| 2 | storm: release, provider response → last waiter resumed, per waiter | "
            f"{us(storm.release_us.median)} | {fmt_range(storm.release_us, us)} | "
            f"≤ {RELEASE_TARGET_US:g} µs | "
            f"{verdict(storm.release_us.median <= RELEASE_TARGET_US)} |",
            f"| 2 | ↳ bare asyncio floor: {storm.waiters:,} tasks on {storm.waiters:,} futures "
            f"set in one callback, per waiter | {us(storm.floor_us.median)} | "
            f"{fmt_range(storm.floor_us, us)} | | |",
            f"| 2 | storm: join, task created → waiting on the flight, per caller | "
            f"{us(storm.join_us.median)} | {fmt_range(storm.join_us, us)} | | |",
        ]

        s = self.sessions
        calls = sorted(set(s.provider_calls))
        peaks = sorted(set(s.peaks))

        def secs(x: float) -> str:
            return f"{x:.2f} s"

        def rate(x: float) -> str:
            return f"{x:,.0f} /s"

        def mib(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.1f} MiB"

        lines += [
            f"| 3 | {s.sessions:,} sessions expiring together → provider calls | "
            f"{', '.join(f'{c:,}' for c in calls)} (every round) | | exactly {s.sessions:,} | "
            f"{verdict(calls == [s.sessions])} |",
            f"| 3 | peak concurrent token requests at the transport | "
            f"{', '.join(map(str, peaks))} (every round) | | = max_concurrency "
            f"({s.max_concurrency}) | {verdict(peaks == [s.max_concurrency])} |",
            f"| 3 | wall time for all {s.sessions:,} | {secs(s.wall_s.median)} | "
            f"{fmt_range(s.wall_s, secs)} | | |",
            f"| 3 | throughput | {rate(s.calls_per_s.median)} | "
            f"{fmt_range(s.calls_per_s, rate)} | | |",
            f"| 3 | peak RSS of the process (`ru_maxrss`, whole run) | {mib(self.peak_rss_mib)} | "
            "| | |",
        ]
        if s.round_growth_mib.values:
            lines.append(
                f"| 3 | RSS growth during one round (VmRSS, its state still alive) | "
                f"{mib(s.round_growth_mib.median)} | "
                f"{fmt_range(s.round_growth_mib, mib)} | | |"
            )
        if s.rss_before_mib is not None and s.rss_after_mib is not None:
            lines.append(
                f"| 3 | RSS growth across part 3 (VmRSS before → after all rounds, after gc) | "
                f"{mib(s.rss_after_mib - s.rss_before_mib)} "
                f"({mib(s.rss_before_mib)} → {mib(s.rss_after_mib)}) | | | |"
            )
        if self.rss_start_mib is not None and self.rss_end_mib is not None:
            lines.append(
                f"| | RSS growth across the whole run (VmRSS at start → end, after gc) | "
                f"{mib(self.rss_end_mib - self.rss_start_mib)} "
                f"({mib(self.rss_start_mib)} → {mib(self.rss_end_mib)}) | | | |"
            )
        return lines

    def markdown(self) -> str:
        return "\n".join([*self.environment(), "", *self.table()]) + "\n"


def write_section(path: Path, report: Report) -> None:
    """Replace this script's section of ``path`` (or add it), leaving the rest alone."""
    results.write_section(path, "refresher.py", "Refresher", report.markdown())


# -- main -----------------------------------------------------------------------------------------


async def run(
    sizes: Sizes, *, compare: bool, latency: float
) -> tuple[FreshResults, StormResults, SessionsResults]:
    fresh = await bench_fresh(sizes, compare=compare)
    storm = await bench_storm(sizes)
    sessions = await bench_sessions(sizes, latency)
    return fresh, storm, sessions


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description="Benchmark the Refresher: fresh path, refresh storm, many sessions."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a fast smoke run")
    parser.add_argument("--write", action="store_true", help=f"update the section in {RESULTS_MD}")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="file for --write")
    parser.add_argument("--calls", type=int, help="fresh path: calls per measurement per round")
    parser.add_argument("--fresh-rounds", type=int)
    parser.add_argument("--waiters", type=int, help="storm: concurrent callers on one session")
    parser.add_argument("--storm-rounds", type=int)
    parser.add_argument("--sessions", type=int, help="distinct sessions expiring together")
    parser.add_argument("--session-rounds", type=int)
    parser.add_argument(
        "--idp-latency", type=float, default=0.0, help="FakeIdP latency per token request, in s"
    )
    parser.add_argument(
        "--no-compare", action="store_true", help="skip the Authlib and httpx-auth comparisons"
    )
    parser.add_argument(
        "--fail-on-miss", action="store_true", help="exit 1 if a timing target is missed"
    )
    args = parser.parse_args(args_list)

    base = QUICK if args.quick else FULL
    sizes = Sizes(
        calls=args.calls or base.calls,
        fresh_rounds=args.fresh_rounds or base.fresh_rounds,
        waiters=args.waiters or base.waiters,
        storm_rounds=args.storm_rounds or base.storm_rounds,
        sessions=args.sessions or base.sessions,
        session_rounds=args.session_rounds or base.session_rounds,
    )
    command = shlex.join(["python", "benchmarks/refresher.py", *args_list])
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rss_start = rss_mib()
    fresh, storm, sessions = asyncio.run(
        run(sizes, compare=not args.no_compare, latency=args.idp_latency)
    )
    gc.collect()
    report = Report(
        command=command,
        sizes=sizes,
        quick=args.quick,
        latency=args.idp_latency,
        fresh=fresh,
        storm=storm,
        sessions=sessions,
        peak_rss_mib=peak_rss_mib(),
        rss_start_mib=rss_start,
        rss_end_mib=rss_mib(),
        when=when,
    )
    print(report.markdown())
    if args.write:
        write_section(args.results, report)
        print(f"wrote {args.results}")
    missed = (
        fresh.net["ensure_fresh"].median > FRESH_TARGET_NS
        or storm.release_us.median > RELEASE_TARGET_US
    )
    return 1 if missed and args.fail_on_miss else 0


if __name__ == "__main__":
    raise SystemExit(main())
