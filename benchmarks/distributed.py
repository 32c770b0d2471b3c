"""Benchmarks of coordination across processes through Redis: round trips, latency, workers.

Run from the repository root::

    python benchmarks/distributed.py            # full sizes; starts a private redis-server
    python benchmarks/distributed.py --quick    # small sizes: a smoke run of every measurement
    python benchmarks/distributed.py --write    # also write its section in benchmarks/RESULTS.md
    python benchmarks/distributed.py --redis-url redis://127.0.0.1:6379/0   # an existing server

1. **Round trips per flight.** Two Refreshers, each with its own OAuth2Client and its own
   RedisCoordinator (own connection pool and pub/sub listener), share one FakeIdP: two
   processes in all but the I/O thread. MONITOR attributes every command to the connection
   that sent it (by client name), so a leader's and a follower's round trips are counted apart,
   and the commands run inside Lua scripts are counted separately. The same is done for whole
   requests through TokenRefreshMiddleware with RedisSessionStore, and for a burst of
   fresh-path calls. On a private server, ``INFO commandstats`` deltas cross-check the totals.
2. **Release latency.** From the leader's provider response (as the transport sees it) to a
   waiting caller resuming: a caller in another process (RedisCoordinator) vs a caller joined
   to the flight in the same process (LocalCoordinator). Interleaved rounds, medians.
3. **Workers.** A refresh storm over HTTP on uvicorn with 4 worker processes vs 1, with
   RedisCoordinator and RedisSessionStore, against a FakeIdP in its own process. Every round
   writes new sessions with expired access tokens to Redis, then a load generator (raw
   keep-alive sockets, so the client costs little) sends every session's requests at once.
   Each storm must make exactly one provider call per session, with no grant revoked; then the
   same requests again take the fresh path and must make none.

Correctness is asserted in every mode (never timings): one provider call per flight or
session, every response 200, every waiter given the same token set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import json
import multiprocessing
import os
import platform
import random
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import redis
import results  # this directory is on sys.path when a benchmark runs
from refresher import (  # the refresher benchmark's helpers (this directory is on sys.path)
    RecordingTransport,
    Series,
    code_version,
    cpu_model,
    nproc,
    version_of,
)
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_token_refresh import (
    LocalCoordinator,
    OAuth2Client,
    Refresher,
    TokenRefreshMiddleware,
    TokenSet,
)
from asgi_token_refresh._coordination import Published
from asgi_token_refresh.redis import RedisCoordinator, RedisSessionStore
from asgi_token_refresh.testing import FakeClock, FakeIdP

ISSUER = "https://idp.test"
EXPIRED = 300.0  # FakeIdP's default access-token lifetime: advancing this far makes tokens due
BENCHMARKS = Path(__file__).resolve().parent
RESULTS_MD = BENCHMARKS / "RESULTS.md"

LEADER_TARGET = 3  # Redis round trips per flight
FOLLOWER_TARGET = 2  # plus the pub/sub wake-up
# Commands a new connection sends before its first real one (redis-py 5 to 8).
SETUP_COMMANDS = frozenset({"HELLO", "CLIENT", "AUTH", "SELECT", "PING"})


@dataclass(frozen=True)
class Sizes:
    flights: int  # part 1: measured flights of each kind
    fresh_calls: int  # part 1: fresh-path calls in the burst
    latency_rounds: int  # part 2
    sessions: int  # part 3: sessions per storm
    per_session: int  # part 3: requests per session, sent together
    connections: int  # part 3: keep-alive connections of the load generator
    worker_rounds: int  # part 3: rounds per worker count


FULL = Sizes(
    flights=5,
    fresh_calls=10_000,
    latency_rounds=41,
    sessions=400,
    per_session=16,
    connections=256,
    worker_rounds=5,
)
QUICK = Sizes(
    flights=1,
    fresh_calls=200,
    latency_rounds=3,
    sessions=12,
    per_session=6,
    connections=12,
    worker_rounds=1,
)


def _check(condition: bool, message: str) -> None:
    """An assertion that ``python -O`` does not strip."""
    if not condition:
        raise AssertionError(message)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- Redis ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of our own on a free loopback port, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed; pass --redis-url to use another server")
    port = _free_port()
    process = subprocess.Popen(  # noqa: S603 - a fixed command line
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def delete_prefix(url: str, prefix: str) -> None:
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


def command_calls(client: redis.Redis) -> Counter[str]:
    """``INFO commandstats`` as calls per command (commands inside scripts included)."""
    stats: dict[str, Any] = client.info("commandstats")
    calls: Counter[str] = Counter()
    for name, values in stats.items():
        command = name.removeprefix("cmdstat_")
        if command.split("|")[0] not in ("info", "monitor", "echo", "client", "hello"):
            calls[command] = int(values["calls"])
    return calls


@dataclass
class Seen:
    """What MONITOR saw one named client send."""

    commands: list[str] = field(default_factory=list)  # top level: one round trip each
    in_scripts: list[str] = field(default_factory=list)  # run by that client's scripts
    setup: list[str] = field(default_factory=list)  # connection setup (HELLO, SETNAME...)

    @property
    def round_trips(self) -> int:
        return len(self.commands)


class Monitor:
    """MONITOR on a background thread, between ``with`` and its end; ``seen`` by client name.

    Commands a script runs follow its EVAL in the stream (Redis is single-threaded), so they
    are charged to the client that sent the EVAL.
    """

    def __init__(self, url: str, names: Sequence[str]) -> None:
        self.url = url
        self.names = set(names)
        self.lines: list[dict[str, Any]] = []
        self._marker = "atr-bench-" + secrets.token_hex(8)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = redis.Redis.from_url(url)
        self.events: list[tuple[str, str, str]] = []  # (client name, kind, what), in order

    def __enter__(self) -> Monitor:
        self._ports = {
            c["addr"].rsplit(":", 1)[1]: c["name"] for c in self._client.client_list() if c["name"]
        }
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 5
        while not self._ready.is_set():  # MONITOR is on once it echoes our marker
            self._client.echo(self._marker + "-ready")
            self._ready.wait(0.05)
            _check(time.monotonic() < deadline, "MONITOR did not start")
        return self

    def _run(self) -> None:
        with redis.Redis.from_url(self.url).monitor() as monitor:  # type: ignore[no-untyped-call]
            for line in monitor.listen():
                command = str(line.get("command", ""))
                if command.startswith(f"ECHO {self._marker}-ready"):
                    self._ready.set()
                    continue
                if command.startswith(f"ECHO {self._marker}-stop"):
                    return
                if self._ready.is_set():
                    self.lines.append(line)

    def __exit__(self, *exc: object) -> None:
        self._client.echo(self._marker + "-stop")
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._client.close()
        self._attribute()

    def _attribute(self) -> None:
        ports = dict(self._ports)
        for line in self.lines:  # connections opened during the measurement name themselves
            words = str(line["command"]).split()
            if words[:2] == ["CLIENT", "SETNAME"] and len(words) > 2:
                ports[str(line.get("client_port"))] = words[2]
        current: str | None = None
        for line in self.lines:
            words = str(line["command"]).split()
            verb = words[0].upper() if words else ""
            if line.get("client_type") == "lua":
                if current is not None:
                    self.events.append((current, "script", verb))
                continue
            current = ports.get(str(line.get("client_port")))
            if current not in self.names:
                current = None
            elif verb in SETUP_COMMANDS:
                self.events.append((current, "setup", " ".join(words[:2])))
            else:
                self.events.append((current, "command", _describe(words)))

    def of(self, *names: str) -> Seen:
        """What the named clients sent, in the order Redis ran it."""
        seen = Seen()
        for name, kind, what in self.events:
            if name in names:
                {"command": seen.commands, "script": seen.in_scripts, "setup": seen.setup}[
                    kind
                ].append(what)
        return seen


# The library's scripts, recognised by their first line.
_SCRIPTS = {
    "local published = redis.call('GET', KEYS[2])": "claim",
    "redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])": "publish",
    "if redis.call('GET', KEYS[1]) == ARGV[1] then": "release/renew",
    "local current = tonumber(redis.call('HGET', KEYS[1], 'generation'))": "store session",
    "local current = redis.call('HGET', KEYS[1], 'generation')": "store session",
}


def _describe(words: list[str]) -> str:
    verb = words[0].upper()
    if verb in ("EVAL", "EVALSHA"):
        text = " ".join(words[1:]).replace("\\n", "\n").strip().strip('"').strip()
        first = text.splitlines()[0].strip() if text else ""
        return f"EVAL ({_SCRIPTS.get(first, 'script')})"
    return verb


# -- part 1: round trips --------------------------------------------------------------------------


class WatchedCoordinator(RedisCoordinator):
    """A RedisCoordinator that shows when a caller is parked in ``wait`` (its claim came back
    "someone else leads") and counts lookups (a follower woken by pub/sub makes one)."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.waiting = 0
        self.lookups = 0

    async def wait(self, key: str, timeout: float) -> Published | None:  # noqa: ASYNC109
        self.waiting += 1
        try:
            return await super().wait(key, timeout)
        finally:
            self.waiting -= 1

    async def lookup(self, key: str) -> Published | None:
        self.lookups += 1
        return await super().lookup(key)


