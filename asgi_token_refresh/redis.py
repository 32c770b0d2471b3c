"""Redis: one flight per grant across workers and hosts, and server-side sessions.

Needs the ``redis`` extra (redis-py asyncio; Redis 6/7 and Valkey). Keys carry a hash tag, so a
grant's lock and result live in one Cluster slot; values are sealed with the app's secret keys
(AES-GCM), so Redis never holds a plaintext token. All Redis I/O runs on the library's I/O loop:
one connection pool per process, usable from any event loop or thread.

Round trips per flight: the leader makes two (claim, publish); a follower makes one claim, is
woken by pub/sub (polling is the fallback) and makes one lookup. The fresh path makes none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from ._coordination import Lease, Published, decode_outcome, encode_outcome
from ._errors import ConfigurationError
from ._ioloop import io_loop, reset_after_fork
from ._sealing import Sealer
from ._stores import CookieWriter, SameSite, Session, session_max_age, validate_cookie_options
from ._tokens import TokenSet

__all__ = ["RedisCoordinator", "RedisSessionStore"]

logger = logging.getLogger("asgi_token_refresh")

# KEYS: lock, result. ARGV: owner, lease ms. -> {1, result} | {2} (lead) | {0} (follow)
_CLAIM = """
local published = redis.call('GET', KEYS[2])
if published then return {1, published} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
"""
# KEYS: lock, result. ARGV: owner, sealed outcome, ttl ms, channel, message.
_PUBLISH = """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
# KEYS: lock. ARGV: owner, channel, message. Compare-and-delete, then wake the followers.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
# KEYS: lock. ARGV: owner, lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lock, result. -> {1, result} | {2} (still led) | {0} (lease gone, no result)
_PEEK = """
local published = redis.call('GET', KEYS[2])
if published then return {1, published} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {2} end
return {0}
"""
# KEYS: session. ARGV: generation, sealed token set, ttl ms. Never moves back a generation.
_STORE_SESSION = """
local current = tonumber(redis.call('HGET', KEYS[1], 'generation'))
if current and current > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'token_set', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class _RedisOnIOLoop:
    """A redis-py asyncio client living on the library's I/O loop (created there lazily)."""

    def __init__(self, url: str, options: Mapping[str, Any]) -> None:
        try:
            import redis.asyncio  # noqa: F401 - fail at construction, not on first use
        except ImportError:  # pragma: no cover - depends on the installation
            raise ConfigurationError(
                "Redis support needs the 'redis' package: pip install 'asgi-token-refresh[redis]'"
            ) from None
        self.url = url
        self.options = {"socket_timeout": 1.0, "socket_connect_timeout": 0.5, **options}
        self._client: Any = None
        reset_after_fork(self)

    def client(self) -> Any:
        if self._client is None:
            import redis.asyncio

            # Blocking: past max_connections (redis_options, default 50) a command waits for a
            # free connection (up to ``timeout``, default 20 s) instead of failing at once with
            # MaxConnectionsError, as recent redis-py's default pool does past 100: a storm of
            # requests would get 500s.
            pool = redis.asyncio.BlockingConnectionPool.from_url(self.url, **self.options)
            self._client = redis.asyncio.Redis(connection_pool=pool)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose(close_connection_pool=True)  # a pool passed in is kept otherwise

    def _after_fork_in_child(self) -> None:
        self._client = None  # its connections belong to the parent's I/O loop


