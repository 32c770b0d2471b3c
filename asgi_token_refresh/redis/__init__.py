"""Redis: one flight per grant across workers and hosts, and server-side sessions.

Needs the ``redis`` extra (redis-py asyncio; Redis 6/7 and Valkey). ``cluster=True`` talks to a
Redis Cluster: keys carry a hash tag, so a grant's lock and result live in one slot (one node
runs each script), and pub/sub messages reach every node. Values are sealed with the app's
secret keys (AES-GCM), so Redis never holds a plaintext token. Each event loop gets its own
connection pool (``PerLoop``); in a server that is one pool per process.

Round trips per flight: the leader makes two (claim, publish); a follower makes one claim, is
woken by pub/sub (polling is the fallback) and makes one lookup. The fresh path makes none.
"""

try:
    import redis.asyncio  # noqa: F401 - say what is missing at import, not at first use
except ImportError as missing:  # pragma: no cover - depends on the installation
    raise ImportError(
        "asgi_token_refresh.redis needs the 'redis' package: "
        "pip install 'asgi-token-refresh[redis]'"
    ) from missing

from ._coordinator import RedisCoordinator
from ._sessions import RedisSessionBackend, RedisSessionStore

__all__ = ["RedisCoordinator", "RedisSessionBackend", "RedisSessionStore"]