@dataclass
class Process:
    """One simulated process: its own client, RedisCoordinator and Refresher."""

    name: str
    transport: RecordingTransport
    client: OAuth2Client
    coordinator: WatchedCoordinator
    refresher: Refresher

    async def aclose(self) -> None:
        await self.coordinator.aclose()
        await self.client.aclose()


def make_process(
    name: str, idp: FakeIdP, clock: FakeClock, url: str, prefix: str, secret: str
) -> Process:
    transport = RecordingTransport(idp.transport())
    client = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=transport,
        clock=clock,
    )
    coordinator = WatchedCoordinator(
        url, secret_keys=[secret], prefix=prefix, redis_options={"client_name": name}
    )
    refresher = Refresher(client, jitter=0, coordinator=coordinator)
    return Process(name, transport, client, coordinator, refresher)


def login(idp: FakeIdP, clock: FakeClock, subject: str = "alice") -> TokenSet:
    return TokenSet.from_token_response(
        idp.issue(subject), issued_at=clock.time(), default_lifetime=3600.0
    )


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        _check(time.monotonic() < deadline, f"timed out waiting until {what}")
        await asyncio.sleep(0.001)


def following(process: Process) -> bool:
    """Whether a caller of ``process`` is parked on another process's flight."""
    return process.coordinator.waiting > 0


async def two_process_flight(
    idp: FakeIdP, clock: FakeClock, leader: Process, follower: Process
) -> tuple[TokenSet, TokenSet]:
    """One session, due; ``leader`` calls the provider and ``follower`` waits for its result."""
    session = login(idp, clock)
    clock.advance(EXPIRED)
    before = idp.token_calls("refresh_token")
    gate = idp.pause_token_endpoint()
    led = asyncio.ensure_future(leader.refresher.ensure_fresh(session))
    await gate.arrived(1)
    followed = asyncio.ensure_future(follower.refresher.ensure_fresh(session))
    await until(lambda: following(follower), "the follower waits")
    gate.release()
    results = await asyncio.gather(led, followed)
    _check(idp.token_calls("refresh_token") == before + 1, "a flight made more than one call")
    _check(results[0] == results[1], "leader and follower got different token sets")
    _check(results[0].refresh_token != session.refresh_token, "not refreshed")
    return results[0], results[1]


@dataclass
class RoundTrips:
    leader: list[Seen]
    follower: list[Seen]
    alone: list[Seen]  # a leader without followers
    fresh_calls: int
    fresh: Seen
    requests: dict[str, list[Seen]]  # through the middleware, by kind
    commandstats: list[tuple[int, int]]  # (INFO commandstats delta, MONITOR total) per flight
    private_server: bool


