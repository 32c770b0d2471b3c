"""RedisSessionStore and RedisCoordinator against a real three-node Redis Cluster on loopback
(``cluster=True``): sessions and grants spread over the nodes, each grant's lease and result in
one slot, one provider call per grant across processes, followers woken through the cluster's
pub/sub from whichever node published."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio

from asgi_token_refresh import Lease, RefreshUnavailable, Session, TokenSet
from asgi_token_refresh.redis import RedisCoordinator, RedisSessionStore
from asgi_token_refresh.testing import FakeClock, FakeIdP

from .helpers import login
from .processes import RedisCluster, running_redis_cluster
from .test_coordination import (
    COORDINATOR_ERRORS,
    EXPIRED,
    REFRESHES,
    TOKEN_REQUESTS,
    Processes,
    storm_on_two,
)

pytestmark = pytest.mark.anyio

SECRET = "redis-cluster-tests-secret-" + "c" * 32
NEW_SECRET = "redis-cluster-tests-rotated-" + "d" * 32
NOW = 1_700_000_000.0
ENOUGH = 100  # tries to put a key on every node (failing after them has odds of 3 * (2/3)**100)


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    with running_redis_cluster() as cluster:
        yield cluster


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> RedisCluster:
    """The module's cluster, emptied for this test."""
    for node in redis_cluster.nodes:
        node.cli("FLUSHALL")
    return redis_cluster


@pytest.fixture
async def store(cluster: RedisCluster) -> AsyncIterator[RedisSessionStore]:
    session_store = RedisSessionStore(cluster.url, secret_keys=[SECRET], cluster=True)
    try:
        yield session_store
    finally:
        await session_store.aclose()


@pytest.fixture
async def processes(
    cluster: RedisCluster, idp: FakeIdP, clock: FakeClock
) -> AsyncIterator[Processes]:
    started = Processes(
        idp,
        clock,
        lambda: RedisCoordinator(
            cluster.url, secret_keys=[SECRET], poll_interval=0.02, cluster=True
        ),
    )
    try:
        yield started
    finally:
        await started.aclose()


def key_counts(cluster: RedisCluster) -> list[int]:
    """How many keys each node holds (asked of the node itself, not through a cluster client)."""
    return [int(node.cli("DBSIZE")) for node in cluster.nodes]


def token_set(generation: float = NOW) -> TokenSet:
    tag = f"{generation:.0f}-{random.randrange(10**12):012d}"
    return TokenSet(
        access_token=f"at-{tag}",
        refresh_token=f"rt-{tag}",
        scope="openid offline_access",
        issued_at=generation,
        expires_at=generation + 300,
    )


# -- sessions -------------------------------------------------------------------------------------


async def test_sessions_spread_over_the_nodes_and_round_trip(
    store: RedisSessionStore, cluster: RedisCluster
) -> None:
    sessions: list[Session] = []
    while 0 in key_counts(cluster):
        assert len(sessions) < ENOUGH, key_counts(cluster)
        session, cookies = await store.save({}, None, token_set(), new_session=True)
        assert session is not None
        assert session.id is not None
        assert cookies[0].startswith(f"atr_sid={session.id};")
        sessions.append(session)
    assert sum(key_counts(cluster)) == len(sessions)  # one key per session, on every node

    for session in sessions:
        jar = {"atr_sid": session.id or ""}
        assert await store.load(jar) == session
        # A refresh is stored (compare-and-set on the generation) and read back...
        newer = token_set(NOW + 300)
        await store.persist(session, newer)
        assert await store.read(session) == newer
        # ...and a slower writer of an older generation never moves the session back.
        await store.persist(session, token_set(NOW + 1))
        assert await store.read(session) == newer
        refreshed = Session(newer, session.id)
        assert await store.load(jar) == refreshed

        cleared, cookies = await store.save(jar, refreshed, None)
        assert cleared is None
        assert cookies[0].startswith("atr_sid=; Max-Age=0;")
        assert await store.load(jar) is None
    assert key_counts(cluster) == [0, 0, 0]


