"""The Redis connection and the Lua scripts that make each step one atomic round trip."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .._per_loop import PerLoop

__all__ = [
    "CLAIM",
    "PEEK",
    "PUBLISH",
    "RELEASE",
    "RENEW",
    "STORE_SESSION",
    "ClusterClient",
    "RedisConnection",
    "ms",
]

# KEYS: lock, result. ARGV: owner, lease ms. -> {1, result} | {2} (lead) | {0} (follow)
CLAIM = """
local published = redis.call('GET', KEYS[2])
if published then return {1, published} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
"""
# KEYS: lock, result. ARGV: owner, sealed outcome, ttl ms, channel, message.
PUBLISH = """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
# KEYS: lock. ARGV: owner, channel, message. Compare-and-delete, then wake the followers.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
# KEYS: lock. ARGV: owner, lease ms.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lock, result. -> {1, result} | {2} (still led) | {0} (lease gone, no result)
PEEK = """
local published = redis.call('GET', KEYS[2])
if published then return {1, published} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {2} end
return {0}
"""
# KEYS: session. ARGV: generation, issued_at, fingerprint, sealed, ttl ms, create (1|0).
# The supersedes rule of asgi_token_refresh.kit: the same token set again, a later generation,
# or, for generation 0 (unknown lineage), a later issued_at. With create=0, never brings back a
# session that is gone (logged out, expired). A hash written before generations were stored
# has only 'generation' = its issued_at: read as generation 0.
STORE_SESSION = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) kind = 'none' end
if kind == 'none' and ARGV[6] == '0' then return 0 end
if kind == 'hash' then
  local stored = redis.call('HMGET', KEYS[1], 'gen', 'at', 'fp', 'generation')
  local gen = tonumber(stored[1]) or 0
  local at = tonumber(stored[2]) or tonumber(stored[4])
  local new_gen, new_at = tonumber(ARGV[1]), tonumber(ARGV[2])
  if at and stored[3] ~= ARGV[3] then
    if new_gen < gen then return 0 end
    if new_gen == gen and (gen > 0 or new_at <= at) then return 0 end
  end
end
redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'at', ARGV[2], 'fp', ARGV[3], 'token_set', ARGV[4])
redis.call('HDEL', KEYS[1], 'generation')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


def ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisConnection:
    """A redis-py asyncio client per event loop (a connection pool belongs to one loop): for
    one server, or for a Redis Cluster (``cluster=True``)."""

    def __init__(self, url: str, options: Mapping[str, Any], *, cluster: bool = False) -> None:
        self.url = url
        self.cluster = cluster
        self.options = {"socket_timeout": 1.0, "socket_connect_timeout": 0.5, **options}
        self._clients: PerLoop[Any] = PerLoop(self._connect, close=_close)

    def client(self) -> Any:
        """The running loop's client."""
        return self._clients.get()

    def _connect(self) -> Any:
        import redis.asyncio

        if self.cluster:
            return ClusterClient(self.url, self.options)
        # Blocking: past max_connections (redis_options, default 50) a command waits for a
        # free connection (up to ``timeout``, default 20 s) instead of failing at once with
        # MaxConnectionsError, as recent redis-py's default pool does past 100: a storm of
        # requests would get 500s.
        pool = redis.asyncio.BlockingConnectionPool.from_url(self.url, **self.options)
        return redis.asyncio.Redis(connection_pool=pool)

    async def subscribe(self, channel: str) -> Any:
        """A pub/sub connection of the running loop's client, subscribed to ``channel``."""
        client = self.client()
        if self.cluster:
            await client.initialize()  # a cluster pub/sub picks its node from the slot map
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(channel)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        return pubsub

    async def aclose(self) -> None:
        """Close the running loop's client and its pool."""
        client = self._clients.pop()
        if client is not None:
            await _close(client)


async def _close(client: Any) -> None:
    if isinstance(client, ClusterClient):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)  # a pool passed in is kept otherwise


class ClusterClient:
    """redis-py's ``RedisCluster`` with the bounds a single server's pool keeps.

    Its own pools fail a command at once with MaxConnectionsError when a node's connections
    are all busy, and it retries a failing command up to ten times. Here, as with
    ``BlockingConnectionPool``, a command waits for one of ``max_connections`` turns (default
    50), and it is done, turn and retries included, within ``timeout`` (default 20 s) or
    raises ``redis.exceptions.TimeoutError``. Commands route by key slot: a script's keys
    share a hash tag, so it runs on the node that holds them all.
    """

    def __init__(self, url: str, options: Mapping[str, Any]) -> None:
        import redis.asyncio

        options = dict(options)
        self.timeout = float(options.pop("timeout", 20.0))
        turns = int(options.pop("max_connections", 50))
        self._turns = asyncio.Semaphore(turns)
        # One connection more per node than there are turns: a pub/sub listener keeps one.
        self.redis = redis.asyncio.RedisCluster.from_url(url, max_connections=turns + 1, **options)

    async def _run(self, command: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        import redis.exceptions

        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline, self._turns:
                return await command(*args)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise redis.exceptions.TimeoutError(
                f"no answer from the Redis Cluster within {self.timeout:g} s"
            ) from None

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._run(self.redis.eval, script, numkeys, *keys_and_args)

    async def get(self, key: str) -> Any:
        return await self._run(self.redis.get, key)

    async def hget(self, key: str, field: str) -> Any:
        return await self._run(self.redis.hget, key, field)

    async def pttl(self, key: str) -> Any:
        return await self._run(self.redis.pttl, key)

    async def delete(self, *keys: str) -> Any:
        return await self._run(self.redis.delete, *keys)

    async def initialize(self) -> None:
        """Learn the cluster's nodes and slots (the first command does it too)."""
        await self._run(self.redis.initialize)

    def pubsub(self) -> Any:
        return self.redis.pubsub()

    async def aclose(self) -> None:
        await self.redis.aclose()