def worker_app_in_process(
    idp: FakeIdP, refresher: Refresher, store: RedisSessionStore
) -> Starlette:
    async def token(request: Request) -> PlainTextResponse:
        return PlainTextResponse(await request.state.token.get())

    async def do_login(request: Request) -> PlainTextResponse:
        await request.state.token.login(idp.issue())
        return PlainTextResponse("welcome")

    return Starlette(
        routes=[Route("/token", token), Route("/login", do_login)],
        middleware=[Middleware(TokenRefreshMiddleware, refresher=refresher, store=store)],
    )


async def bench_round_trips(
    sizes: Sizes, url: str, prefix: str, secret: str, private_server: bool
) -> RoundTrips:
    clock = FakeClock()
    idp = FakeIdP(issuer=ISSUER, clock=clock)
    tag = secrets.token_hex(4)
    names = {role: f"atr-bench-{tag}-{role}" for role in ("a", "b", "store-a", "store-b")}
    a = make_process(names["a"], idp, clock, url, prefix, secret)
    b = make_process(names["b"], idp, clock, url, prefix, secret)
    stores = {
        key: RedisSessionStore(
            url,
            secret_keys=[secret],
            prefix=prefix,
            secure=False,
            redis_options={"client_name": names[f"store-{key}"]},
        )
        for key in ("a", "b")
    }
    raw = redis.Redis.from_url(url)
    out = RoundTrips([], [], [], sizes.fresh_calls, Seen(), {}, [], private_server)
    try:
        # Warm up: connections, pub/sub listeners, both directions.
        for leader, follower in ((a, b), (b, a), (a, b)):
            await two_process_flight(idp, clock, leader, follower)

        for _ in range(sizes.flights):
            before = command_calls(raw)
            with Monitor(url, [a.name, b.name]) as monitor:
                await two_process_flight(idp, clock, a, b)
            after = command_calls(raw)
            out.leader.append(monitor.of(a.name))
            out.follower.append(monitor.of(b.name))
            both = monitor.of(a.name, b.name)
            delta = sum((after - before).values())
            out.commandstats.append((delta, len(both.commands) + len(both.in_scripts)))

            session = login(idp, clock)
            clock.advance(EXPIRED)
            with Monitor(url, [a.name, b.name]) as monitor:
                await a.refresher.ensure_fresh(session)
            out.alone.append(monitor.of(a.name, b.name))

        # The fresh path: no Redis at all.
        fresh = [login(idp, clock, f"fresh{i}") for i in range(50)]
        with Monitor(url, [a.name, b.name]) as monitor:
            for i in range(sizes.fresh_calls):
                process = a if i % 2 else b
                result = await process.refresher.ensure_fresh(fresh[i % len(fresh)])
                _check(result is fresh[i % len(fresh)], "a fresh token set must come back as is")
        out.fresh = monitor.of(a.name, b.name)

        # Whole requests through the middleware, each worker with its own RedisSessionStore.
        apps = {
            "a": worker_app_in_process(idp, a.refresher, stores["a"]),
            "b": worker_app_in_process(idp, b.refresher, stores["b"]),
        }
        transports = {k: httpx.ASGITransport(app=app) for k, app in apps.items()}
        async with (
            httpx.AsyncClient(transport=transports["a"], base_url="http://app.test") as on_a,
            httpx.AsyncClient(transport=transports["b"], base_url="http://app.test") as on_b,
        ):
            kinds: dict[str, list[Seen]] = {
                "fresh": [],
                "leader": [],
                "follower": [],
            }
            for _ in range(sizes.flights + 1):  # the first one warms up the stores
                await on_a.get("/login")
                on_b.cookies.set("atr_sid", on_a.cookies["atr_sid"], domain="app.test")
                watched = [a.name, b.name, names["store-a"], names["store-b"]]
                with Monitor(url, watched) as monitor:
                    response = await on_a.get("/token")
                _check(response.status_code == 200, "a fresh request failed")
                kinds["fresh"].append(monitor.of(*watched))

                clock.advance(EXPIRED)
                calls = idp.token_calls("refresh_token")
                gate = idp.pause_token_endpoint()
                with Monitor(url, watched) as monitor:
                    led = asyncio.ensure_future(on_a.get("/token"))
                    await gate.arrived(1)
                    followed = asyncio.ensure_future(on_b.get("/token"))
                    await until(lambda: following(b), "the follower request waits")
                    gate.release()
                    responses = await asyncio.gather(led, followed)
                _check([r.status_code for r in responses] == [200, 200], "a request failed")
                _check(responses[0].text == responses[1].text, "the two requests disagree")
                _check(idp.token_calls("refresh_token") == calls + 1, "more than one refresh")
                kinds["leader"].append(monitor.of(a.name, names["store-a"]))
                kinds["follower"].append(monitor.of(b.name, names["store-b"]))
            out.requests = {kind: seen[1:] for kind, seen in kinds.items()}
    finally:
        idp.close()
        raw.close()
        for process in (a, b):
            await process.aclose()
        for store in stores.values():
            await store.aclose()
    return out


# -- part 2: release latency ----------------------------------------------------------------------


@dataclass
class Latency:
    rounds: int
    local_joiner_us: Series
    redis_leader_us: Series  # the leader's own caller, which waits for the publish
    redis_follower_us: Series  # the caller in the other process
    redis_ping_us: Series  # one redis-py round trip on the I/O loop, for reference
    added_us: Series  # redis follower minus local joiner, per round