async def test_after_a_key_rotation_sessions_are_found_and_moved_to_the_new_name(
    store: RedisSessionStore, cluster: RedisCluster
) -> None:
    """A new key prepended: each session is found under its old key's name, moved to the new
    one (its TTL kept), and ended under both by a logout."""
    sessions: list[Session] = []
    while 0 in key_counts(cluster):
        assert len(sessions) < ENOUGH, key_counts(cluster)
        session, _ = await store.save({}, None, token_set(), new_session=True)
        assert session is not None
        sessions.append(session)
    rotated = RedisSessionStore(cluster.url, secret_keys=[NEW_SECRET, SECRET], cluster=True)
    try:
        for session in sessions:
            jar = {"atr_sid": session.id or ""}
            assert await rotated.load(jar) == session
            assert await rotated.load(jar) == session  # now under the new name only
        assert sum(key_counts(cluster)) == len(sessions)
        for session in sessions:
            jar = {"atr_sid": session.id or ""}
            await rotated.save(jar, session, None)
            assert await rotated.load(jar) is None
            assert await store.load(jar) is None
        assert key_counts(cluster) == [0, 0, 0]
    finally:
        await rotated.aclose()


async def test_a_storm_of_loads_waits_for_connections_instead_of_failing(
    cluster: RedisCluster,
) -> None:
    """redis-py's cluster client fails a command at once when a node's connections are all
    busy; the store's commands wait for one of ``max_connections`` turns instead."""
    store = RedisSessionStore(
        cluster.url, secret_keys=[SECRET], cluster=True, redis_options={"max_connections": 3}
    )
    try:
        saved = [await store.save({}, None, token_set(), new_session=True) for _ in range(10)]
        jars = [{"atr_sid": session.id or ""} for session, _ in saved if session is not None]
        loaded = await asyncio.gather(*(store.load(jars[i % 10]) for i in range(300)))
        assert loaded == [saved[i % 10][0] for i in range(300)]
    finally:
        await store.aclose()


async def test_a_frozen_node_is_a_503_within_the_timeout_and_the_session_is_kept(
    store: RedisSessionStore, cluster: RedisCluster
) -> None:
    sessions: dict[int, Session] = {}  # by the node holding it
    for _ in range(ENOUGH):
        before = key_counts(cluster)
        session, _ = await store.save({}, None, token_set(), new_session=True)
        assert session is not None
        after = key_counts(cluster)
        [node] = [i for i in range(len(after)) if after[i] != before[i]]
        sessions.setdefault(node, session)
        if len(sessions) == len(cluster.nodes):
            break
    assert len(sessions) == len(cluster.nodes)

    # Sockets that would wait an hour: only the store's timeout, which bounds each command
    # whole (the cluster client's retries included), can end a read from a frozen node.
    patient = {"socket_timeout": 3600, "socket_connect_timeout": 3600}
    quick = RedisSessionStore(
        cluster.url, secret_keys=[SECRET], cluster=True, timeout=0.3, redis_options=patient
    )
    frozen = cluster.nodes[0].process.pid
    try:
        assert await quick.read(sessions[1]) == sessions[1].token_set  # it knows the cluster
        os.kill(frozen, signal.SIGSTOP)
        async with asyncio.timeout(60):  # only so that a missing bound fails instead of hanging
            with pytest.raises(RefreshUnavailable) as unavailable:
                await quick.read(sessions[0])
            assert unavailable.value.reason == "store_unavailable"
            assert unavailable.value.retry_after is not None
            assert await quick.read(sessions[1]) == sessions[1].token_set  # the others answer
    finally:
        os.kill(frozen, signal.SIGCONT)
        await quick.aclose()
    assert await store.read(sessions[0]) == sessions[0].token_set  # nothing was lost


# -- coordination ---------------------------------------------------------------------------------


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
    assert a.telemetry.value(REFRESHES) == 1
    assert b.telemetry.value(REFRESHES) == 0  # B never called the provider
    assert b.telemetry.value(TOKEN_REQUESTS, dedupe="distributed") == 1  # its one flight
    assert a.telemetry.value(COORDINATOR_ERRORS) == b.telemetry.value(COORDINATOR_ERRORS) == 0