class RedisCoordinator:
    """Makes "one flight per grant" hold across processes and hosts through Redis.

    ``secret_keys`` seal published results (the first seals, all open) and name the keys;
    every process sharing the grants must use the same keys. Pass it to a Refresher
    (``Refresher(client, coordinator=RedisCoordinator(url, secret_keys=[...]))``).
    If Redis fails, flights fall back to local coordination (counted and logged once).
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
    ) -> None:
        if not (math.isfinite(poll_interval) and poll_interval > 0):
            raise ConfigurationError("poll_interval must be a positive number of seconds")
        self._sealer = Sealer(secret_keys, purpose="atr-redis-v1", extra="redis")
        self._redis = _RedisOnIOLoop(url, redis_options or {})
        self.prefix = prefix
        self.channel = f"{prefix}:published"
        self.poll_interval = poll_interval
        # Followers waiting in this process, by grant key; resolved by the pub/sub listener.
        # Touched only on the I/O loop.
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()  # loop-agnostic until awaited (made on the I/O loop)
        self._renewals: dict[str, asyncio.Task[None]] = {}
        reset_after_fork(self)

    def __repr__(self) -> str:
        return f"RedisCoordinator(prefix={self.prefix!r})"

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
            self._redis.client().eval(_CLAIM, 2, lock, result, owner, _ms(ttl))
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
        self._renewals[owner] = asyncio.ensure_future(self._renew(lock, owner, ttl))
        return lease

    async def publish(self, lease: Lease, outcome: Published, ttl: float) -> None:
        self._stop_renewing(lease)
        lock, result = self._keys(lease.key)
        sealed = encode_outcome(self._sealer, result, outcome)
        await self._redis.client().eval(
            _PUBLISH, 2, lock, result, lease.owner, sealed, _ms(ttl), self.channel, lease.key
        )

    async def release(self, lease: Lease) -> None:
        self._stop_renewing(lease)
        lock, _ = self._keys(lease.key)
        await self._redis.client().eval(_RELEASE, 1, lock, lease.owner, self.channel, lease.key)

    async def lookup(self, key: str) -> Published | None:
        _, result = self._keys(key)
        sealed = await self._redis.client().get(result)
        return None if sealed is None else decode_outcome(self._sealer, result, sealed)

    async def wait(self, key: str, timeout: float) -> Published | None:  # noqa: ASYNC109
        lock, result = self._keys(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                waiters = self._waiters.get(key) or [self._register(key)]
                woken = waiters[-1]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self.poll_interval, deadline - loop.time())):
                        await asyncio.shield(woken)
                if woken.done():
                    published = await self.lookup(key)
                    if published is not None:
                        return published
                    return None  # released without an outcome: try to lead
                # No message (pub/sub down, or the leader died): poll.
                reply = await self._redis.client().eval(_PEEK, 2, lock, result)
                if reply[0] == 1:
                    return decode_outcome(self._sealer, result, reply[1])
                if reply[0] == 0:
                    return None
            return None
        finally:
            self._waiters.pop(key, None)

    async def aclose(self) -> None:
        """Stop the listener and close the connection pool (from any loop)."""
        await io_loop.run(self._aclose())

    async def _aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        for task in self._renewals.values():
            task.cancel()
        self._renewals.clear()
        await self._redis.aclose()

    # -- internals (on the I/O loop) ---------------------------------------------------------

    def _register(self, key: str) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(waiter)
        return waiter

    def _unregister(self, key: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(key, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop(key, None)

    def _give_back(self, claim: asyncio.Future[Any], key: str, owner: str) -> None:
        if claim.cancelled() or claim.exception() is not None or claim.result()[0] != 2:
            return
        lock, _ = self._keys(key)
        release = self._redis.client().eval(_RELEASE, 1, lock, owner, self.channel, key)
        asyncio.ensure_future(release).add_done_callback(_ignore_failure)

    def _stop_renewing(self, lease: Lease) -> None:
        task = self._renewals.pop(lease.owner, None)
        if task is not None:
            task.cancel()

    async def _renew(self, lock: str, owner: str, ttl: float) -> None:
        """Keep a live leader's lease from expiring under it (a slow provider, say)."""
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                await self._redis.client().eval(_RENEW, 1, lock, owner, _ms(ttl))
            except Exception:
                logger.debug("could not renew a Redis lease; it may expire")

    async def _listening(self) -> None:
        """Start the pub/sub listener if needed. The first flight of a process waits (up to a
        poll interval) for its subscription, so that it is woken rather than left to poll."""
        if self._listener is None or self._listener.done():
            self._subscribed = asyncio.Event()
            self._listener = asyncio.ensure_future(self._listen())
        if not self._subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._subscribed.wait()

    async def _listen(self) -> None:
        """Wake local followers when any process publishes; reconnect on failure."""
        while True:
            pubsub = self._redis.client().pubsub()
            try:
                await pubsub.subscribe(self.channel)
                async for message in pubsub.listen():
                    if message.get("type") == "subscribe":  # the server confirmed it
                        self._subscribed.set()
                    if message.get("type") != "message":
                        continue
                    key = message["data"]
                    key = key.decode() if isinstance(key, bytes) else str(key)
                    for waiter in self._waiters.get(key, []):
                        if not waiter.done():
                            waiter.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.debug("Redis pub/sub listener lost its connection; retrying")
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _after_fork_in_child(self) -> None:
        self._waiters = {}
        self._listener = None
        self._renewals = {}