async def local_round(
    idp: FakeIdP, clock: FakeClock, process: Refresher, transport: RecordingTransport
) -> float:
    """Two callers on one due session in one process: µs from the provider's response to the
    joiner resuming."""
    session = login(idp, clock)
    clock.advance(EXPIRED)
    gate = idp.pause_token_endpoint()
    resumed: list[float] = []

    async def caller() -> TokenSet:
        result = await process.ensure_fresh(session)
        resumed.append(time.perf_counter())
        return result

    led = asyncio.ensure_future(caller())
    await gate.arrived(1)
    joined = asyncio.ensure_future(caller())
    await asyncio.sleep(0)  # the joiner reaches the flight
    gate.release()
    results = await asyncio.gather(led, joined)
    _check(results[0] is results[1], "the joiner must get the leader's token set")
    return (max(resumed) - transport.responded_at[-1]) * 1e6


class _NoProvider(httpx.AsyncBaseTransport):
    """The follower process must never reach the provider."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError("the follower process called the provider")


def follower_process(conn: Connection, url: str, prefix: str, secret: str) -> None:
    """A second OS process with its own Refresher and RedisCoordinator. For each token set it
    receives (with the leader's clock reading), it calls ``ensure_fresh``, says when it is
    waiting on the leader's flight, and reports ``time.perf_counter()`` when it resumed (the
    monotonic clock, the same in every process on Linux)."""

    async def serve() -> None:
        clock = FakeClock()
        client = OAuth2Client(
            client_id="app",
            client_secret="app-secret",
            token_endpoint=f"{ISSUER}/token",
            transport=_NoProvider(),
            clock=clock,
        )
        coordinator = WatchedCoordinator(url, secret_keys=[secret], prefix=prefix)
        refresher = Refresher(client, jitter=0, coordinator=coordinator)
        try:
            while (message := await asyncio.to_thread(conn.recv)) is not None:
                document, now = message
                clock.advance(max(0.0, now - clock.time()))
                flight = asyncio.ensure_future(refresher.ensure_fresh(TokenSet.from_dict(document)))

                def parked(flight: asyncio.Future[TokenSet] = flight) -> bool:
                    return coordinator.waiting > 0 or flight.done()

                await until(parked, "the follower waits")
                conn.send("waiting")
                lookups = coordinator.lookups
                result = await flight
                resumed = time.perf_counter()
                conn.send((resumed, result.access_token, coordinator.lookups - lookups))
        finally:
            await coordinator.aclose()
            await client.aclose()

    asyncio.run(serve())


async def redis_round(
    idp: FakeIdP, clock: FakeClock, leader: Process, follower: Connection
) -> tuple[float, float]:
    """µs from the leader's provider response to its own caller resuming, and to the caller in
    the follower process resuming."""
    session = login(idp, clock)
    clock.advance(EXPIRED)
    gate = idp.pause_token_endpoint()
    resumed = 0.0

    async def caller() -> TokenSet:
        nonlocal resumed
        result = await leader.refresher.ensure_fresh(session)
        resumed = time.perf_counter()
        return result

    led = asyncio.ensure_future(caller())
    await gate.arrived(1)
    follower.send((session.to_dict(), clock.time()))
    _check(await asyncio.to_thread(follower.recv) == "waiting", "the follower did not wait")
    gate.release()
    result = await led
    follower_resumed, follower_token, lookups = await asyncio.to_thread(follower.recv)
    _check(follower_token == result.access_token, "the follower must get the leader's tokens")
    # 1: woken by pub/sub, then one lookup; 0: it polled and found the result (a message can
    # be missed while the listener is still subscribing, e.g. on a loaded machine).
    _check(lookups <= 1, "the follower looked the result up more than once")
    responded = leader.transport.responded_at[-1]
    return (resumed - responded) * 1e6, (follower_resumed - responded) * 1e6


async def redis_ping_us(coordinator: RedisCoordinator, n: int = 200) -> float:
    """Median µs of a PING from the I/O loop through the coordinator's own client."""
    from asgi_token_refresh._ioloop import io_loop

    async def pings() -> float:
        client = coordinator._redis.client()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await client.ping()
            times.append(time.perf_counter() - start)
        times.sort()
        return times[len(times) // 2] * 1e6

    return await io_loop.run(pings())


async def bench_latency(sizes: Sizes, url: str, prefix: str, secret: str) -> Latency:
    clock = FakeClock()
    idp = FakeIdP(issuer=ISSUER, clock=clock)
    leader = make_process(f"atr-bench-lat-{secrets.token_hex(4)}", idp, clock, url, prefix, secret)
    local_transport = RecordingTransport(idp.transport())
    local_client = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=local_transport,
        clock=clock,
    )
    local = Refresher(local_client, jitter=0, coordinator=LocalCoordinator())
    out = Latency(sizes.latency_rounds, Series(), Series(), Series(), Series(), Series())
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=follower_process, args=(theirs, url, prefix, secret))
    child.start()
    try:
        for _ in range(3):  # warm up
            await local_round(idp, clock, local, local_transport)
            await redis_round(idp, clock, leader, ours)
        for round_ in range(sizes.latency_rounds):
            gc.collect()
            order = (True, False) if round_ % 2 else (False, True)
            local_us = leader_us = follower_us = 0.0
            for use_redis in order:
                if use_redis:
                    leader_us, follower_us = await redis_round(idp, clock, leader, ours)
                else:
                    local_us = await local_round(idp, clock, local, local_transport)
            out.local_joiner_us.values.append(local_us)
            out.redis_leader_us.values.append(leader_us)
            out.redis_follower_us.values.append(follower_us)
            out.added_us.values.append(follower_us - local_us)
            if round_ % 10 == 0:
                out.redis_ping_us.values.append(await redis_ping_us(leader.coordinator))
    finally:
        ours.send(None)
        child.join(timeout=10)
        if child.is_alive():
            child.terminate()
            child.join()
        idp.close()
        await leader.aclose()
        await local_client.aclose()
    return out


# -- part 3: worker processes ---------------------------------------------------------------------
#
# The FakeIdP and the worker app run in processes of their own, started with uvicorn:
#   uvicorn --factory --app-dir benchmarks distributed:idp_app
#   uvicorn --factory --app-dir benchmarks distributed:worker_app --workers N
# configured by these environment variables.

