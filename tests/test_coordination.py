"""One flight per grant across processes: RedisCoordinator and FileCoordinator.

In-process tests stand in for processes with separate Refresher + OAuth2Client pairs, each with
its own coordinator instance, sharing one FakeIdP and FakeClock: the gate lines the processes up
(one leads at the provider, the others wait in the coordinator) without sleeping. Multi-process
tests run real uvicorn workers (tests/workers/) against a FakeIdP served over HTTP. Separate
processes cannot share a FakeClock; they share a SharedClock instead (tests/workers/clock.py):
wall time that only the test moves, so a token falls due when the test says so, never in the
middle of a round, while everything else (leases, timeouts, caches) runs in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from asgi_token_refresh import (
    ConfigurationError,
    CookieSessionStore,
    Coordinator,
    FileCoordinator,
    Lease,
    LocalCoordinator,
    OAuth2Client,
    ReauthenticationRequired,
    Refresher,
    RefreshUnavailable,
    TokenSet,
)
from asgi_token_refresh._coordination import Published, encode_outcome
from asgi_token_refresh._exchange import COORDINATOR_RETRY
from asgi_token_refresh.redis import RedisCoordinator
from asgi_token_refresh.testing import (
    CapturedTelemetry,
    FakeClock,
    FakeIdP,
    Fault,
    capture_telemetry,
    serve,
)

from .helpers import ISSUER, login
from .processes import RedisServer, running_redis
from .workers.clock import SharedClock
from .workers.cluster import Cluster, Worker

pytestmark = pytest.mark.anyio

SECRET = "coordination-tests-secret-" + "k" * 32
EXPIRED = 300.0  # FakeIdP's default access-token lifetime: advancing this far makes tokens due
KINDS = ["redis", "file"]
COORDINATOR_ERRORS = "asgi_token_refresh.coordinator.errors"
TOKEN_REQUESTS = "asgi_token_refresh.token.requests"
REFRESHES = "asgi_token_refresh.refreshes"

AnyCoordinator = RedisCoordinator | FileCoordinator


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Wait for ``condition`` (set by another thread or process); never a fixed sleep.
    ``timeout`` only bounds a test that would otherwise hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.002)


class Watched:
    """A coordinator that counts the followers waiting in it, to line up concurrency."""

    def __init__(self, inner: AnyCoordinator) -> None:
        self.inner = inner
        self.name = inner.name
        self.waiting = 0  # changed on the I/O loop; read by the test

    def grant_key(self, *parts: str | None) -> str:
        return self.inner.grant_key(*parts)

    async def try_lead(self, key: str, ttl: float) -> Lease | Published | None:
        return await self.inner.try_lead(key, ttl)

    async def publish(self, lease: Lease, outcome: Published, ttl: float) -> None:
        await self.inner.publish(lease, outcome, ttl)

    async def release(self, lease: Lease) -> None:
        await self.inner.release(lease)

    async def wait(self, key: str, timeout: float) -> Published | None:  # noqa: ASYNC109
        self.waiting += 1
        try:
            return await self.inner.wait(key, timeout)
        finally:
            self.waiting -= 1


@dataclass
class Process:
    """What one worker process would have: its client, refresher, coordinator, telemetry."""

    refresher: Refresher
    coordinator: Watched
    telemetry: CapturedTelemetry

    async def storm(self, session: TokenSet, n: int) -> list[asyncio.Task[TokenSet]]:
        callers = [asyncio.ensure_future(self.refresher.ensure_fresh(session)) for _ in range(n)]
        await asyncio.sleep(0)  # let them start
        return callers


class Processes:
    def __init__(
        self, idp: FakeIdP, clock: FakeClock, coordinator: Callable[[], AnyCoordinator]
    ) -> None:
        self.idp, self.clock, self.coordinator = idp, clock, coordinator
        self.started: list[Process] = []

    def new(self) -> Process:
        telemetry = capture_telemetry()
        client = OAuth2Client.from_discovery(
            ISSUER,
            client_id="app",
            client_secret="app-secret",
            transport=self.idp.transport(),
            clock=self.clock,
            telemetry=telemetry.telemetry,
        )
        coordinator = Watched(self.coordinator())
        refresher = Refresher(client, jitter=0.0, coordinator=coordinator)
        self.started.append(Process(refresher, coordinator, telemetry))
        return self.started[-1]

    async def aclose(self) -> None:
        for process in self.started:
            await process.refresher.client.aclose()
            await process.coordinator.inner.aclose()
            process.telemetry.shutdown()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def make_coordinator(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[], AnyCoordinator]:
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        return lambda: RedisCoordinator(server.url, secret_keys=[SECRET], poll_interval=0.02)
    directory = tmp_path / "coordination"
    return lambda: FileCoordinator(directory, secret_keys=[SECRET])


@pytest.fixture
async def processes(
    idp: FakeIdP, clock: FakeClock, make_coordinator: Callable[[], AnyCoordinator]
) -> AsyncIterator[Processes]:
    started = Processes(idp, clock, make_coordinator)
    try:
        yield started
    finally:
        await started.aclose()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may stop and start."""
    with running_redis() as server:
        yield server