def _ignore_failure(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is not None:
        logger.debug("could not hand back an abandoned Redis lease; it will expire")


class RedisSessionStore:
    """Server-side sessions in Redis, behind an opaque random id in a cookie.

    Token sets are sealed at rest; the Redis key is a keyed hash of the session id, so
    reading Redis yields neither tokens nor usable session ids. Writes are compare-and-set
    on the token generation: a slower writer never moves a session back. Sessions expire
    ``max_age`` after their last write, or with the refresh token when the provider says
    (``refresh_expires_in``). Shared by every worker and host using the same Redis and keys.
    """

    server_side = True

    def __init__(
        self,
        url: str,
        *,
        secret_keys: Sequence[str | bytes],
        cookie_name: str = "atr_sid",
        prefix: str = "atr",
        secure: bool = True,
        same_site: SameSite = "lax",
        path: str = "/",
        domain: str | None = None,
        max_age: float = 30 * 24 * 3600,
        redis_options: Mapping[str, Any] | None = None,
    ) -> None:
        validate_cookie_options(cookie_name, same_site, secure, max_age)
        self.cookie_name = cookie_name
        self.prefix = prefix
        self._sealer = Sealer(secret_keys, purpose="atr-session-v1", extra="redis")
        self._redis = _RedisOnIOLoop(url, redis_options or {})
        self._writer = CookieWriter(
            path=path, domain=domain, secure=secure, same_site=same_site, max_age=max_age
        )

    def __repr__(self) -> str:
        return f"RedisSessionStore(cookie_name={self.cookie_name!r}, prefix={self.prefix!r})"

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{self._sealer.name('session', session_id)}"

    async def aclose(self) -> None:
        await io_loop.run(self._redis.aclose())

    # -- SessionStore --------------------------------------------------------------------------

    async def load(self, cookies: Mapping[str, str]) -> Session | None:
        session_id = cookies.get(self.cookie_name)
        if not session_id or len(session_id) > 128:
            return None
        token_set = await io_loop.run(self._get(session_id))
        return None if token_set is None else Session(token_set, session_id)

    async def save(
        self,
        cookies: Mapping[str, str],
        previous: Session | None,
        token_set: TokenSet | None,
        *,
        new_session: bool = False,
    ) -> tuple[Session | None, list[str]]:
        if previous is not None and previous.id and (new_session or token_set is None):
            await io_loop.run(self._delete(previous.id))
        if token_set is None:
            present = self.cookie_name in cookies
            return None, [self._writer.delete(self.cookie_name)] if present else []
        session_id = (
            previous.id
            if previous is not None and previous.id and not new_session
            else secrets.token_urlsafe(32)
        )
        await io_loop.run(self._put(session_id, token_set))
        max_age = session_max_age(token_set, self._writer.max_age)
        return Session(token_set, session_id), [
            self._writer.set(self.cookie_name, session_id, max_age)
        ]

    async def read(self, session: Session) -> TokenSet | None:
        return None if session.id is None else await io_loop.run(self._get(session.id))

    async def persist(self, session: Session, token_set: TokenSet) -> None:
        if session.id is not None:
            await io_loop.run(self._put(session.id, token_set))

    # -- I/O (on the I/O loop) -------------------------------------------------------------------

    async def _get(self, session_id: str) -> TokenSet | None:
        key = self._key(session_id)
        sealed = await self._redis.client().hget(key, "token_set")
        if sealed is None:
            return None
        try:
            return TokenSet.from_dict(json.loads(self._sealer.open(sealed, key.encode())))
        except ValueError:
            logger.warning("rejected a session value in Redis that does not authenticate")
            return None

    async def _put(self, session_id: str, token_set: TokenSet) -> None:
        key = self._key(session_id)
        plaintext = json.dumps(token_set.to_dict(), separators=(",", ":")).encode()
        sealed = self._sealer.seal(plaintext, key.encode())
        ttl = _ms(session_max_age(token_set, self._writer.max_age))
        await self._redis.client().eval(
            _STORE_SESSION, 1, key, repr(token_set.issued_at), sealed, ttl
        )

    async def _delete(self, session_id: str) -> None:
        await self._redis.client().delete(self._key(session_id))