ENV_IDP = "ATR_BENCH_IDP_URL"
ENV_REDIS = "ATR_BENCH_REDIS_URL"
ENV_PREFIX = "ATR_BENCH_PREFIX"
ENV_SECRET = "ATR_BENCH_SECRET"
ENV_LATENCY = "ATR_BENCH_IDP_LATENCY"


def idp_app() -> Any:
    """The FakeIdP (strict: rotation, reuse revokes the grant) plus ``/bench/issue?n=`` (new
    grants, as token responses) and ``/bench/stats`` (its counters), for the driver."""
    idp = FakeIdP(issuer=None, latency=float(os.environ.get(ENV_LATENCY, "0")))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/bench/"):
            await idp(scope, receive, send)
            return
        if path == "/bench/issue":
            query = dict(
                pair.split("=", 1) for pair in scope["query_string"].decode().split("&") if pair
            )
            n = int(query.get("n", "1"))
            body: Any = [idp.issue(f"user{secrets.token_hex(4)}") for _ in range(n)]
        else:
            body = {
                "refresh": idp.token_calls("refresh_token"),
                "refresh_success": idp.token_calls("refresh_token", "success"),
                "revoked": idp.grants_revoked,
            }
        payload = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


def worker_app() -> Starlette:
    """One worker: TokenRefreshMiddleware with RedisCoordinator and RedisSessionStore."""
    env = os.environ
    url, prefix, secret = env[ENV_REDIS], env[ENV_PREFIX], env[ENV_SECRET]
    client = OAuth2Client(
        client_id="app", client_secret="app-secret", token_endpoint=env[ENV_IDP] + "/token"
    )
    coordinator = RedisCoordinator(url, secret_keys=[secret], prefix=prefix)
    store = RedisSessionStore(url, secret_keys=[secret], prefix=prefix, secure=False)
    refresher = Refresher(client, jitter=0, coordinator=coordinator)
    pid = str(os.getpid())

    async def token(request: Request) -> PlainTextResponse:
        await request.state.token.get()
        return PlainTextResponse(pid)

    async def whoami(request: Request) -> PlainTextResponse:
        return PlainTextResponse(pid)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await coordinator.aclose()
        await store.aclose()
        await client.aclose()

    return Starlette(
        routes=[Route("/token", token), Route("/pid", whoami)],
        middleware=[Middleware(TokenRefreshMiddleware, refresher=refresher, store=store)],
        lifespan=lifespan,
    )


@dataclass
class Server:
    """A uvicorn process (with its workers) that this script started."""

    port: int
    workers: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_uvicorn(factory: str, workers: int, env: dict[str, str], *extra: str) -> Server:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        f"distributed:{factory}",
        "--app-dir",
        str(BENCHMARKS),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "5",
        *extra,
    ]
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        command,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=None,  # a worker that fails to start says why
    )
    return Server(port, workers, process)


def wait_until_serving(server: Server, path: str, workers: int, timeout: float = 30.0) -> set[str]:
    """Poll on new connections until ``workers`` distinct pids answered (or one at least, by
    the deadline). Returns the pids seen."""
    pids: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check(server.process.poll() is None, f"uvicorn on port {server.port} exited")
        try:
            response = httpx.get(server.url + path, timeout=2.0)
            if response.status_code == 200:
                pids.add(response.text)
                if len(pids) >= workers:
                    return pids
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    _check(bool(pids), f"uvicorn on port {server.port} never answered")
    return pids


@dataclass
class Load:
    """Requests over raw keep-alive sockets: HTTP/1.1 GET, read by Content-Length."""

    port: int
    connections: int

    async def run(self, requests: list[bytes]) -> tuple[float, Counter[int], Counter[str]]:
        """Send every request; returns (wall seconds, statuses, responses per worker pid)."""
        statuses: Counter[int] = Counter()
        pids: Counter[str] = Counter()
        index = 0
        streams = [
            await asyncio.open_connection("127.0.0.1", self.port)
            for _ in range(min(self.connections, len(requests)))
        ]
        for _, writer in streams:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal index
            while index < len(requests):
                request = requests[index]
                index += 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                statuses[status] += 1
                if status == 200:
                    pids[body.decode()] += 1

        start = time.perf_counter()
        async with asyncio.timeout(300):
            await asyncio.gather(*(connection(r, w) for r, w in streams))
        wall = time.perf_counter() - start
        for _, writer in streams:
            writer.close()
        for _, writer in streams:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return wall, statuses, pids


def process_tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and its direct children (uvicorn's
    supervisor and its workers); NaN without /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return float("nan")
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces: the fields after its closing parenthesis.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid, parent = int(entry.name), int(fields[1])
        if root in (pid, parent):
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def redis_cpu(url: str) -> float:
    """CPU seconds the Redis server used so far (``INFO cpu``)."""
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class StormRun:
    requests: int
    storm_s: float
    fresh_s: float
    provider_calls: int
    sessions: int
    pids: Counter[str]
    # CPU seconds used by the uvicorn processes and by redis-server, per pass
    worker_cpu: dict[str, float] = field(default_factory=dict)
    redis_cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class WorkerResults:
    sessions: int
    per_session: int
    connections: int
    latency: float
    runs: dict[int, list[StormRun]] = field(default_factory=dict)  # by worker count
    pids_at_start: dict[int, int] = field(default_factory=dict)

    def rate(self, workers: int, kind: str) -> Series:
        return Series(
            [r.requests / (r.storm_s if kind == "storm" else r.fresh_s) for r in self.runs[workers]]
        )

    def ratio(self, kind: str) -> Series:
        """4 workers' rate over 1 worker's, within each round."""
        many, one = self.rate(4, kind).values, self.rate(1, kind).values
        return Series([m / o for m, o in zip(many, one, strict=True)])

    def cpu_us(self, workers: int, kind: str, of: str) -> Series:
        """CPU µs per request, of the uvicorn processes or of redis-server."""
        return Series(
            [
                (r.worker_cpu if of == "workers" else r.redis_cpu)[kind] / r.requests * 1e6
                for r in self.runs[workers]
            ]
        )


