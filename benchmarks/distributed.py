"""Benchmarks of coordination across processes through Redis: round trips, latency, workers.

Run from the repository root::

    python benchmarks/distributed.py            # full sizes; starts a private redis-server
    python benchmarks/distributed.py --quick    # small sizes: a smoke run of every measurement
    python benchmarks/distributed.py --write    # also write its section in benchmarks/RESULTS.md
    python benchmarks/distributed.py --redis-url redis://127.0.0.1:6379/0   # an existing server

1. Redis round trips per flight (MONITOR, by client name), for two Refreshers standing for two
   processes, for whole requests through TokenRefreshMiddleware + RedisSessionStore, and on the
   fresh path.
2. Release latency: from the leader's provider response to a caller in another OS process
   resuming, against a caller joined to the flight in the same process.
3. A refresh storm over HTTP on uvicorn with 4 worker processes vs 1, then the fresh path.

How each part measures, and why: benchmarks/README.md. Correctness is asserted in every mode
(never timings): one provider call per flight or session, every response 200, every waiter
given the same token set, no grant revoked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import multiprocessing
import operator
import os
import random
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import common  # this directory is on sys.path when a benchmark runs
import httpx
import redis
from common import EXPIRED, ISSUER, RecordingTransport, Series, check, login, row, table, verdict
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from asgi_token_refresh import (
    LocalCoordinator,
    OAuth2Client,
    Refresher,
    TokenRefreshMiddleware,
    TokenSet,
)
from asgi_token_refresh.kit import Published
from asgi_token_refresh.redis import RedisCoordinator, RedisSessionStore
from asgi_token_refresh.testing import FakeClock, FakeIdP
from tests.processes import Uvicorn, running_redis, start_uvicorn

BENCHMARKS = Path(__file__).resolve().parent
LEADER_TARGET = 3  # Redis round trips per flight
FOLLOWER_TARGET = 2  # plus the pub/sub wake-up
# Commands a new connection sends before its first real one (redis-py 5 to 8).
SETUP_COMMANDS = frozenset({"HELLO", "CLIENT", "AUTH", "SELECT", "PING"})


@dataclass(frozen=True)
class Sizes:
    flights: int
    fresh_calls: int
    latency_rounds: int
    sessions: int
    per_session: int
    connections: int
    worker_rounds: int


SIZES = {
    "flights": "part 1: measured flights of each kind",
    "fresh_calls": "part 1: fresh-path calls in the burst",
    "latency_rounds": "part 2: interleaved rounds",
    "sessions": "part 3: sessions per storm",
    "per_session": "part 3: requests per session, sent together",
    "connections": "part 3: keep-alive connections of the load generator",
    "worker_rounds": "part 3: rounds per worker count",
}
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


# -- Redis ----------------------------------------------------------------------------------------


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
        self.events: list[tuple[str, bool, str]] = []  # (client name, in a script?, command)

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
            check(time.monotonic() < deadline, "MONITOR did not start")
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
        if self._thread is not None:
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
                    self.events.append((current, True, verb))
                continue
            current = ports.get(str(line.get("client_port")))
            if current not in self.names:
                current = None
            elif verb not in SETUP_COMMANDS:  # a new connection's setup: not the flight's
                self.events.append((current, False, _describe(words)))

    def of(self, *names: str) -> Seen:
        """What the named clients sent, in the order Redis ran it."""
        seen = Seen()
        for name, in_script, what in self.events:
            if name in names:
                (seen.in_scripts if in_script else seen.commands).append(what)
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

    async def _lookup(self, key: str) -> Published | None:
        self.lookups += 1
        return await super()._lookup(key)


@dataclass
class Process:
    """One simulated process: its own client, RedisCoordinator, Refresher and RedisSessionStore.
    The coordinator's Redis connections are named ``name``, the store's ``name-store``."""

    name: str
    transport: RecordingTransport
    client: OAuth2Client
    coordinator: WatchedCoordinator
    refresher: Refresher
    store: RedisSessionStore

    @property
    def store_name(self) -> str:
        return f"{self.name}-store"

    async def aclose(self) -> None:
        await self.coordinator.aclose()
        await self.store.aclose()
        await self.client.aclose()


def make_process(
    name: str, idp: FakeIdP, clock: FakeClock, url: str, prefix: str, secret: str
) -> Process:
    transport = RecordingTransport(idp.transport())
    client = common.client(transport, clock)
    options: dict[str, Any] = {"secret_keys": [secret], "prefix": prefix}
    coordinator = WatchedCoordinator(url, **options, redis_options={"client_name": name})
    store_options = {"client_name": f"{name}-store"}
    store = RedisSessionStore(url, **options, secure=False, redis_options=store_options)
    refresher = Refresher(client, jitter=0, coordinator=coordinator)
    return Process(name, transport, client, coordinator, refresher, store)


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        check(time.monotonic() < deadline, f"timed out waiting until {what}")
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
    check(idp.token_calls("refresh_token") == before + 1, "a flight made more than one call")
    check(results[0] == results[1], "leader and follower got different token sets")
    check(results[0].refresh_token != session.refresh_token, "not refreshed")
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


def worker_app_in_process(idp: FakeIdP, process: Process) -> Starlette:
    async def token(request: Request) -> PlainTextResponse:
        return PlainTextResponse(await request.state.token.get())

    async def do_login(request: Request) -> PlainTextResponse:
        await request.state.token.login(idp.issue())
        return PlainTextResponse("welcome")

    return Starlette(
        routes=[Route("/token", token), Route("/login", do_login)],
        middleware=[
            Middleware(TokenRefreshMiddleware, refresher=process.refresher, store=process.store)
        ],
    )


async def bench_round_trips(
    sizes: Sizes, url: str, prefix: str, secret: str, private_server: bool
) -> RoundTrips:
    clock = FakeClock()
    idp = FakeIdP(issuer=ISSUER, clock=clock)
    tag = secrets.token_hex(4)
    a, b = (make_process(f"atr-bench-{tag}-{x}", idp, clock, url, prefix, secret) for x in "ab")
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
                check(result is fresh[i % len(fresh)], "a fresh token set must come back as is")
        out.fresh = monitor.of(a.name, b.name)

        # Whole requests through the middleware, each worker with its own RedisSessionStore.
        on_a, on_b = (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=worker_app_in_process(idp, process)),
                base_url="http://app.test",
            )
            for process in (a, b)
        )
        async with on_a, on_b:
            kinds: dict[str, list[Seen]] = {"fresh": [], "leader": [], "follower": []}
            for _ in range(sizes.flights + 1):  # the first one warms up the stores
                await on_a.get("/login")
                on_b.cookies.set("atr_sid", on_a.cookies["atr_sid"], domain="app.test")
                watched = [a.name, b.name, a.store_name, b.store_name]
                with Monitor(url, watched) as monitor:
                    response = await on_a.get("/token")
                check(response.status_code == 200, "a fresh request failed")
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
                check([r.status_code for r in responses] == [200, 200], "a request failed")
                check(responses[0].text == responses[1].text, "the two requests disagree")
                check(idp.token_calls("refresh_token") == calls + 1, "more than one refresh")
                kinds["leader"].append(monitor.of(a.name, a.store_name))
                kinds["follower"].append(monitor.of(b.name, b.store_name))
            out.requests = {kind: seen[1:] for kind, seen in kinds.items()}
    finally:
        idp.close()
        raw.close()
        for process in (a, b):
            await process.aclose()
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
    check(results[0] is results[1], "the joiner must get the leader's token set")
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
        client = common.client(_NoProvider(), clock)
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
    check(await asyncio.to_thread(follower.recv) == "waiting", "the follower did not wait")
    gate.release()
    result = await led
    follower_resumed, follower_token, lookups = await asyncio.to_thread(follower.recv)
    check(follower_token == result.access_token, "the follower must get the leader's tokens")
    # 1: woken by pub/sub, then one lookup; 0: it polled and found the result (a message can
    # be missed while the listener is still subscribing, e.g. on a loaded machine).
    check(lookups <= 1, "the follower looked the result up more than once")
    responded = leader.transport.responded_at[-1]
    return (resumed - responded) * 1e6, (follower_resumed - responded) * 1e6


async def redis_ping_us(coordinator: RedisCoordinator, n: int = 200) -> float:
    """Median µs of a PING through the coordinator's own client (this loop's)."""

    async def pings() -> float:
        client = coordinator._redis.client()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await client.ping()
            times.append(time.perf_counter() - start)
        times.sort()
        return times[len(times) // 2] * 1e6

    return await pings()


async def bench_latency(sizes: Sizes, url: str, prefix: str, secret: str) -> Latency:
    clock = FakeClock()
    idp = FakeIdP(issuer=ISSUER, clock=clock)
    leader = make_process(f"atr-bench-lat-{secrets.token_hex(4)}", idp, clock, url, prefix, secret)
    local_transport = RecordingTransport(idp.transport())
    local_client = common.client(local_transport, clock)
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
            local_us = leader_us = follower_us = 0.0
            for use_redis in common.rotated([False, True], round_):
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
# The FakeIdP and the worker app run in processes of their own, started with uvicorn
# (``tests/processes.py``), configured by these environment variables:
#   uvicorn --factory --app-dir benchmarks distributed:idp_app
#   uvicorn --factory --app-dir benchmarks distributed:worker_app --workers N

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
            n = int(parse_qs(scope["query_string"].decode()).get("n", ["1"])[0])
            body: Any = [idp.issue(f"user{secrets.token_hex(4)}") for _ in range(n)]
        else:
            body = {
                "refresh": idp.token_calls("refresh_token"),
                "refresh_success": idp.token_calls("refresh_token", "success"),
                "revoked": idp.grants_revoked,
            }
        await JSONResponse(body)(scope, receive, send)

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


async def send_all(
    port: int, connections: int, requests: list[bytes]
) -> tuple[float, Counter[int], Counter[str]]:
    """Send every request over ``connections`` raw keep-alive sockets (HTTP/1.1, each response
    read by its Content-Length: a client that costs little). Returns (wall seconds, statuses,
    answers per worker pid)."""
    statuses: Counter[int] = Counter()
    pids: Counter[str] = Counter()
    index = 0
    streams = [
        await asyncio.open_connection("127.0.0.1", port)
        for _ in range(min(connections, len(requests)))
    ]
    for _, writer in streams:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal index
        while index < len(requests):
            writer.write(requests[index])
            index += 1
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            length = 0
            for line in head[1:]:
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


PASSES = ("storm", "fresh")  # expired sessions, then the same requests on fresh tokens


@dataclass
class StormRun:
    requests: int  # per pass
    provider_calls: int = 0
    pids: Counter[str] = field(default_factory=Counter)  # answers per worker, both passes
    seconds: dict[str, float] = field(default_factory=dict)  # by pass
    worker_cpu: dict[str, float] = field(default_factory=dict)  # uvicorn's CPU s, by pass
    redis_cpu: dict[str, float] = field(default_factory=dict)  # redis-server's CPU s, by pass


@dataclass
class WorkerResults:
    sessions: int
    per_session: int
    connections: int
    latency: float
    runs: dict[int, list[StormRun]] = field(default_factory=dict)  # by worker count

    def series(self, workers: int, value: Callable[[StormRun], float]) -> Series:
        return Series([value(run) for run in self.runs[workers]])

    def rate(self, workers: int, kind: str) -> Series:
        return self.series(workers, lambda run: run.requests / run.seconds[kind])

    def ratio(self, kind: str) -> Series:
        """4 workers' rate over 1 worker's, within each round."""
        return common.pairwise(self.rate(4, kind), self.rate(1, kind), operator.truediv)

    def cpu_us(self, workers: int, kind: str, of: str) -> Series:
        """CPU µs per request, of the uvicorn processes or of redis-server."""
        return self.series(
            workers,
            lambda run: (
                (run.worker_cpu if of == "workers" else run.redis_cpu)[kind] / run.requests * 1e6
            ),
        )


class Driver:
    """Writes sessions to Redis as the app would, asks the IdP for grants and counters."""

    def __init__(self, idp: Uvicorn, url: str, prefix: str, secret: str) -> None:
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
            if session is None or session.id is None:
                raise AssertionError("the store gave the new session no id")
            ids.append(session.id)
        return ids


async def storm_round(driver: Driver, server: Uvicorn, sizes: Sizes) -> StormRun:
    """New sessions with expired tokens, each one's requests back to back (a storm each), then
    the same requests again (the fresh path)."""
    sessions = await driver.expired_sessions(sizes.sessions)
    head = f"GET /token HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nCookie: atr_sid="
    requests = [
        f"{head}{sid}\r\n\r\n".encode() for sid in sessions for _ in range(sizes.per_session)
    ]
    run = StormRun(len(requests))
    stats = [driver.stats()]
    gc.collect()
    for kind in PASSES:
        cpu = process_tree_cpu(server.process.pid), redis_cpu(driver.url)
        run.seconds[kind], statuses, pids = await send_all(server.port, sizes.connections, requests)
        run.worker_cpu[kind] = process_tree_cpu(server.process.pid) - cpu[0]
        run.redis_cpu[kind] = redis_cpu(driver.url) - cpu[1]
        run.pids += pids
        stats.append(driver.stats())
        check(statuses == Counter({200: len(requests)}), f"{kind}: answers {dict(statuses)}")
    before, middle, after = stats
    run.provider_calls = calls = middle["refresh"] - before["refresh"]
    check(
        calls == sizes.sessions,
        f"{server.workers} worker(s): {calls} provider calls for {sizes.sessions} sessions",
    )
    check(middle["refresh_success"] - before["refresh_success"] == calls, "a refresh failed")
    check(after["refresh"] == middle["refresh"], "the fresh pass called the provider")
    check(after["revoked"] == before["revoked"], "a grant was revoked")
    return run


async def bench_workers(
    sizes: Sizes, url: str, prefix: str, secret: str, latency: float
) -> WorkerResults:
    env = {ENV_REDIS: url, ENV_PREFIX: prefix, ENV_SECRET: secret, ENV_LATENCY: str(latency)}
    out = WorkerResults(sizes.sessions, sizes.per_session, sizes.connections, latency)

    def start(factory: str, workers: int, *options: str) -> Uvicorn:
        return start_uvicorn(
            f"distributed:{factory}",
            workers=workers,
            env=env,
            app_dir=BENCHMARKS,
            shutdown_grace=5,
            options=options,
        )

    # A provider keeps idle connections longer than httpx's pool does (5 s). With uvicorn's
    # default of 5 s too, a worker's connection idle since the previous round can be closed
    # just as it is reused: a ReadError, answered 503 (see the reading in RESULTS.md).
    with start("idp_app", 1, "--timeout-keep-alive", "75") as idp:
        idp.wait_ready("/bench/stats")
        env[ENV_IDP] = idp.url
        with start("worker_app", 1) as one, start("worker_app", 4) as four:
            groups = {1: one, 4: four}
            for server in groups.values():
                server.wait_ready("/pid")  # every worker answers with its pid
            driver = Driver(idp, url, prefix, secret)
            try:
                warm = dataclasses.replace(sizes, sessions=min(sizes.sessions, 8))
                for server in groups.values():  # warm up: imports, pools, listeners everywhere
                    await storm_round(driver, server, warm)
                out.runs = {n: [] for n in groups}
                for round_ in range(sizes.worker_rounds):
                    for n in common.rotated([1, 4], round_):
                        out.runs[n].append(await storm_round(driver, groups[n], sizes))
            finally:
                await driver.store.aclose()
    return out


# -- report ---------------------------------------------------------------------------------------


def us(x: float) -> str:
    return f"{x:.0f} µs"


def req_s(x: float) -> str:
    return f"{x:,.0f} req/s"


def times(x: float) -> str:
    return f"{x:.2f}x"


def with_range(series: Series, fmt: Callable[[float], str]) -> str:
    median, spread = series.cells(fmt)
    return f"{median} ({spread})"


def counts(seens: list[Seen]) -> str:
    values = sorted({s.round_trips for s in seens})
    return ", ".join(map(str, values)) + (" (every flight)" if len(seens) > 1 else "")


def commands(seens: list[Seen]) -> str:
    return "; ".join(Counter(" → ".join(s.commands) or "none" for s in seens))


def scripts(seens: list[Seen]) -> str:
    return "; ".join(Counter(", ".join(s.in_scripts) or "none" for s in seens))


@dataclass
class Report:
    run: common.Run
    sizes: Sizes
    redis_version: str
    trips: RoundTrips
    latency: Latency
    workers: WorkerResults

    def part1(self) -> list[str]:
        t = self.trips
        lines = [
            "Part 1: Redis round trips (top-level commands, one round trip each) per flight, "
            "counted with MONITOR and attributed by client name. Commands that the library's "
            "Lua scripts run inside Redis cost no round trip; they are listed for completeness.",
            "",
            *table("flight", "process", "round trips", "commands", "inside scripts", "target", ""),
        ]
        flights = [
            ("two processes, one grant", "leader", t.leader, "", f"≤ {LEADER_TARGET}",
             verdict(all(s.round_trips <= LEADER_TARGET for s in t.leader + t.alone))),
            ("two processes, one grant", "follower", t.follower, " + the pub/sub wake-up",
             f"≤ {FOLLOWER_TARGET} + wake-up",
             verdict(all(s.round_trips <= FOLLOWER_TARGET for s in t.follower))),
            ("one process, no follower", "leader", t.alone, "", f"≤ {LEADER_TARGET}", ""),
        ]  # fmt: skip
        for flight, process, seens, after, target, ok in flights:
            lines.append(
                row(flight, process, counts(seens), commands(seens) + after, scripts(seens),
                    target, ok)
            )  # fmt: skip
        lines.append(
            row(f"fresh path: {t.fresh_calls:,} `ensure_fresh` calls", "both",
                t.fresh.round_trips, commands([t.fresh]), "", 0, verdict(t.fresh.round_trips == 0))
        )  # fmt: skip
        labels = {
            "fresh": ("request, fresh token (worker A)", "A"),
            "leader": ("request that refreshes (worker A)", "A"),
            "follower": ("request waiting on worker A's flight (worker B)", "B"),
        }
        for kind, (label, worker) in labels.items():
            if seens := t.requests.get(kind, []):
                label += ", TokenRefreshMiddleware + RedisSessionStore"
                lines.append(
                    row(label, worker, counts(seens), commands(seens), scripts(seens), "", "")
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
            *table("waiting caller", "median", "range over rounds"),
            row("same process, joined to the flight (`LocalCoordinator`)",
                *lat.local_joiner_us.cells(us)),
            row("leader's process, `RedisCoordinator` (after the publish round trip)",
                *lat.redis_leader_us.cells(us)),
            row("another OS process, `RedisCoordinator` (pub/sub wake-up + lookup)",
                *lat.redis_follower_us.cells(us)),
            row("↳ added per follower vs in-process (per round)", *lat.added_us.cells(us)),
            row("for reference: one redis-py PING from the I/O loop", *lat.redis_ping_us.cells(us)),
        ]  # fmt: skip

    def part3(self) -> list[str]:
        w = self.workers
        lines = [
            f"Part 3: {w.sessions:,} sessions with expired access tokens, {w.per_session} "
            f"requests each sent back to back ({w.sessions * w.per_session:,} requests) over "
            f"{w.connections} keep-alive connections, to uvicorn with 1 and with 4 worker "
            "processes (RedisCoordinator + RedisSessionStore). Then the same requests again "
            "(fresh path). CPU per request is the CPU time of the uvicorn processes (and of "
            "redis-server) during the pass, over its requests: the cost of a request whatever "
            "the core count.",
            "",
            *table(
                "workers", "pass", "throughput (median)", "range over rounds",
                "vs 1 worker (per round)", "uvicorn CPU per request",
                "redis-server CPU per request", "provider calls per round",
                "workers that answered",
            ),
        ]  # fmt: skip
        for n, runs in w.runs.items():
            calls = ", ".join(map(str, sorted({r.provider_calls for r in runs})))
            answered = ", ".join(map(str, sorted({len(r.pids) for r in runs})))
            for kind in PASSES:
                versus = with_range(w.ratio(kind), times) if n == 4 and w.runs.get(1) else ""
                cpu = [with_range(w.cpu_us(n, kind, of), us) for of in ("workers", "redis")]
                provider = f"{calls} (= sessions)" if kind == "storm" else "0"
                lines.append(
                    row(n, kind, *w.rate(n, kind).cells(req_s), versus, *cpu, provider,
                        f"{answered} of {n}")
                )  # fmt: skip
        if shares := w.runs.get(4, []):
            total = sum((run.pids for run in shares), Counter[str]())
            fractions = sorted((v / total.total() for v in total.values()), reverse=True)
            lines += [
                "",
                "Share of requests per worker with 4 workers (all rounds, both passes): "
                + ", ".join(f"{f:.0%}" for f in fractions)
                + ".",
            ]
        return lines

    def markdown(self) -> str:
        s, w = self.sizes, self.workers
        environment = self.run.environment(
            ["redis", "uvicorn", "starlette", "httpx"],
            f"{s.flights} measured flights of each kind (part 1); "
            f"{s.latency_rounds} interleaved rounds (part 2); "
            f"{s.sessions:,} sessions x {s.per_session} requests over {s.connections} "
            f"connections x {s.worker_rounds} rounds per worker count (part 3); "
            f"FakeIdP latency {w.latency * 1000:g} ms",
        )
        environment[1] += f"; redis-server {self.redis_version}"
        sections = [environment]
        if self.trips.leader:
            sections.append(self.part1())
        if self.latency.rounds:
            sections.append(self.part2())
        if w.runs:
            sections.append(self.part3())
        return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


# -- main -----------------------------------------------------------------------------------------


async def run(
    sizes: Sizes, url: str, private_server: bool, latency: float, parts: set[int]
) -> tuple[RoundTrips, Latency, WorkerResults]:
    prefix = "atr-bench-" + secrets.token_hex(4)  # our keys and channel, deleted afterwards
    secret = secrets.token_urlsafe(32)
    trips = RoundTrips([], [], [], 0, Seen(), {}, [], private_server)
    latencies = Latency(0, *(Series([0.0]) for _ in range(5)))
    workers = WorkerResults(0, 0, 0, latency)
    try:
        if 1 in parts:
            trips = await bench_round_trips(sizes, url, prefix, secret, private_server)
        if 2 in parts:
            latencies = await bench_latency(sizes, url, prefix, secret)
        if 3 in parts:
            workers = await bench_workers(sizes, url, prefix, secret, latency)
    finally:
        delete_prefix(url, prefix)
    return trips, latencies, workers


def main(argv: Sequence[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--redis-url",
            help="an existing Redis (keys go under a random prefix, deleted afterwards); "
            "default: start a private redis-server",
        )
        parser.add_argument(
            "--idp-latency",
            type=float,
            default=0.0,
            help="part 3: FakeIdP latency per token request",
        )
        parser.add_argument(
            "--parts", default="1,2,3", help="which parts to run, comma-separated (default: all)"
        )

    run_ = common.parse(
        "distributed.py",
        "Benchmark coordination through Redis: round trips, latency, workers.",
        argv,
        SIZES,
        add_arguments,
    )
    args = run_.args
    sizes = common.sizes(args, FULL, QUICK)
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    random.seed(1)
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(running_redis()).url
        with contextlib.closing(redis.Redis.from_url(url)) as client:
            info: dict[str, Any] = client.info("server")
        results = asyncio.run(run(sizes, url, args.redis_url is None, args.idp_latency, parts))
    report = Report(run_, sizes, str(info.get("redis_version", "unknown")), *results)
    common.publish(run_, "Distributed coordination", report.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
