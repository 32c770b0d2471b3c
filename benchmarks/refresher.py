"""Benchmarks of the Refresher: the fresh-token path, a refresh storm, many sessions at once.

Run from the repository root::

    python benchmarks/refresher.py            # full sizes, prints a markdown table
    python benchmarks/refresher.py --quick    # small sizes: a smoke run of every measurement
    python benchmarks/refresher.py --write    # also write the section in benchmarks/RESULTS.md

What each part measures, and how: benchmarks/README.md. Performance targets live here, never as
timing assertions in tests; correctness is asserted even here (one provider call per storm, N for
N sessions, never more than ``max_concurrency`` in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import operator
import re
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import common  # this directory is on sys.path when a benchmark runs
import httpx
from common import EXPIRED, ISSUER, RecordingTransport, Series, check, row, table, verdict

from asgi_token_refresh import OAuth2Client, Refresher, TokenParams, TokenSet
from asgi_token_refresh.testing import FakeClock, FakeIdP

FRESH_TARGET_NS = 1_000.0  # the refresher's own cost on the fresh path
RELEASE_TARGET_US = 15.0  # per waiter, from the provider's response to the last waiter resumed


@dataclass(frozen=True)
class Sizes:
    calls: int
    fresh_rounds: int
    waiters: int
    storm_rounds: int
    sessions: int
    session_rounds: int


SIZES = {
    "calls": "fresh path: calls per measurement per round",
    "fresh_rounds": "fresh path: rounds",
    "waiters": "storm: concurrent callers on one session",
    "storm_rounds": "storm: rounds",
    "sessions": "distinct sessions expiring together",
    "session_rounds": "sessions: rounds",
}
FULL = Sizes(
    calls=100_000, fresh_rounds=9, waiters=10_000, storm_rounds=7, sessions=10_000, session_rounds=3
)
QUICK = Sizes(
    calls=2_000, fresh_rounds=3, waiters=500, storm_rounds=2, sessions=200, session_rounds=1
)


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
        client = common.client(transport, clock)
        return cls(clock, idp, transport, client, Refresher(client, jitter=0))

    def login(self, subject: str = "alice") -> TokenSet:
        return common.login(self.idp, self.clock, subject)

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


Runner = Callable[[int], Awaitable[float]]  # ns per call, over that many calls


@dataclass
class FreshRow:
    label: str
    run: Runner
    baseline: str | None = None  # key of the baseline row this one is net of
    target_ns: float | None = None
    note: str = ""
    series: Series = field(default_factory=Series)


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
    check(not token.is_expired(leeway=client.leeway), "the Authlib token must be fresh")

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
    client = common.client()
    refresher = Refresher(client, jitter=0)
    now = time.time()
    token_set = TokenSet(
        access_token="at", refresh_token="rt", issued_at=now, expires_at=now + 3600
    )
    check(not refresher.refresh_due(token_set), "the token set must be fresh")
    baseline = Baseline()
    check(await refresher.ensure_fresh(token_set) is token_set, "fresh path must return as is")

    rows = {
        "ensure_fresh": FreshRow(
            "`await refresher.ensure_fresh(ts)`",
            lambda n: time_ensure_fresh(refresher, token_set, n),
            "noop_async",
            FRESH_TARGET_NS,
        ),
        "noop_async": FreshRow(
            "`await noop.ensure_fresh(ts)` (baseline)",
            lambda n: time_ensure_fresh(baseline, token_set, n),
        ),
        "refresh_due": FreshRow(
            "`refresher.refresh_due(ts)`",
            lambda n: time_refresh_due(refresher, token_set, n),
            "noop_sync",
        ),
        "noop_sync": FreshRow(
            "`noop.refresh_due(ts)` (baseline)", lambda n: time_refresh_due(baseline, token_set, n)
        ),
    }
    skipped: list[str] = []
    cleanups: list[Callable[[], Awaitable[None]]] = [client.aclose]
    if compare:
        if authlib := await _authlib_runner(skipped, cleanups):
            version = common.version_of("authlib")
            rows["authlib"] = FreshRow(
                f"Authlib {version} `await client.ensure_active_token(token)`",
                authlib,
                "noop_async",
            )
        if httpx_auth := _httpx_auth_runners(skipped):
            version = common.version_of("httpx-auth")
            rows["httpx_auth_flow"] = FreshRow(
                f"httpx-auth {version} `OAuth2ClientCredentials.auth_flow` (one request)",
                httpx_auth[0],
                "noop_sync",
                note="sync; includes setting the Authorization header",
            )
            rows["httpx_auth_lookup"] = FreshRow(
                f"httpx-auth {version} `OAuth2.token_cache.get_token(key)`",
                httpx_auth[1],
                "noop_sync",
                note="sync; the cached-token lookup alone",
            )

    for measured in rows.values():  # warm up: first calls, caches, specialisation
        await measured.run(min(sizes.calls, 10_000))
    gc.collect()
    gc.disable()  # as timeit does: a collection mid-loop is noise, not the code's cost
    try:
        for round_ in range(sizes.fresh_rounds):
            for measured in common.rotated(list(rows.values()), round_):
                measured.series.values.append(await measured.run(sizes.calls))
    finally:
        gc.enable()
    for cleanup in cleanups:
        await cleanup()

    net = {
        name: common.pairwise(measured.series, rows[measured.baseline].series, operator.sub)
        for name, measured in rows.items()
        if measured.baseline is not None
    }
    return FreshResults(rows, net, skipped)


# -- 2. the storm ---------------------------------------------------------------------------------


@dataclass
class StormResults:
    waiters: int
    provider_calls: list[int]
    release_us: Series  # per waiter
    floor_us: Series  # per waiter, bare asyncio
    join_us: Series  # per caller: task creation up to waiting on the flight


async def storm_round(waiters: int, gc_off: bool = False) -> tuple[int, float, float]:
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
    if gc_off:  # --storm-gc-off: without the collector's share (a full one costs ~25 ms)
        gc.disable()
    start = time.perf_counter()
    tasks = [loop.create_task(caller(i)) for i in range(waiters)]
    await asyncio.sleep(0)  # every task runs up to its wait on the (one) flight
    joined = time.perf_counter()
    await gate.arrived(1)
    check(remaining == waiters, "no caller may finish before the provider answers")
    gate.release()
    await everyone
    calls = provider.idp.token_calls("refresh_token")
    check(calls == 1, f"a storm on one session made {calls} provider calls, not 1")
    check(provider.transport.calls == 1, "the transport saw more than one token request")
    first = results[0]
    check(first is not None and first.refresh_token != session.refresh_token, "not refreshed")
    check(all(r is first for r in results), "every waiter must get the same token set")
    check(all(t.done() for t in tasks), "every task must have finished")
    gc.enable()
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
    check(all(t.done() for t in tasks), "every task must have finished")
    return (max(resumed) - released_at) / waiters * 1e6


async def bench_storm(sizes: Sizes, gc_off: bool = False) -> StormResults:
    out = StormResults(sizes.waiters, [], Series(), Series(), Series())
    await storm_round(min(sizes.waiters, 100))  # warm up (imports, the I/O loop, the pool)
    for round_ in range(sizes.storm_rounds):
        for refresher in common.rotated([True, False], round_):
            if refresher:
                calls, released, joined = await storm_round(sizes.waiters, gc_off)
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
    check(calls == n, f"{n} expiring sessions made {calls} provider calls")
    check(provider.transport.calls == n, "the transport saw a different number of requests")
    peak = provider.transport.peak
    check(
        peak == refresher.max_concurrency,
        f"peak of {peak} concurrent token requests, max_concurrency is {refresher.max_concurrency}",
    )
    check(len({r.refresh_token for r in results}) == n, "every session must get its own tokens")
    check(
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


def ns(x: float) -> str:
    return f"{x / 1000:.2f} µs" if abs(x) >= 10_000 else f"{x:.0f} ns"


def us(x: float) -> str:
    return f"{x:.2f} µs"


def secs(x: float) -> str:
    return f"{x:.2f} s"


def rate(x: float) -> str:
    return f"{x:,.0f} /s"


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} MiB"


def growth(before: float | None, after: float | None) -> str | None:
    if before is None or after is None:
        return None
    return f"{mib(after - before)} ({mib(before)} → {mib(after)})"


@dataclass
class Report:
    run: common.Run
    sizes: Sizes
    fresh: FreshResults
    storm: StormResults
    sessions: SessionsResults
    peak_rss_mib: float
    rss_start_mib: float | None
    rss_end_mib: float | None

    def markdown(self) -> str:
        z = self.sizes
        environment = self.run.environment(
            ["httpx", "authlib", "httpx-auth"],
            f"{z.calls:,} calls x {z.fresh_rounds} rounds (fresh path); "
            f"{z.waiters:,} waiters x {z.storm_rounds} rounds (storm); "
            f"{z.sessions:,} sessions x {z.session_rounds} rounds; "
            f"FakeIdP latency {self.run.args.idp_latency * 1000:g} ms",
        )
        lines = table("#", "measurement", "median", "range over rounds", "target", "")

        def add(part: object, what: str, value: str, spread: str = "", *verdict_: str) -> None:
            lines.append(row(part, what, value, spread, *(verdict_ or ("", ""))))

        fresh = self.fresh
        for name, measured in fresh.rows.items():
            note = f" ({measured.note})" if measured.note else ""
            add(1, measured.label + note, *measured.series.cells(ns))
            if measured.baseline is not None:
                net, target = fresh.net[name], measured.target_ns
                baseline = fresh.rows[measured.baseline].label.split(" (")[0]
                met = () if target is None else (f"≤ {ns(target)}", verdict(net.median <= target))
                add(1, f"↳ net of {baseline}", *net.cells(ns), *met)
        for skipped in fresh.skipped:
            add(1, skipped, "skipped")

        st, n = self.storm, f"{self.storm.waiters:,}"
        calls = sorted(set(st.provider_calls))
        add(
            2,
            f"storm: {n} callers on one expiring session → provider calls",
            f"{', '.join(map(str, calls))} (every round)",
            "",
            "exactly 1",
            verdict(calls == [1]),
        )
        add(
            2,
            "storm: release, provider response → last waiter resumed, per waiter",
            *st.release_us.cells(us),
            f"≤ {RELEASE_TARGET_US:g} µs",
            verdict(st.release_us.median <= RELEASE_TARGET_US),
        )
        add(
            2,
            f"↳ bare asyncio floor: {n} tasks on {n} futures set in one callback, per waiter",
            *st.floor_us.cells(us),
        )
        add(
            2,
            "storm: join, task created → waiting on the flight, per caller",
            *st.join_us.cells(us),
        )

        s, n = self.sessions, f"{self.sessions.sessions:,}"
        calls, peaks = sorted(set(s.provider_calls)), sorted(set(s.peaks))
        add(
            3,
            f"{n} sessions expiring together → provider calls",
            f"{', '.join(f'{c:,}' for c in calls)} (every round)",
            "",
            f"exactly {n}",
            verdict(calls == [s.sessions]),
        )
        add(
            3,
            "peak concurrent token requests at the transport",
            f"{', '.join(map(str, peaks))} (every round)",
            "",
            f"= max_concurrency ({s.max_concurrency})",
            verdict(peaks == [s.max_concurrency]),
        )
        add(3, f"wall time for all {n}", *s.wall_s.cells(secs))
        add(3, "throughput", *s.calls_per_s.cells(rate))
        add(3, "peak RSS of the process (`ru_maxrss`, whole run)", mib(self.peak_rss_mib))
        if s.round_growth_mib.values:
            add(
                3,
                "RSS growth during one round (VmRSS, its state still alive)",
                *s.round_growth_mib.cells(mib),
            )
        if part3 := growth(s.rss_before_mib, s.rss_after_mib):
            add(3, "RSS growth across part 3 (VmRSS before → after all rounds, after gc)", part3)
        if whole := growth(self.rss_start_mib, self.rss_end_mib):
            add("", "RSS growth across the whole run (VmRSS at start → end, after gc)", whole)
        return "\n".join([*environment, "", *lines]) + "\n"


# -- main -----------------------------------------------------------------------------------------


async def run(
    sizes: Sizes, *, compare: bool, latency: float, storm_gc_off: bool
) -> tuple[FreshResults, StormResults, SessionsResults]:
    fresh = await bench_fresh(sizes, compare=compare)
    storm = await bench_storm(sizes, storm_gc_off)
    sessions = await bench_sessions(sizes, latency)
    return fresh, storm, sessions


def main(argv: Sequence[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--idp-latency", type=float, default=0.0, help="FakeIdP latency per token request, in s"
        )
        parser.add_argument(
            "--no-compare", action="store_true", help="skip the Authlib and httpx-auth comparisons"
        )
        parser.add_argument(
            "--fail-on-miss", action="store_true", help="exit 1 if a timing target is missed"
        )
        parser.add_argument(
            "--storm-gc-off",
            action="store_true",
            help="storm: keep the garbage collector off during each round (where a full "
            "collection lands depends on allocation counts, not on the code under test)",
        )

    run_ = common.parse(
        "refresher.py",
        "Benchmark the Refresher: fresh path, refresh storm, many sessions.",
        argv,
        SIZES,
        add_arguments,
    )
    args = run_.args
    sizes = common.sizes(args, FULL, QUICK)
    rss_start = rss_mib()
    fresh, storm, sessions = asyncio.run(
        run(
            sizes,
            compare=not args.no_compare,
            latency=args.idp_latency,
            storm_gc_off=args.storm_gc_off,
        )
    )
    gc.collect()
    report = Report(run_, sizes, fresh, storm, sessions, peak_rss_mib(), rss_start, rss_mib())
    common.publish(run_, "Refresher", report.markdown())
    missed = (
        fresh.net["ensure_fresh"].median > FRESH_TARGET_NS
        or storm.release_us.median > RELEASE_TARGET_US
    )
    return 1 if missed and args.fail_on_miss else 0


if __name__ == "__main__":
    raise SystemExit(main())