class Driver:
    """Writes sessions to Redis as the app would, asks the IdP for grants and counters."""

    def __init__(self, idp: Server, url: str, prefix: str, secret: str) -> None:
        self.idp = idp
        self.url = url
        self.store = RedisSessionStore(url, secret_keys=[secret], prefix=prefix, secure=False)

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = httpx.get(self.idp.url + "/bench/stats", timeout=10).json()
        return stats

    async def expired_sessions(self, n: int) -> list[str]:
        async with httpx.AsyncClient(timeout=30) as http:
            bodies = (await http.get(self.idp.url + "/bench/issue", params={"n": n})).json()
        now = time.time()
        ids = []
        for body in bodies:
            tokens = TokenSet(
                access_token=body["access_token"],
                refresh_token=body["refresh_token"],
                id_token=body.get("id_token"),
                scope=body.get("scope"),
                issued_at=now - 2 * EXPIRED,
                expires_at=now - EXPIRED,  # long expired: every request finds it due
            )
            session, _ = await self.store.save({}, None, tokens, new_session=True)
            _check(session is not None and session.id is not None, "no session id")
            assert session is not None
            assert session.id is not None
            ids.append(session.id)
        return ids


def storm_requests(port: int, session_ids: list[str], per_session: int) -> list[bytes]:
    """Every session's requests back to back, so that they arrive together (a storm each)."""
    return [
        (
            f"GET /token HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: atr_sid={session_id}\r\n\r\n"
        ).encode()
        for session_id in session_ids
        for _ in range(per_session)
    ]


async def storm_round(driver: Driver, server: Server, sizes: Sizes) -> StormRun:
    sessions = await driver.expired_sessions(sizes.sessions)
    requests = storm_requests(server.port, sessions, sizes.per_session)
    load = Load(server.port, sizes.connections)
    before = driver.stats()
    gc.collect()
    cpu = [(process_tree_cpu(server.process.pid), redis_cpu(driver.url))]
    storm_s, statuses, pids = await load.run(requests)
    cpu.append((process_tree_cpu(server.process.pid), redis_cpu(driver.url)))
    middle = driver.stats()
    fresh_s, fresh_statuses, fresh_pids = await load.run(requests)
    cpu.append((process_tree_cpu(server.process.pid), redis_cpu(driver.url)))
    after = driver.stats()
    _check(statuses == Counter({200: len(requests)}), f"storm answers: {dict(statuses)}")
    _check(fresh_statuses == Counter({200: len(requests)}), f"fresh: {dict(fresh_statuses)}")
    calls = middle["refresh"] - before["refresh"]
    _check(
        calls == sizes.sessions,
        f"{server.workers} worker(s): {calls} provider calls for {sizes.sessions} sessions",
    )
    _check(middle["refresh_success"] - before["refresh_success"] == calls, "a refresh failed")
    _check(after["refresh"] == middle["refresh"], "the fresh pass called the provider")
    _check(after["revoked"] == before["revoked"], "a grant was revoked")
    return StormRun(
        len(requests),
        storm_s,
        fresh_s,
        calls,
        sizes.sessions,
        pids + fresh_pids,
        worker_cpu={"storm": cpu[1][0] - cpu[0][0], "fresh": cpu[2][0] - cpu[1][0]},
        redis_cpu={"storm": cpu[1][1] - cpu[0][1], "fresh": cpu[2][1] - cpu[1][1]},
    )


async def bench_workers(
    sizes: Sizes, url: str, prefix: str, secret: str, latency: float
) -> WorkerResults:
    env = {
        ENV_REDIS: url,
        ENV_PREFIX: prefix,
        ENV_SECRET: secret,
        ENV_LATENCY: str(latency),
    }
    out = WorkerResults(sizes.sessions, sizes.per_session, sizes.connections, latency)
    servers: list[Server] = []
    driver: Driver | None = None
    try:
        # A provider keeps idle connections longer than httpx's pool does (5 s). With uvicorn's
        # default of 5 s too, a worker's connection idle since the previous round can be closed
        # just as it is reused: a ReadError, answered 503 (see the reading in RESULTS.md).
        idp = start_uvicorn("idp_app", 1, env, "--timeout-keep-alive", "75")
        servers.append(idp)
        wait_until_serving(idp, "/bench/stats", 1)
        env[ENV_IDP] = idp.url
        groups = {n: start_uvicorn("worker_app", n, env) for n in (1, 4)}
        servers += groups.values()
        for n, server in groups.items():
            out.pids_at_start[n] = len(wait_until_serving(server, "/pid", n))
            out.runs[n] = []
        driver = Driver(idp, url, prefix, secret)
        warm = dataclasses.replace(sizes, sessions=min(sizes.sessions, 8))
        for server in groups.values():  # warm up: imports, pools, listeners in every worker
            await storm_round(driver, server, warm)
        for round_ in range(sizes.worker_rounds):
            order = (1, 4) if round_ % 2 == 0 else (4, 1)
            for n in order:
                out.runs[n].append(await storm_round(driver, groups[n], sizes))
    finally:
        if driver is not None:
            await driver.store.aclose()
        for server in reversed(servers):
            server.stop()
    return out


# -- report ---------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "✅ met" if ok else "❌ missed"


def us(x: float) -> str:
    return f"{x:.0f} µs"


def spread(series: Series, fmt: Callable[[float], str]) -> str:
    return f"{fmt(series.low)} to {fmt(series.high)}"


def counts(seens: list[Seen]) -> str:
    values = sorted({s.round_trips for s in seens})
    return ", ".join(map(str, values)) + (" (every flight)" if len(seens) > 1 else "")


def commands(seens: list[Seen]) -> str:
    shapes = Counter(" → ".join(s.commands) or "none" for s in seens)
    return "; ".join(shapes)