async def test_a_process_that_missed_the_refresh_finds_the_published_outcome(
    processes: Processes, idp: FakeIdP, clock: FakeClock, cluster: RedisCluster
) -> None:
    a, c = processes.new(), processes.new()
    session = login(idp, clock)
    clock.advance(EXPIRED)
    new = await a.refresher.ensure_fresh(session)
    assert sum(key_counts(cluster)) == 1  # the result: the lease is gone once published

    late = await asyncio.gather(*(c.refresher.ensure_fresh(session) for _ in range(20)))
    assert {t.access_token for t in late} == {new.access_token}
    assert {t.refresh_token for t in late} == {new.refresh_token}
    assert idp.token_calls("refresh_token") == 1
    assert c.telemetry.value(REFRESHES) == 0
    assert c.telemetry.value(TOKEN_REQUESTS, dedupe="distributed") == 1
    assert a.telemetry.value(COORDINATOR_ERRORS) == c.telemetry.value(COORDINATOR_ERRORS) == 0


async def test_followers_are_woken_by_pub_sub_whichever_node_holds_the_grant(
    cluster: RedisCluster, idp: FakeIdP, clock: FakeClock
) -> None:
    """Polling is a fallback every ten minutes here: only the message a leader publishes,
    carried between the nodes by the cluster bus, can wake the follower in time."""
    leader = RedisCoordinator(cluster.url, secret_keys=[SECRET], poll_interval=600, cluster=True)
    follower = RedisCoordinator(cluster.url, secret_keys=[SECRET], poll_interval=600, cluster=True)
    woken_on: set[int] = set()  # the nodes whose grants woke the follower
    try:
        async with asyncio.timeout(60):
            for grant in range(ENOUGH):
                if len(woken_on) == len(cluster.nodes):
                    break
                key = leader.grant_key(f"grant-{grant}")
                lease = await leader.try_lead(key, 30.0)
                assert isinstance(lease, Lease)
                assert await follower.try_lead(key, 30.0) is None
                waiting = asyncio.ensure_future(follower.wait(key, 600.0))
                before = key_counts(cluster)
                session = login(idp, clock, f"user-{grant}")
                await leader.publish(lease, session, 60.0)
                published = await waiting
                assert isinstance(published, TokenSet)
                assert published.access_token == session.access_token
                # The lease and the result share a hash tag: the result replaced the lease
                # on the node that holds the grant's slot.
                after = key_counts(cluster)
                assert after == before
                woken_on |= {i for i, count in enumerate(after) if count > 0}
                for node in cluster.nodes:
                    node.cli("FLUSHALL")
            assert len(woken_on) == len(cluster.nodes)
    finally:
        await leader.aclose()
        await follower.aclose()


async def test_with_a_redis_py_without_cluster_pub_sub_followers_poll_quietly(
    cluster: RedisCluster,
    idp: FakeIdP,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """redis-py's asyncio cluster client has pub/sub from 8.0 on; before, followers poll
    every ``poll_interval``: said once, at INFO, and nothing else (no listener retrying)."""
    monkeypatch.delattr(redis.asyncio.RedisCluster, "pubsub")
    caplog.set_level(logging.DEBUG, logger="asgi_token_refresh")
    processes = Processes(
        idp,
        clock,
        lambda: RedisCoordinator(
            cluster.url, secret_keys=[SECRET], poll_interval=0.02, cluster=True
        ),
    )
    try:
        a, b = processes.new(), processes.new()
        session = login(idp, clock)
        clock.advance(EXPIRED)
        on_a, on_b = await storm_on_two(idp, a, b, session)
        assert len({r.access_token for r in on_a + on_b if isinstance(r, TokenSet)}) == 1
        assert len(on_a + on_b) == 100
        assert idp.token_calls("refresh_token") == 1
        assert b.telemetry.value(TOKEN_REQUESTS, dedupe="distributed") == 1
        assert a.telemetry.value(COORDINATOR_ERRORS) == b.telemetry.value(COORDINATOR_ERRORS) == 0
    finally:
        await processes.aclose()
    # (DEBUG has a line per flight besides)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert (
        said
        == [
            (
                logging.INFO,
                "redis-py has no pub/sub for Redis Cluster before 8.0: followers poll every 0.02 s",
            )
        ]
        * 2
    )