async def storm_on_two(
    idp: FakeIdP, a: Process, b: Process, session: TokenSet, n: int = 50
) -> tuple[list[TokenSet | BaseException], list[TokenSet | BaseException]]:
    """``n`` callers on each process: A's leader reaches the provider first, B's flight waits
    in the coordinator, then the provider answers."""
    gate = idp.pause_token_endpoint()
    on_a = await a.storm(session, n)
    await gate.arrived(1)
    on_b = await b.storm(session, n)
    await until(lambda: b.coordinator.waiting == 1)
    gate.release()
    results_a = await asyncio.gather(*on_a, return_exceptions=True)
    results_b = await asyncio.gather(*on_b, return_exceptions=True)
    return list(results_a), list(results_b)


def secrets_of(*token_sets: TokenSet) -> list[bytes]:
    found = []
    for token_set in token_sets:
        for value in (token_set.access_token, token_set.refresh_token, token_set.id_token):
            if value:
                found.append(value.encode())
    return found


def stored_values(coordinator: AnyCoordinator) -> dict[str, bytes]:
    """Everything the coordinator keeps, by where it is: Redis key, or file path."""
    if isinstance(coordinator, FileCoordinator):
        root = coordinator.directory
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    client = redis.Redis.from_url(coordinator._redis.url)
    try:
        stored = {}
        for key in client.scan_iter():
            assert client.type(key) == b"string", key
            value = client.get(key)
            assert isinstance(value, bytes)
            stored[key.decode()] = value
        return stored
    finally:
        client.close()


def grant_key(coordinator: Coordinator, refresh_token: str | None) -> str:
    """The key the refresher names a grant by (see Refresher._coordinated)."""
    return coordinator.grant_key(ISSUER, "app", refresh_token, None, None, None)


def read_result(coordinator: AnyCoordinator, key: str) -> bytes:
    if isinstance(coordinator, RedisCoordinator):
        client = redis.Redis.from_url(coordinator._redis.url)
        try:
            value = client.get(coordinator._keys(key)[1])
        finally:
            client.close()
        assert isinstance(value, bytes)
        return value
    with contextlib.closing(sqlite3.connect(coordinator.directory / "results.sqlite3")) as db, db:
        row = db.execute("SELECT sealed FROM results WHERE key = ?", (key,)).fetchone()
    return bytes(row[0])


def write_result(coordinator: AnyCoordinator, key: str, value: bytes) -> None:
    if isinstance(coordinator, RedisCoordinator):
        client = redis.Redis.from_url(coordinator._redis.url)
        try:
            assert client.set(coordinator._keys(key)[1], value, keepttl=True)
        finally:
            client.close()
        return
    with contextlib.closing(sqlite3.connect(coordinator.directory / "results.sqlite3")) as db, db:
        db.execute("UPDATE results SET sealed = ? WHERE key = ?", (value, key))


# -- one flight per grant across processes ----------------------------------------------------


async def test_callers_in_two_processes_make_one_provider_call(
    processes: Processes, idp: FakeIdP, clock: FakeClock
) -> None:
    a, b = processes.new(), processes.new()
    session = login(idp, clock)
    clock.advance(EXPIRED)
    on_a, on_b = await storm_on_two(idp, a, b, session)
    results = on_a + on_b
    assert all(isinstance(r, TokenSet) for r in results), results[:3]
    assert len({r.access_token for r in results if isinstance(r, TokenSet)}) == 1
    assert idp.token_calls("refresh_token") == 1
    assert idp.grants_revoked == 0
    new = on_a[0]
    assert isinstance(new, TokenSet)
    assert new.refresh_token != session.refresh_token
    assert idp.is_grant_active(new.refresh_token or "")
    assert a.telemetry.value(REFRESHES) == 1
    assert b.telemetry.value(REFRESHES) == 0  # B never called the provider
    assert b.telemetry.value(TOKEN_REQUESTS, dedupe="distributed") == 1  # its one flight
    assert a.telemetry.value(COORDINATOR_ERRORS) == b.telemetry.value(COORDINATOR_ERRORS) == 0


async def test_stragglers_in_any_process_are_served_without_the_provider(
    processes: Processes, idp: FakeIdP, clock: FakeClock
) -> None:
    a, b = processes.new(), processes.new()
    session = login(idp, clock)
    clock.advance(EXPIRED)
    on_a, _ = await storm_on_two(idp, a, b, session)
    new = on_a[0]
    assert isinstance(new, TokenSet)
    # The processes that took part answer from their grace caches...
    for process in (a, b):
        late = await asyncio.gather(*(process.refresher.ensure_fresh(session) for _ in range(20)))
        assert {t.access_token for t in late} == {new.access_token}
    # ...and one that saw nothing of the storm finds the outcome its leader published.
    c = processes.new()
    late = await asyncio.gather(*(c.refresher.ensure_fresh(session) for _ in range(20)))
    assert {t.access_token for t in late} == {new.access_token}
    assert {t.refresh_token for t in late} == {new.refresh_token}
    assert idp.token_calls("refresh_token") == 1
    assert c.telemetry.value(TOKEN_REQUESTS, dedupe="distributed") == 1
    assert idp.grants_revoked == 0


async def test_a_terminal_failure_is_published_to_the_other_processes(
    processes: Processes, idp: FakeIdP, clock: FakeClock
) -> None:
    a, b = processes.new(), processes.new()
    session = login(idp, clock)
    clock.advance(EXPIRED)
    idp.script(Fault.invalid_grant())
    on_a, on_b = await storm_on_two(idp, a, b, session)
    for failure in on_a + on_b:
        assert isinstance(failure, ReauthenticationRequired)
        assert failure.reason == "invalid_grant"
    c = processes.new()
    with pytest.raises(ReauthenticationRequired):
        await c.refresher.ensure_fresh(session)
    assert idp.token_calls("refresh_token") == 1  # B and C never asked the provider
    assert b.telemetry.value(REFRESHES) == c.telemetry.value(REFRESHES) == 0