def scripts(seens: list[Seen]) -> str:
    shapes = Counter(", ".join(s.in_scripts) or "none" for s in seens)
    return "; ".join(shapes)


@dataclass
class Report:
    command: str
    sizes: Sizes
    quick: bool
    when: str
    redis_version: str
    load_average: str
    trips: RoundTrips
    latency: Latency
    workers: WorkerResults

    def environment(self) -> list[str]:
        libs = ", ".join(
            f"{name} {version_of(name)}"
            for name in ("redis", "uvicorn", "starlette", "httpx")
            if version_of(name) is not None
        )
        s = self.sizes
        return [
            f"- Date: {self.when}",
            f"- Python: {platform.python_implementation()} {platform.python_version()} "
            f"({platform.platform()}); {libs}; redis-server {self.redis_version}",
            f"- Code: {code_version()}",
            f"- Machine: nproc {nproc()} ({os.cpu_count()} CPUs), {cpu_model()}; "
            f"load average at start {self.load_average}",
            f"- Command (from the repository root): `{self.command}`",
            f"- Sizes: {s.flights} measured flights of each kind (part 1); "
            f"{s.latency_rounds} interleaved rounds (part 2); "
            f"{s.sessions:,} sessions x {s.per_session} requests over {s.connections} "
            f"connections x {s.worker_rounds} rounds per worker count (part 3); "
            f"FakeIdP latency {self.workers.latency * 1000:g} ms"
            + (" — **quick smoke run: sizes too small for the numbers**" if self.quick else ""),
        ]

    def part1(self) -> list[str]:
        t = self.trips
        leader_ok = all(s.round_trips <= LEADER_TARGET for s in t.leader + t.alone)
        follower_ok = all(s.round_trips <= FOLLOWER_TARGET for s in t.follower)
        fresh_ok = t.fresh.round_trips == 0
        lines = [
            "Part 1: Redis round trips (top-level commands, one round trip each) per flight, "
            "counted with MONITOR and attributed by client name. Commands that the library's "
            "Lua scripts run inside Redis cost no round trip; they are listed for completeness.",
            "",
            "| flight | process | round trips | commands | inside scripts | target | |",
            "|---|---|---|---|---|---|---|",
            f"| two processes, one grant | leader | {counts(t.leader)} | {commands(t.leader)} | "
            f"{scripts(t.leader)} | ≤ {LEADER_TARGET} | {verdict(leader_ok)} |",
            f"| two processes, one grant | follower | {counts(t.follower)} | "
            f"{commands(t.follower)} + the pub/sub wake-up | {scripts(t.follower)} | "
            f"≤ {FOLLOWER_TARGET} + wake-up | {verdict(follower_ok)} |",
            f"| one process, no follower | leader | {counts(t.alone)} | {commands(t.alone)} | "
            f"{scripts(t.alone)} | ≤ {LEADER_TARGET} | |",
            f"| fresh path: {t.fresh_calls:,} `ensure_fresh` calls | both | "
            f"{t.fresh.round_trips} | {commands([t.fresh])} | | 0 | {verdict(fresh_ok)} |",
        ]
        labels = {
            "fresh": "request, fresh token (worker A)",
            "leader": "request that refreshes (worker A)",
            "follower": "request waiting on worker A's flight (worker B)",
        }
        for kind, label in labels.items():
            seens = t.requests.get(kind, [])
            if seens:
                lines.append(
                    f"| {label}, TokenRefreshMiddleware + RedisSessionStore | "
                    f"{'A' if kind != 'follower' else 'B'} | {counts(seens)} | "
                    f"{commands(seens)} | {scripts(seens)} | | |"
                )
        if t.commandstats:
            agree = all(stats == seen for stats, seen in t.commandstats)
            where = "private server" if t.private_server else "shared server: informative only"
            lines += [
                "",
                f"Cross-check ({where}): `INFO commandstats` deltas per two-process flight "
                f"(commands inside scripts included) "
                f"{', '.join(str(s) for s, _ in t.commandstats)}; MONITOR's totals "
                f"{', '.join(str(m) for _, m in t.commandstats)}"
                + (" — they agree." if agree else " — they differ (other clients?)."),
            ]
        return lines

    def part2(self) -> list[str]:
        lat = self.latency
        return [
            f"Part 2: release latency, from the leader's provider response (at its transport) "
            f"to a waiting caller resuming. Medians over {lat.rounds} interleaved rounds, "
            "with the order alternating. The follower is a second OS process (spawned, with "
            "its own Refresher and RedisCoordinator); `time.perf_counter()` is the system's "
            "monotonic clock, comparable between processes.",
            "",
            "| waiting caller | median | range over rounds |",
            "|---|---|---|",
            f"| same process, joined to the flight (`LocalCoordinator`) | "
            f"{us(lat.local_joiner_us.median)} | {spread(lat.local_joiner_us, us)} |",
            f"| leader's process, `RedisCoordinator` (after the publish round trip) | "
            f"{us(lat.redis_leader_us.median)} | {spread(lat.redis_leader_us, us)} |",
            f"| another OS process, `RedisCoordinator` (pub/sub wake-up + lookup) | "
            f"{us(lat.redis_follower_us.median)} | {spread(lat.redis_follower_us, us)} |",
            f"| ↳ added per follower vs in-process (per round) | {us(lat.added_us.median)} | "
            f"{spread(lat.added_us, us)} |",
            f"| for reference: one redis-py PING from the I/O loop | "
            f"{us(lat.redis_ping_us.median)} | {spread(lat.redis_ping_us, us)} |",
        ]

    def part3(self) -> list[str]:
        w = self.workers
        per_round = w.sessions * w.per_session

        def rate(x: float) -> str:
            return f"{x:,.0f} req/s"

        def ratio(x: float) -> str:
            return f"{x:.2f}x"

        def cpu(x: float) -> str:
            return f"{x:.0f} µs"

        lines = [
            f"Part 3: {w.sessions:,} sessions with expired access tokens, {w.per_session} "
            f"requests each sent back to back ({per_round:,} requests) over {w.connections} "
            "keep-alive connections, to uvicorn with 1 and with 4 worker processes "
            "(RedisCoordinator + RedisSessionStore). Then the same requests again (fresh path). "
            "CPU per request is the CPU time of the uvicorn processes (and of redis-server) "
            "during the pass, over its requests: the cost of a request whatever the core count.",
            "",
            "| workers | pass | throughput (median) | range over rounds | vs 1 worker (per round) "
            "| uvicorn CPU per request | redis-server CPU per request "
            "| provider calls per round | workers that answered |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n in (1, 4):
            runs = w.runs.get(n, [])
            if not runs:
                continue
            calls = sorted({r.provider_calls for r in runs})
            answered = sorted({len(r.pids) for r in runs})
            for kind in ("storm", "fresh"):
                series = w.rate(n, kind)
                versus = ""
                if n == 4 and w.runs.get(1):
                    versus = f"{ratio(w.ratio(kind).median)} ({spread(w.ratio(kind), ratio)})"
                worker_cpu = w.cpu_us(n, kind, "workers")
                server_cpu = w.cpu_us(n, kind, "redis")
                provider = f"{', '.join(map(str, calls))} (= sessions)" if kind == "storm" else "0"
                lines.append(
                    f"| {n} | {kind} | {rate(series.median)} | {spread(series, rate)} | "
                    f"{versus} | {cpu(worker_cpu.median)} ({spread(worker_cpu, cpu)}) | "
                    f"{cpu(server_cpu.median)} ({spread(server_cpu, cpu)}) | {provider} | "
                    f"{', '.join(map(str, answered))} of {n} |"
                )
        shares = w.runs.get(4, [])
        if shares:
            total: Counter[str] = Counter()
            for run in shares:
                total += run.pids
            fractions = sorted((v / sum(total.values()) for v in total.values()), reverse=True)
            lines += [
                "",
                "Share of requests per worker with 4 workers (all rounds, both passes): "
                + ", ".join(f"{f:.0%}" for f in fractions)
                + ".",
            ]
        return lines

    def markdown(self) -> str:
        sections = [self.environment()]
        if self.trips.leader:
            sections.append(self.part1())
        if self.latency.rounds:
            sections.append(self.part2())
        if self.workers.runs:
            sections.append(self.part3())
        return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def write_section(path: Path, report: Report) -> None:
    """Replace this script's section of ``path`` (or add it), leaving the rest alone."""
    results.write_section(path, "distributed.py", "Distributed coordination", report.markdown())


# -- main -----------------------------------------------------------------------------------------


async def run(
    sizes: Sizes, url: str, private_server: bool, latency: float, parts: set[int]
) -> tuple[RoundTrips, Latency, WorkerResults]:
    prefix = "atr-bench-" + secrets.token_hex(4)  # our keys and channel, deleted afterwards
    secret = secrets.token_urlsafe(32)
    try:
        trips = (
            await bench_round_trips(sizes, url, prefix, secret, private_server)
            if 1 in parts
            else RoundTrips([], [], [], 0, Seen(), {}, [], private_server)
        )
        latency_results = (
            await bench_latency(sizes, url, prefix, secret)
            if 2 in parts
            else Latency(
                0, Series([0.0]), Series([0.0]), Series([0.0]), Series([0.0]), Series([0.0])
            )
        )
        workers = (
            await bench_workers(sizes, url, prefix, secret, latency)
            if 3 in parts
            else WorkerResults(0, 0, 0, latency)
        )
    finally:
        delete_prefix(url, prefix)
    return trips, latency_results, workers


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description="Benchmark coordination through Redis: round trips, latency, workers."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a fast smoke run")
    parser.add_argument("--write", action="store_true", help=f"update the section in {RESULTS_MD}")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="file for --write")
    parser.add_argument(
        "--redis-url",
        help="an existing Redis (keys go under a random prefix, deleted afterwards); "
        "default: start a private redis-server",
    )
    parser.add_argument("--flights", type=int, help="part 1: measured flights of each kind")
    parser.add_argument("--latency-rounds", type=int, help="part 2: interleaved rounds")
    parser.add_argument("--sessions", type=int, help="part 3: sessions per storm")
    parser.add_argument("--per-session", type=int, help="part 3: requests per session")
    parser.add_argument("--connections", type=int, help="part 3: load-generator connections")
    parser.add_argument("--worker-rounds", type=int, help="part 3: rounds per worker count")
    parser.add_argument(
        "--idp-latency", type=float, default=0.0, help="part 3: FakeIdP latency per token request"
    )
    parser.add_argument(
        "--parts", default="1,2,3", help="which parts to run, comma-separated (default: all)"
    )
    args = parser.parse_args(args_list)

    base = QUICK if args.quick else FULL
    sizes = Sizes(
        flights=args.flights or base.flights,
        fresh_calls=base.fresh_calls,
        latency_rounds=args.latency_rounds or base.latency_rounds,
        sessions=args.sessions or base.sessions,
        per_session=args.per_session or base.per_session,
        connections=args.connections or base.connections,
        worker_rounds=args.worker_rounds or base.worker_rounds,
    )
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    command = shlex.join(["python", "benchmarks/distributed.py", *args_list])
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    random.seed(1)

    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(private_redis())
        with contextlib.closing(redis.Redis.from_url(url)) as client:
            info: dict[str, Any] = client.info("server")
            redis_version = str(info.get("redis_version", "unknown"))
        trips, latency, workers = asyncio.run(
            run(sizes, url, args.redis_url is None, args.idp_latency, parts)
        )
    report = Report(
        command=command,
        sizes=sizes,
        quick=args.quick,
        when=when,
        redis_version=redis_version,
        load_average=load,
        trips=trips,
        latency=latency,
        workers=workers,
    )
    print(report.markdown())
    if args.write:
        write_section(args.results, report)
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
