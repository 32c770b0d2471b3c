"""RedisCoordinator: one flight per grant across processes and hosts, through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from .._coordination import Lease, Published, decode_outcome, encode_outcome
from .._errors import ConfigurationError
from .._per_loop import PerLoop
from .._sealing import Sealer
from ._connection import CLAIM, PEEK, PUBLISH, RELEASE, RENEW, RedisConnection, ms

__all__ = ["RedisCoordinator"]

logger = logging.getLogger(__name__)


class _LoopState:
    """One event loop's pub/sub listener, the followers it wakes and the leases it renews."""

    def __init__(self) -> None:
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}  # by grant key
        self.listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self.renewals: dict[str, asyncio.Task[None]] = {}  # by lease owner

    async def aclose(self) -> None:
        if self.listener is not None:
            self.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.listener
            self.listener = None
        for task in self.renewals.values():
            task.cancel()
        self.renewals.clear()


class RedisCoordinator:
    """Makes "one flight per grant" hold across processes and hosts through Redis.

    ``secret_keys`` seal published results (the first seals, all open) and name the keys;
    every process sharing the grants must use the same keys. Pass it to a Refresher
    (``Refresher(client, coordinator=RedisCoordinator(url, secret_keys=[...]))``).
    If Redis fails, flights fall back to local coordination (counted and logged once).

    ``cluster=True`` talks to a Redis Cluster (``url`` names any one node): a grant's lease
    and result share a hash tag, so each step runs on the node holding the grant's slot, and
    followers are woken through the cluster-wide pub/sub channel (polling remains the
    fallback, and is all there is with a redis-py older than 8.0, whose asyncio cluster client
    has no pub/sub). ``redis_options`` go to ``redis.asyncio.RedisCluster`` then, except
    ``max_connections`` and ``timeout``, which bound this process's commands as a
    ``BlockingConnectionPool`` does for one server.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        secret_keys: Sequence[str | bytes],
        prefix: str = "atr",
        poll_interval: float = 0.25,
        redis_options: Mapping[str, Any] | None = None,
        cluster: bool = False,
    ) -> None:
        if not (math.isfinite(poll_interval) and poll_interval > 0):
            raise ConfigurationError("poll_interval must be a positive number of seconds")
        self._sealer = Sealer(secret_keys, purpose="atr-redis-v1", extra="redis")
        self._redis = RedisConnection(url, redis_options or {}, cluster=cluster)
        # Whether followers can be woken; if not, they poll every poll_interval.
        self._pub_sub = not cluster or _cluster_pub_sub()
        if not self._pub_sub:
            logger.info(
                "redis-py has no pub/sub for Redis Cluster before 8.0: followers poll every %g s",
                poll_interval,
            )
        self.prefix = prefix
        self.channel = f"{prefix}:published"
        self.poll_interval = poll_interval
        # Each event loop with flights has its own subscription, followers and lease renewals.
        self._loops: PerLoop[_LoopState] = PerLoop(_LoopState, close=_LoopState.aclose)

    def __repr__(self) -> str:
        cluster = ", cluster=True" if self._redis.cluster else ""
        return f"RedisCoordinator(prefix={self.prefix!r}{cluster})"

    def _keys(self, key: str) -> tuple[str, str]:
        tagged = f"{self.prefix}:{{{key}}}"  # the hash tag keeps both keys in one Cluster slot
        return f"{tagged}:lock", f"{tagged}:result"

    def grant_key(self, *parts: str | None) -> str:
        return self._sealer.name("grant", *parts)

    async def try_lead(self, key: str, ttl: float) -> Lease | Published | None:
        await self._listening()
        lock, result = self._keys(key)
        owner = secrets.token_hex(16)
        # Register as a follower first, so a result published right after our claim still
        # wakes us (the message cannot arrive before the registration).
        waiter = self._register(key)
        claim = asyncio.ensure_future(
            self._redis.client().eval(CLAIM, 2, lock, result, owner, ms(ttl))
        )
        try:
            reply = await asyncio.shield(claim)
        except BaseException:
            self._unregister(key, waiter)
            # Cancelled while the claim was on its way: if it took the lock, hand it back now
            # rather than leave the grant locked until the lease expires.
            claim.add_done_callback(lambda done: self._give_back(done, key, owner))
            raise
        if reply[0] == 0:
            return None  # keep the waiter for wait()
        self._unregister(key, waiter)
        if reply[0] == 1:
            return decode_outcome(self._sealer, result, reply[1])
        lease = Lease(key, owner)
        self._state.renewals[owner] = asyncio.ensure_future(self._renew(lock, owner, ttl))
        return lease

    async def publish(self, lease: Lease, outcome: Published, ttl: float) -> None:
        self._stop_renewing(lease)
        lock, result = self._keys(lease.key)
        sealed = encode_outcome(self._sealer, result, outcome)
        await self._redis.client().eval(
            PUBLISH, 2, lock, result, lease.owner, sealed, ms(ttl), self.channel, lease.key
        )

    async def release(self, lease: Lease) -> None:
        self._stop_renewing(lease)
        lock, _ = self._keys(lease.key)
        await self._redis.client().eval(RELEASE, 1, lock, lease.owner, self.channel, lease.key)

    async def _lookup(self, key: str) -> Published | None:
        _, result = self._keys(key)
        sealed = await self._redis.client().get(result)
        return None if sealed is None else decode_outcome(self._sealer, result, sealed)

    async def wait(self, key: str, timeout: float) -> Published | None:  # noqa: ASYNC109
        lock, result = self._keys(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                waiters = self._state.waiters.get(key) or [self._register(key)]
                woken = waiters[-1]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self.poll_interval, deadline - loop.time())):
                        await asyncio.shield(woken)
                if woken.done():
                    published = await self._lookup(key)
                    if published is not None:
                        return published
                    return None  # released without an outcome: try to lead
                # No message (pub/sub down, or the leader died): poll.
                reply = await self._redis.client().eval(PEEK, 2, lock, result)
                if reply[0] == 1:
                    return decode_outcome(self._sealer, result, reply[1])
                if reply[0] == 0:
                    return None
            return None
        finally:
            self._state.waiters.pop(key, None)

    async def aclose(self) -> None:
        """Stop the running loop's listener and renewals and close its connection pool."""
        state = self._loops.pop()
        if state is not None:
            await state.aclose()
        await self._redis.aclose()

    # -- internals (on the caller's loop) ------------------------------------------------------

    @property
    def _state(self) -> _LoopState:
        return self._loops.get()

    def _register(self, key: str) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._state.waiters.setdefault(key, []).append(waiter)
        return waiter

    def _unregister(self, key: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._state.waiters.get(key, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._state.waiters.pop(key, None)

    def _give_back(self, claim: asyncio.Future[Any], key: str, owner: str) -> None:
        if claim.cancelled() or claim.exception() is not None or claim.result()[0] != 2:
            return
        lock, _ = self._keys(key)
        release = self._redis.client().eval(RELEASE, 1, lock, owner, self.channel, key)
        asyncio.ensure_future(release).add_done_callback(_ignore_failure)

    def _stop_renewing(self, lease: Lease) -> None:
        task = self._state.renewals.pop(lease.owner, None)
        if task is not None:
            task.cancel()

    async def _renew(self, lock: str, owner: str, ttl: float) -> None:
        """Keep a live leader's lease from expiring under it (a slow provider, say)."""
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                await self._redis.client().eval(RENEW, 1, lock, owner, ms(ttl))
            except Exception:
                logger.debug("could not renew a Redis lease; it may expire")

    async def _listening(self) -> None:
        """Start the pub/sub listener if needed. The first flight of a process waits (up to a
        poll interval) for its subscription, so that it is woken rather than left to poll."""
        if not self._pub_sub:
            return
        state = self._state
        if state.listener is None or state.listener.done():
            state.subscribed = asyncio.Event()
            state.listener = asyncio.ensure_future(self._listen(state))
        if not state.subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await state.subscribed.wait()

    async def _listen(self, state: _LoopState) -> None:
        """Wake local followers when any process publishes; reconnect on failure."""
        while True:
            pubsub = None
            try:
                pubsub = await self._redis.subscribe(self.channel)
                async for message in pubsub.listen():
                    if message.get("type") == "subscribe":  # the server confirmed it
                        state.subscribed.set()
                    if message.get("type") != "message":
                        continue
                    key = message["data"]
                    key = key.decode() if isinstance(key, bytes) else str(key)
                    for waiter in state.waiters.get(key, []):
                        if not waiter.done():
                            waiter.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.debug("Redis pub/sub listener lost its connection; retrying")
                await asyncio.sleep(1.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()


def _cluster_pub_sub() -> bool:
    """Whether redis-py's asyncio cluster client has pub/sub (it came in redis-py 8.0)."""
    import redis.asyncio

    return hasattr(redis.asyncio.RedisCluster, "pubsub")


def _ignore_failure(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is not None:
        logger.debug("could not hand back an abandoned Redis lease; it will expire")