async def test_a_transient_failure_is_published_to_the_other_processes(
    processes: Processes, idp: FakeIdP, clock: FakeClock
) -> None:
    a, b = processes.new(), processes.new()
    session = login(idp, clock)
    clock.advance(EXPIRED)
    idp.script(Fault.unavailable(retry_after=7))
    on_a, on_b = await storm_on_two(idp, a, b, session)
    reasons = set()
    for failure in on_a + on_b:
        assert isinstance(failure, RefreshUnavailable)
        assert failure.retry_after == 7.0
        reasons.add(failure.reason)
    assert len(reasons) == 1  # the followers see what the leader saw
    assert idp.token_calls("refresh_token") == 1
    # The session is not dead: once the provider is back, it refreshes normally.
    assert idp.is_grant_active(session.refresh_token or "")


# -- what the shared store holds ------------------------------------------------------------


async def test_published_outcomes_are_sealed(
    kind: str, processes: Processes, idp: FakeIdP, clock: FakeClock, tmp_path: Path
) -> None:
    a, b = processes.new(), processes.new()
    alice, bob = login(idp, clock, "alice"), login(idp, clock, "bob")
    clock.advance(EXPIRED)
    on_a, _ = await storm_on_two(idp, a, b, alice)
    new = on_a[0]
    assert isinstance(new, TokenSet)
    idp.script(Fault.invalid_grant())  # a published failure too
    with pytest.raises(ReauthenticationRequired):
        await a.refresher.ensure_fresh(bob)

    stored = stored_values(a.coordinator.inner)
    assert len(stored) >= 2, stored.keys()
    needles = [*secrets_of(alice, bob, new), b"access_token", b"invalid_grant", b"alice", b"bob"]
    for where, value in stored.items():
        for needle in needles:
            assert needle not in value, (where, needle)
            assert needle.decode() not in where
    if kind == "redis":
        for where, value in stored.items():
            assert where.endswith(":result"), where  # leases are gone once published
            with pytest.raises(ValueError, match=r"."):  # UnicodeDecodeError or JSONDecodeError
                json.loads(value)
    else:
        with (
            contextlib.closing(
                sqlite3.connect(tmp_path / "coordination" / "results.sqlite3")
            ) as db,
            db,
        ):
            assert db.execute("SELECT count(*) FROM results").fetchone() == (2,)


