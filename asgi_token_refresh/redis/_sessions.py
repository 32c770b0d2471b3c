"""RedisSessionStore: server-side sessions in Redis, shared by every worker and host."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

import redis.exceptions

from .._errors import ConfigurationError, RefreshUnavailable
from .._sealing import Sealer
from .._sessions import BackendSessionStore, SessionCookie
from .._tokens import TokenSet
from ._connection import STORE_SESSION, RedisConnection, ms

__all__ = ["RedisSessionBackend", "RedisSessionStore"]

logger = logging.getLogger(__name__)

_STORE_RETRY_AFTER = 2.0  # seconds a browser waits before it asks again while Redis is down


# A moved session whose old key had no TTL (it always has one) keeps this many seconds.
_MOVED_TTL = 30 * 24 * 3600.0


def _serialised(token_set: TokenSet) -> bytes:
    return json.dumps(token_set.to_dict(), separators=(",", ":")).encode()


class RedisSessionBackend:
    """Token sets by session id in Redis hashes: sealed at rest, under a keyed hash of the
    session id (reading Redis yields neither tokens nor usable session ids), compare-and-set
    on the generation in one Lua round trip. ``cluster=True``: a Redis Cluster, as for
    :class:`RedisSessionStore`."""

    def __init__(
        self,
        url: str,
        *,
        secret_keys: Sequence[str | bytes],
        prefix: str = "atr",
        timeout: float = 1.0,
        redis_options: Mapping[str, Any] | None = None,
        cluster: bool = False,
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigurationError("timeout must be a positive number of seconds")
        self.prefix = prefix
        self.timeout = timeout
        self._sealer = Sealer(secret_keys, purpose="atr-session-v1", extra="redis")
        # A request waits at most ``timeout`` for Redis: to connect, for an answer, and for a
        # free connection of the pool (redis-py's own default there is 20 s). With a cluster,
        # ``timeout`` bounds each command whole, the cluster client's retries included.
        bounded = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "timeout": timeout}
        self._redis = RedisConnection(url, {**bounded, **(redis_options or {})}, cluster=cluster)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{self._sealer.name('session', session_id)}"

    def _keys(self, session_id: str) -> list[str]:
        """The session's key under every secret key, the current one first."""
        return [f"{self.prefix}:session:{n}" for n in self._sealer.names("session", session_id)]

    async def get(self, session_id: str) -> TokenSet | None:
        keys = self._keys(session_id)
        for key in keys:  # older names hold what was stored before the keys rotated
            token_set = await self._read(key)
            if token_set is not None:
                if key != keys[0]:
                    await self._move(key, keys[0], token_set)
                return token_set
        return None

    async def _move(self, old: str, new: str, token_set: TokenSet) -> None:
        """Bring a session stored under an older key's name to the current one, once."""
        client = self._redis.client()
        try:
            remaining = await client.pttl(old)
            sealed = self._sealer.seal(_serialised(token_set), new.encode())
            ttl = remaining if remaining and remaining > 0 else ms(_MOVED_TTL)
            await client.eval(STORE_SESSION, 1, new, *self._order(token_set), sealed, ttl, 1)
            await client.delete(old)
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from None

    async def _read(self, key: str) -> TokenSet | None:
        try:
            sealed = await self._redis.client().hget(key, "token_set")
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):  # BUSY, NOPERM...: Redis fails, not the value
                raise self._unavailable(exc) from None
            logger.warning("a session key in Redis holds another type of value; no session")
            return None
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from None
        if sealed is None:
            return None
        try:
            return TokenSet.from_dict(json.loads(self._sealer.open(sealed, key.encode())))
        except ValueError:
            logger.warning("rejected a session value in Redis that does not authenticate")
            return None

    async def put(self, session_id: str, token_set: TokenSet, ttl: float, *, create: bool) -> bool:
        key = self._key(session_id)
        sealed = self._sealer.seal(_serialised(token_set), key.encode())
        try:
            stored = await self._redis.client().eval(
                STORE_SESSION, 1, key, *self._order(token_set), sealed, ms(ttl), int(create)
            )
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from None
        return bool(stored)

    def _order(self, token_set: TokenSet) -> tuple[int, str, str]:
        """What the compare-and-set compares: generation, issue time and a keyed hash of the
        access token (the same token set written again is not a conflict)."""
        fingerprint = self._sealer.name("fingerprint", token_set.access_token)
        return token_set.generation, repr(token_set.issued_at), fingerprint

    async def delete(self, session_id: str) -> None:
        try:
            for key in self._keys(session_id):  # one by one: in a cluster they are in any slot
                await self._redis.client().delete(key)
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: Exception) -> RefreshUnavailable:
        """Redis is unreachable, frozen or failing: a 503 that keeps the session (its cookie
        is not touched), rather than a 500 or an anonymous request."""
        return RefreshUnavailable(
            "store_unavailable", retry_after=_STORE_RETRY_AFTER, detail=type(exc).__name__
        )

    async def aclose(self) -> None:
        await self._redis.aclose()


class RedisSessionStore(BackendSessionStore):
    """Server-side sessions in Redis, behind an opaque random id in a cookie.

    Token sets are sealed at rest; the Redis key is a keyed hash of the session id, so
    reading Redis yields neither tokens nor usable session ids. Writes are compare-and-set
    on the token generation: a slower writer never moves a session back. Sessions expire
    ``max_age`` after their last write, or with the refresh token when the provider says
    (``refresh_expires_in``). Shared by every worker and host using the same Redis and keys.

    A value of another type or that does not authenticate is no session. If Redis does not
    answer within ``timeout`` seconds (unreachable, frozen, failing), the request gets a 503
    with ``Retry-After`` and the session is kept.

    ``cluster=True`` talks to a Redis Cluster (``url`` names any one node): each session is one
    key, so sessions spread over the nodes' slots. ``redis_options`` go to
    ``redis.asyncio.RedisCluster`` then, except ``max_connections`` (default 50 per process),
    which bounds this process's commands in flight, as ``BlockingConnectionPool`` does.
    """

    def __init__(
        self,
        url: str,
        *,
        secret_keys: Sequence[str | bytes],
        prefix: str = "atr",
        timeout: float = 1.0,
        redis_options: Mapping[str, Any] | None = None,
        cluster: bool = False,
        **cookie: Unpack[SessionCookie],
    ) -> None:
        self._redis_backend = RedisSessionBackend(
            url,
            secret_keys=secret_keys,
            prefix=prefix,
            timeout=timeout,
            redis_options=redis_options,
            cluster=cluster,
        )
        super().__init__(self._redis_backend, **cookie)
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"RedisSessionStore(cookie_name={self.cookie_name!r}, prefix={self.prefix!r})"

    async def aclose(self) -> None:
        """Close the running loop's connection pool."""
        await self._redis_backend.aclose()