@pytest.mark.parametrize("tamper", ["flipped-byte", "replayed-from-another-grant"])
async def test_a_tampered_published_outcome_is_never_used(
    tamper: str,
    processes: Processes,
    idp: FakeIdP,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = processes.new()
    alice, bob = login(idp, clock, "alice"), login(idp, clock, "bob")
    clock.advance(EXPIRED)
    new_alice = await a.refresher.ensure_fresh(alice)
    new_bob = await a.refresher.ensure_fresh(bob)
    coordinator = a.coordinator.inner
    alice_key = grant_key(coordinator, alice.refresh_token)
    if tamper == "flipped-byte":
        sealed = bytearray(read_result(coordinator, alice_key))
        sealed[len(sealed) // 2] ^= 0x01
        forged = bytes(sealed)
    else:  # a genuine sealed outcome, but another user's: the grant key is bound in
        forged = read_result(coordinator, grant_key(coordinator, bob.refresh_token))
    write_result(coordinator, alice_key, forged)

    # A process that missed the refresh asks for alice's grant and finds the forged outcome.
    c = processes.new()
    # It is an error, never a token set: counted, and the process coordinates locally for a
    # while, leading alice's grant itself. The strict provider sees alice's used refresh token
    # again and ends the grant: fail closed.
    with (
        caplog.at_level(logging.WARNING, logger="asgi_token_refresh"),
        pytest.raises(ReauthenticationRequired),
    ):
        await c.refresher.ensure_fresh(alice)
    assert c.telemetry.value(COORDINATOR_ERRORS) == 1
    assert "coordinator unavailable (ValueError)" in caplog.text
    assert idp.token_calls("refresh_token") == 3
    assert not idp.is_grant_active(new_alice.refresh_token or "")
    assert idp.is_grant_active(new_bob.refresh_token or "")  # bob's tokens went nowhere


# -- LocalCoordinator, and the paths that never touch Redis ---------------------------------


def redis_commands(server: RedisServer) -> int:
    """Commands Redis has executed, not counting those of this probe."""
    total = 0
    for line in server.cli("INFO", "commandstats").splitlines():
        name, _, stats = line.partition(":")
        if not name.startswith("cmdstat_") or name in ("cmdstat_info", "cmdstat_pubsub|numsub"):
            continue
        total += int(stats.split(",")[0].removeprefix("calls="))
    return total


def scripts_run(server: RedisServer) -> int:
    """EVAL calls: the coordinator's claims, publishes, releases and polls."""
    for line in server.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_eval:"):
            return int(line.split(":")[1].split(",")[0].removeprefix("calls="))
    return 0


def subscribers(server: RedisServer, channel: str) -> int:
    return int(server.cli("PUBSUB", "NUMSUB", channel).split()[1])


async def test_local_coordination_is_the_default_and_fresh_tokens_never_touch_redis(
    redis_server: RedisServer, client: OAuth2Client, idp: FakeIdP, clock: FakeClock
) -> None:
    redis_server.cli("FLUSHALL")
    assert isinstance(Refresher(client).coordinator, LocalCoordinator)
    coordinator = RedisCoordinator(redis_server.url, secret_keys=[SECRET], poll_interval=0.02)
    try:
        refresher = Refresher(client, jitter=0.0, coordinator=coordinator)
        session = login(idp, clock)
        before = redis_commands(redis_server)
        fresh = await asyncio.gather(*(refresher.ensure_fresh(session) for _ in range(1000)))
        assert all(t is session for t in fresh)
        assert redis_commands(redis_server) == before

        clock.advance(EXPIRED)  # a storm: its one flight claims and publishes through Redis
        new = await asyncio.gather(*(refresher.ensure_fresh(session) for _ in range(100)))
        await until(lambda: subscribers(redis_server, coordinator.channel) == 1)
        after_storm = redis_commands(redis_server)
        assert after_storm > before
        # Stragglers (the grace cache) and the new token set's fresh path: no Redis at all.
        late = await asyncio.gather(*(refresher.ensure_fresh(session) for _ in range(1000)))
        again = await asyncio.gather(*(refresher.ensure_fresh(new[0]) for _ in range(1000)))
        assert {t.access_token for t in late + again} == {new[0].access_token}
        assert redis_commands(redis_server) == after_storm
        assert idp.token_calls("refresh_token") == 1
    finally:
        await coordinator.aclose()


# -- living without the coordinator -----------------------------------------------------------


async def test_redis_down_mid_storm_degrades_to_local_then_coordination_resumes(
    private_redis: RedisServer, idp: FakeIdP, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_token_refresh")
    processes = Processes(
        idp,
        clock,
        lambda: RedisCoordinator(private_redis.url, secret_keys=[SECRET], poll_interval=0.02),
    )
    try:
        a = processes.new()
        session = login(idp, clock)
        clock.advance(EXPIRED)
        gate = idp.pause_token_endpoint()
        storm = await a.storm(session, 200)
        await gate.arrived(1)  # A leads: its lease is in Redis
        private_redis.stop()
        gate.release()
        results = await asyncio.gather(*storm)
        assert len({t.access_token for t in results}) == 1
        first = results[0]
        assert a.telemetry.value(COORDINATOR_ERRORS) == 1  # the publish failed
        assert idp.token_calls("refresh_token") == 1

        # Within the retry window the process coordinates locally without trying Redis.
        second = await asyncio.gather(*(a.refresher.renew(first) for _ in range(50)))
        assert len({t.access_token for t in second}) == 1
        assert idp.token_calls("refresh_token") == 2
        assert a.telemetry.value(COORDINATOR_ERRORS) == 1

        # After it, Redis is tried again: still down, counted, but logged once per outage.
        clock.advance(COORDINATOR_RETRY + 0.1)
        third = await asyncio.gather(*(a.refresher.renew(second[0]) for _ in range(50)))
        assert len({t.access_token for t in third}) == 1
        assert a.telemetry.value(COORDINATOR_ERRORS) == 2
        assert caplog.text.count("redis coordinator unavailable") == 1
        assert idp.grants_revoked == 0

        # Redis is back, but until the retry window has passed nobody asks it.
        private_redis.start()
        claims = scripts_run(private_redis)
        fourth = await asyncio.gather(*(a.refresher.renew(third[0]) for _ in range(50)))
        assert len({t.access_token for t in fourth}) == 1
        assert scripts_run(private_redis) == claims
        # After it, flights coordinate through Redis again.
        clock.advance(COORDINATOR_RETRY + 0.1)
        fifth = await asyncio.gather(*(a.refresher.renew(fourth[0]) for _ in range(50)))
        assert len({t.access_token for t in fifth}) == 1
        assert scripts_run(private_redis) == claims + 2  # claim, publish
        assert a.telemetry.value(COORDINATOR_ERRORS) == 2
        assert "redis coordinator is back" in caplog.text
        # Another process finds that refresh in Redis (it holds the generation before it).
        b = processes.new()
        straggler = await b.refresher.renew(fourth[0])
        assert straggler.access_token == fifth[0].access_token
        assert idp.token_calls("refresh_token") == 5
        assert b.telemetry.value(TOKEN_REQUESTS, dedupe="distributed") == 1
        assert idp.grants_revoked == 0
    finally:
        await processes.aclose()


async def test_a_process_that_only_follows_notices_redis_is_back(
    private_redis: RedisServer, idp: FakeIdP, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Each outage is logged once, also by a process that after the first one only followed
    other processes' flights (it never publishes, so only its claims say Redis is back)."""
    caplog.set_level(logging.WARNING, logger="asgi_token_refresh")
    processes = Processes(
        idp,
        clock,
        lambda: RedisCoordinator(private_redis.url, secret_keys=[SECRET], poll_interval=0.02),
    )
    try:
        a, b = processes.new(), processes.new()
        alice, bob, carol = (login(idp, clock, name) for name in ("alice", "bob", "carol"))
        clock.advance(EXPIRED)
        private_redis.stop()
        await a.refresher.ensure_fresh(alice)  # first outage: local
        private_redis.start()
        clock.advance(COORDINATOR_RETRY + 0.1)
        new_bob = await b.refresher.ensure_fresh(bob)  # B leads through Redis...
        assert (await a.refresher.ensure_fresh(bob)).access_token == new_bob.access_token
        assert "redis coordinator is back" in caplog.text  # ...and A, following, sees it
        private_redis.stop()
        await a.refresher.ensure_fresh(carol)  # second outage
        assert caplog.text.count("redis coordinator unavailable") == 2
        assert a.telemetry.value(COORDINATOR_ERRORS) == 2
        assert idp.token_calls("refresh_token") == 3
    finally:
        await processes.aclose()


@pytest.mark.parametrize("reuse_grace", [60.0, 0.0], ids=["grace-window", "strict"])
async def test_a_follower_waiting_in_redis_when_it_goes_down_leads_locally(
    reuse_grace: float, private_redis: RedisServer, clock: FakeClock
) -> None:
    """Degrading costs one more provider call per grant in flight: fine with a grace window;
    a strict provider takes it for reuse of the refresh token and ends the grant."""
    idp = FakeIdP(issuer=ISSUER, clock=clock, reuse_grace=reuse_grace)
    processes = Processes(
        idp,
        clock,
        lambda: RedisCoordinator(private_redis.url, secret_keys=[SECRET], poll_interval=0.02),
    )
    try:
        a, b = processes.new(), processes.new()
        session = login(idp, clock)
        clock.advance(EXPIRED)
        gate = idp.pause_token_endpoint()
        on_a = await a.storm(session, 50)
        await gate.arrived(1)
        on_b = await b.storm(session, 50)
        await until(lambda: b.coordinator.waiting == 1)
        private_redis.stop()
        await gate.arrived(2)  # B gave up on Redis and asked the provider itself
        gate.release()
        results_a = await asyncio.gather(*on_a)
        results_b = await asyncio.gather(*on_b, return_exceptions=True)
        assert len({t.access_token for t in results_a}) == 1
        assert idp.token_calls("refresh_token") == 2
        assert a.telemetry.value(COORDINATOR_ERRORS) == 1
        assert b.telemetry.value(COORDINATOR_ERRORS) == 1
        if reuse_grace:
            assert all(isinstance(t, TokenSet) for t in results_b)
            assert idp.grants_revoked == 0
        else:
            assert all(isinstance(t, ReauthenticationRequired) for t in results_b)
            assert idp.grants_revoked == 1
    finally:
        await processes.aclose()
        idp.close()


# -- FileCoordinator --------------------------------------------------------------------------


def test_file_coordinator_default_directory_is_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    coordinator = FileCoordinator(secret_keys=[SECRET])
    assert coordinator.directory == tmp_path / f"asgi-token-refresh-{os.getuid()}"
    assert stat.S_IMODE(coordinator.directory.stat().st_mode) == 0o700
    assert coordinator.name == "file"
    assert FileCoordinator(secret_keys=[SECRET]).directory == coordinator.directory


@pytest.mark.parametrize("planted", ["world-writable", "symlink", "file"])
def test_file_coordinator_refuses_a_planted_default_directory(
    planted: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = tmp_path / f"asgi-token-refresh-{os.getuid()}"
    if planted == "world-writable":
        path.mkdir()
        path.chmod(0o777)
    elif planted == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.write_text("")
    with pytest.raises(ConfigurationError):
        FileCoordinator(secret_keys=[SECRET])


def test_file_coordinator_checks_its_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        FileCoordinator(tmp_path, secret_keys=[SECRET], poll_interval=0)
    with pytest.raises(ConfigurationError):
        FileCoordinator(tmp_path, secret_keys=["short"])


async def test_file_coordinator_ignores_expired_outcomes_and_leaves_no_lock_files(
    tmp_path: Path, idp: FakeIdP, clock: FakeClock
) -> None:
    coordinator = FileCoordinator(tmp_path, secret_keys=[SECRET])
    try:
        session = login(idp, clock)
        key = grant_key(coordinator, session.refresh_token)
        lease = await coordinator.try_lead(key, 10.0)
        assert isinstance(lease, Lease)
        assert list((tmp_path / "locks").iterdir()) != []
        await coordinator.publish(lease, session, 0.0)  # expired at once
        assert list((tmp_path / "locks").iterdir()) == []
        lease = await coordinator.try_lead(key, 10.0)  # nothing published: it leads again
        assert isinstance(lease, Lease)
        await coordinator.publish(lease, session, 60.0)
        published = await coordinator.try_lead(key, 10.0)
        assert isinstance(published, TokenSet)
        assert published.access_token == session.access_token
        assert list((tmp_path / "locks").iterdir()) == []
    finally:
        await coordinator.aclose()


async def test_file_coordinator_looks_again_once_it_holds_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idp: FakeIdP, clock: FakeClock
) -> None:
    """A leader that publishes and lets go between a follower's look and its lock: the
    follower, now holding the lock, must find the outcome rather than lead a second time."""
    a = FileCoordinator(tmp_path, secret_keys=[SECRET])
    b = FileCoordinator(tmp_path, secret_keys=[SECRET])
    try:
        session = login(idp, clock)
        key = grant_key(a, session.refresh_token)
        lease = await a.try_lead(key, 10.0)
        assert isinstance(lease, Lease)
        lock = b._locks.lock

        def leader_finishes_first(grant: str) -> int | None:
            a._publish(lease, encode_outcome(a._sealer, key, session), 60.0)
            return lock(grant)

        monkeypatch.setattr(b._locks, "lock", leader_finishes_first)
        claim = await b.try_lead(key, 10.0)
        assert isinstance(claim, TokenSet)
        assert claim.access_token == session.access_token
        assert b._held == {}
        assert list((tmp_path / "locks").iterdir()) == []  # and b let the lock go again
    finally:
        await a.aclose()
        await b.aclose()


async def test_file_coordinator_sweeps_lock_files_that_dead_leaders_left(tmp_path: Path) -> None:
    a = FileCoordinator(tmp_path, secret_keys=[SECRET])
    b = FileCoordinator(tmp_path, secret_keys=[SECRET])
    try:
        stray = tmp_path / "locks" / f"{a.grant_key('dead')}.lock"
        stray.touch()
        held = await b.try_lead(a.grant_key("held"), 10.0)
        assert isinstance(held, Lease)
        an_hour_ago = time.time() - 3600
        for path in (tmp_path / "locks").iterdir():
            os.utime(path, (an_hour_ago, an_hour_ago))
        lease = await a.try_lead(a.grant_key("live"), 10.0)
        assert isinstance(lease, Lease)
        await a.publish(lease, RefreshUnavailable("timeout", retry_after=1.0), 1.0)
        # The dead leader's file is gone; the one B holds stays (and B still holds it).
        assert [p.name for p in (tmp_path / "locks").iterdir()] == [f"{held.key}.lock"]
        assert await a.try_lead(held.key, 10.0) is None
        await b.release(held)
        assert isinstance(await a.try_lead(held.key, 10.0), Lease)
    finally:
        await a.aclose()
        await b.aclose()


async def test_file_coordinator_gives_back_a_lease_its_caller_no_longer_wants(
    tmp_path: Path,
) -> None:
    a = FileCoordinator(tmp_path, secret_keys=[SECRET])
    b = FileCoordinator(tmp_path, secret_keys=[SECRET])
    try:
        key = a.grant_key("grant")

        async def cancelled_claim() -> None:
            claim = asyncio.ensure_future(a.try_lead(key, 10.0))
            await asyncio.sleep(0)  # the thread has the work; the caller gives up
            claim.cancel()
            with pytest.raises(asyncio.CancelledError):
                await claim

        await cancelled_claim()
        # Whether or not the thread took the lock, it is free again soon.
        leases: list[Lease | Published | None] = []

        async def claim_again() -> bool:
            leases.append(await b.try_lead(key, 10.0))
            return isinstance(leases[-1], Lease)

        deadline = time.monotonic() + 30  # only so that a lost lease fails instead of hanging
        while not await claim_again():
            assert time.monotonic() < deadline, "the abandoned lease was never given back"
            await asyncio.sleep(0.005)
        assert a._held == {}
    finally:
        await a.aclose()
        await b.aclose()


LEADER = """
import asyncio, sys
from asgi_token_refresh import FileCoordinator

async def main():
    coordinator = FileCoordinator(sys.argv[1], secret_keys=[sys.argv[2]])
    lease = await coordinator.try_lead(sys.argv[3], 60.0)
    print("leading" if lease is not None else "not leading", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_sigkilled_file_leader_frees_the_grant_at_once(tmp_path: Path) -> None:
    ours = FileCoordinator(tmp_path, secret_keys=[SECRET])
    key = ours.grant_key("grant")
    leader = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LEADER, str(tmp_path), SECRET, key, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert leader.stdout is not None
        assert await leader.stdout.readline() == b"leading\n"
        assert await ours.try_lead(key, 60.0) is None
        # The wait gives up after an hour: if it ends sooner, the lease is gone.
        waiting = asyncio.ensure_future(ours.wait(key, 3600.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        leader.kill()
        async with asyncio.timeout(60):  # only so that a broken wait fails instead of hanging
            assert await waiting is None  # the lease is gone: try to lead
        assert isinstance(await ours.try_lead(key, 60.0), Lease)
    finally:
        if leader.returncode is None:
            leader.kill()
        await leader.wait()
        await ours.aclose()


# -- real worker processes ------------------------------------------------------------------


# Real time would make their verdict depend on the machine's speed: a round of requests that
# outlasts the token's due time sees a second rotation, rightly. So the workers and the provider
# read the wall time from a SharedClock that only the test moves: a token falls due when the test
# says so, never in the middle of a round. The rest runs in real time, with the refresher's
# timeout far above what a flight takes, so a loaded machine only makes these tests slower.

TOKEN_LIFETIME = 60.0  # at most twice the workers' skew (60 s): a token is due half-way through
STORM_TIMEOUT = 30.0  # the refresher's timeout when nothing is meant to time out
# When the leader must stay in flight until the test kills it: the test has this long to do it.
# A Redis lease lives 5 s longer (the refresher's margin), so that is when others take over.
KILL_TIMEOUT = 5.0
REDIS_LEASE = KILL_TIMEOUT + 5.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    workers = Cluster(tmp_path)
    try:
        yield workers
    finally:
        workers.stop()
        print(workers.logs())  # shown when the test failed


@pytest.fixture
def shared_clock(tmp_path: Path) -> SharedClock:
    return SharedClock.create(tmp_path / "wall-time")


def worker_env(
    kind: str,
    idp_url: str,
    clock: SharedClock,
    timeout: float,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> dict[str, str]:
    env = {
        "ATR_WORKER_IDP": idp_url,
        "ATR_WORKER_COORDINATOR": kind,
        "ATR_WORKER_SECRET": SECRET,
        "ATR_WORKER_TIMEOUT": str(timeout),
        "ATR_WORKER_CLOCK": str(clock.path),
    }
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        env["ATR_WORKER_REDIS_URL"] = server.url
    else:
        env["ATR_WORKER_DIRECTORY"] = str(tmp_path / "coordination")
    return env


class Browser:
    """One session's cookie, sent to any worker; one HTTP client per worker."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.http = {w.index: httpx.AsyncClient(base_url=w.url, timeout=30.0) for w in workers}
        self.cookies: dict[str, str] = {}
        self._store = CookieSessionStore([SECRET], secure=False)

    async def aclose(self) -> None:
        for http in self.http.values():
            await http.aclose()

    def _headers(self) -> dict[str, str]:
        return {"cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}

    async def log_in(self, tokens: dict[str, object]) -> None:
        response = await self.http[self.workers[0].index].post("/login", json=tokens)
        assert response.status_code == 200, response.text
        self.keep_cookies([response])

    def keep_cookies(self, responses: list[httpx.Response]) -> None:
        for response in responses:
            if response.cookies:
                self.cookies = dict(response.cookies.items())
                return

    async def get(self, worker: Worker) -> httpx.Response:
        return await self.http[worker.index].get("/token", headers=self._headers())

    async def storm(self, n: int, workers: list[Worker]) -> list[httpx.Response]:
        """``n`` concurrent requests, round-robin over ``workers``."""
        return list(await asyncio.gather(*(self.get(workers[i % len(workers)]) for i in range(n))))

    async def token_set(self) -> TokenSet:
        session = await self._store.load(self.cookies)
        assert session is not None
        return session.token_set

    async def make_due(self, clock: SharedClock) -> None:
        """Move the wall time to when the session's token is due: half a lifetime before
        expiry (the workers' clamped skew), and a second past it against rounding."""
        token_set = await self.token_set()
        due = token_set.expires_at - token_set.lifetime / 2 + 1.0
        clock.advance(max(0.0, due - clock.time()))

    async def until_answered(
        self, workers: list[Worker], patience: float = 60.0
    ) -> list[httpx.Response]:
        """Ask every worker until none answers 503 (a flight timed out, or its memory of it).
        ``patience`` only bounds a test that would otherwise hang."""
        deadline = time.monotonic() + patience
        while True:
            responses = await self.storm(len(workers), workers)
            if all(r.status_code != 503 for r in responses):
                return responses
            assert time.monotonic() < deadline, [r.text for r in responses]
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("kind", KINDS)
async def test_4_workers_200_concurrent_requests_one_refresh_per_rotation(
    kind: str,
    cluster: Cluster,
    shared_clock: SharedClock,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    # Strict: a refresh token presented twice revokes the grant. Each round starts with the
    # token just due, and nothing falls due again until the next one, however long it takes.
    idp = FakeIdP(issuer=None, clock=shared_clock, access_token_lifetime=TOKEN_LIFETIME)
    with serve(idp) as idp_url:
        try:
            env = worker_env(kind, idp_url, shared_clock, STORM_TIMEOUT, request, tmp_path)
            workers = await cluster.start(4, env)
            browser = Browser(workers)
            try:
                await browser.log_in(idp.issue())
                seen = {(await browser.token_set()).access_token}
                for rotation in range(1, 6):
                    await browser.make_due(shared_clock)
                    responses = await browser.storm(200, workers)
                    assert [r.status_code for r in responses] == [200] * 200
                    answers = [r.json() for r in responses]
                    tokens = {a["access_token"] for a in answers}
                    assert len(tokens) == 1, tokens
                    assert tokens.isdisjoint(seen)
                    seen |= tokens
                    assert {a["worker"] for a in answers} == {"0", "1", "2", "3"}
                    # One provider call per rotation, each with a refresh token never presented
                    # before: a second presentation would be reuse_revoked, not success.
                    assert idp.token_calls("refresh_token") == rotation
                    assert idp.token_calls("refresh_token", outcome="success") == rotation
                    browser.keep_cookies(responses)
                    assert (await browser.token_set()).access_token in tokens
                assert idp.grants_revoked == 0
                assert all(w.alive for w in workers)
            finally:
                await browser.aclose()
        finally:
            idp.close()
            cluster.stop()


async def test_two_workers_without_a_coordinator_count_their_duplicate_refresh(
    cluster: Cluster,
    shared_clock: SharedClock,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """Replicas that share sessions (a Redis store) but no coordinator both refresh a session
    that falls due under both at once. A provider with a grace window accepts both calls, so
    nothing fails: the store keeps the first written and refuses the other, which is counted
    as a duplicate (``refresh.duplicates{detected_by="store_conflict"}``) where it happened."""
    idp = FakeIdP(
        issuer=None, clock=shared_clock, access_token_lifetime=TOKEN_LIFETIME, reuse_grace=600.0
    )
    with serve(idp) as idp_url:
        try:
            env = worker_env("redis", idp_url, shared_clock, STORM_TIMEOUT, request, tmp_path)
            env |= {"ATR_WORKER_COORDINATOR": "none", "ATR_WORKER_STORE": "redis"}
            workers = await cluster.start(2, env)
            browser = Browser(workers)
            try:
                await browser.log_in(idp.issue())
                shared_clock.advance(TOKEN_LIFETIME)
                # Both workers' refreshes reach the provider before either is answered.
                gate = idp.pause_token_endpoint()
                both = asyncio.gather(*(browser.get(worker) for worker in workers))
                await asyncio.to_thread(gate.wait_arrived, 2, STORM_TIMEOUT)
                gate.release()
                assert [r.status_code for r in await both] == [200, 200]
                assert idp.token_calls("refresh_token") == 2
                assert idp.token_calls("refresh_token", outcome="reuse_allowed") == 1

                counts = [(await browser.http[w.index].get("/duplicates")).json() for w in workers]
                assert sorted(c.get("store_conflict", 0) for c in counts) == [0, 1]
                assert sum(sum(c.values()) for c in counts) == 1

                # The session goes on with the token set written first, on both workers.
                after = await browser.storm(4, workers)
                assert [r.status_code for r in after] == [200] * 4
                assert len({r.json()["access_token"] for r in after}) == 1
                assert idp.token_calls("refresh_token") == 2
                assert idp.grants_revoked == 0
            finally:
                await browser.aclose()
        finally:
            idp.close()
            cluster.stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("provider", ["grace-window", "strict"])
async def test_a_leader_sigkilled_mid_flight(
    kind: str,
    provider: str,
    cluster: Cluster,
    shared_clock: SharedClock,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """The leader dies after the provider rotated the refresh token and before anyone saw the
    answer. The others take the grant over (FileCoordinator: at once, the kernel drops the
    dead process's lock; Redis: when its lease expires, the refresher's timeout + 5 s) and
    present the used refresh token again. With a grace window the session survives; a strict
    provider revokes the grant and the user must log in again (401)."""
    # The grace window outlasts any takeover this test waits for (until_answered's patience).
    reuse_grace = 600.0 if provider == "grace-window" else 0.0
    idp = FakeIdP(
        issuer=None,
        clock=shared_clock,
        access_token_lifetime=TOKEN_LIFETIME,
        reuse_grace=reuse_grace,
    )
    with serve(idp) as idp_url:
        try:
            env = worker_env(kind, idp_url, shared_clock, KILL_TIMEOUT, request, tmp_path)
            workers = await cluster.start(4, env)
            leader, survivors = workers[0], workers[1:]
            browser = Browser(workers)
            try:
                await browser.log_in(idp.issue())
                await browser.make_due(shared_clock)
                idp.script(Fault.hang_after_consuming())
                sent = time.monotonic()  # the leader takes its lease after this
                doomed = asyncio.gather(
                    *(browser.get(leader) for _ in range(20)), return_exceptions=True
                )
                lost = "fault:hang_after_consuming"
                await until(lambda: idp.token_calls("refresh_token", outcome=lost) == 1)
                leader.kill()
                assert all(isinstance(r, httpx.TransportError) for r in await doomed)

                if kind == "file":
                    # The kernel dropped the dead leader's lock: the first ask is answered. A
                    # lock still held would keep them waiting until their timeout (503).
                    answers = await browser.storm(len(survivors), survivors)
                else:
                    # Nobody takes over while the dead leader's lease lives (it was taken after
                    # `sent`; Redis counts in milliseconds), and somebody does once it is gone.
                    answers = await browser.until_answered(survivors)
                    assert time.monotonic() - sent >= REDIS_LEASE - 0.01
                assert idp.token_calls("refresh_token") == 2  # the takeover, once
                if provider == "strict":
                    assert [r.status_code for r in answers] == [401] * 3
                    assert {r.json()["error"] for r in answers} == {"reauthentication_required"}
                    assert idp.token_calls("refresh_token", outcome="reuse_revoked") == 1
                    assert idp.grants_revoked == 1
                    return
                assert [r.status_code for r in answers] == [200] * 3
                assert len({r.json()["access_token"] for r in answers}) == 1
                assert idp.token_calls("refresh_token", outcome="reuse_allowed") == 1
                assert idp.grants_revoked == 0
                # The session lives on: the next rotation is one provider call again, with the
                # refresh token the takeover got.
                browser.keep_cookies(answers)
                await browser.make_due(shared_clock)
                responses = await browser.storm(60, survivors)
                assert [r.status_code for r in responses] == [200] * 60
                assert len({r.json()["access_token"] for r in responses}) == 1
                assert idp.token_calls("refresh_token") == 3
                assert idp.token_calls("refresh_token", outcome="success") == 1
                assert idp.grants_revoked == 0
            finally:
                await browser.aclose()
        finally:
            idp.close()
            cluster.stop()


async def test_logout_in_one_process_is_final_in_the_others(
    processes: Processes, idp: FakeIdP, clock: FakeClock
) -> None:
    a, b = processes.new(), processes.new()
    session = login(idp, clock)
    await a.refresher.end_session(session, revoke=False)  # B never saw this logout
    clock.advance(EXPIRED)
    with pytest.raises(ReauthenticationRequired) as caught:
        await b.refresher.ensure_fresh(session)  # a tab on B with the pre-logout cookie
    assert caught.value.reason == "no_session"
    assert idp.token_calls("refresh_token") == 0  # B took the published answer
