"""FileCoordinator: one flight per grant across the worker processes of one host, no server.

Leases are ``flock`` locks on one file per grant (``<directory>/locks/<key>.lock``): the kernel
drops a lock when its process dies, even by SIGKILL, so a dead leader frees its grant at once.
Outcomes go to a SQLite database in WAL mode (``<directory>/results.sqlite3``), sealed with the
app's secret keys (AES-GCM, bound to the grant's key), so the disk never holds a plaintext
token. Every file operation runs on a small thread pool; callers await it on their own loop.
The lock files themselves are ``_file_locks``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import math
import os
import secrets
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ._clock import Clock, SystemClock
from ._coordination import Lease, Published, decode_outcome, encode_outcome
from ._errors import ConfigurationError
from ._file_locks import GRANT_KEY, LockFiles, flocked, private_directory
from ._sealing import Sealer

if TYPE_CHECKING:
    import sqlite3

__all__ = ["FileCoordinator"]

T = TypeVar("T")

_BUSY_TIMEOUT = 5.0  # seconds SQLite waits for another process's write lock
_SWEEP_EVERY = 60.0  # seconds between purges of expired results and stray lock files
_THREADS = 4
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    sealed BLOB NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_expiry ON results (expires_at);
"""


class FileCoordinator:
    """Makes "one flight per grant" hold across the processes of one host, through files.

    The embedded choice for several workers (uvicorn ``--workers``, gunicorn) on one machine
    without Redis. ``directory`` must be on a local filesystem shared by the workers (not
    NFS); by default ``<tempdir>/asgi-token-refresh-<uid>``, created private (mode 0700).
    ``secret_keys`` seal published outcomes (the first seals, all open) and name the files;
    every process must use the same keys. A follower looks for the outcome every
    ``poll_interval`` seconds. A live leader keeps its lease until it publishes or gives up
    (its own ``timeout`` bounds that); a dead one loses it at once. On an error the refresher
    falls back to local coordination (counted and logged once), as with Redis.
    """

    name = "file"

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        secret_keys: Sequence[str | bytes],
        poll_interval: float = 0.02,
        clock: Clock | None = None,
    ) -> None:
        if sys.platform == "win32":  # pragma: no cover - no flock there
            raise ConfigurationError("FileCoordinator needs POSIX flock; use RedisCoordinator")
        if not (math.isfinite(poll_interval) and poll_interval > 0):
            raise ConfigurationError("poll_interval must be a positive number of seconds")
        self._sealer = Sealer(secret_keys, purpose="atr-file-v1", extra="cookies")
        if directory is None:
            default = Path(tempfile.gettempdir()) / f"asgi-token-refresh-{os.getuid()}"
            self.directory = private_directory(default, shared_parent=True)
        else:
            self.directory = private_directory(Path(directory), shared_parent=False)
        self._locks = LockFiles(private_directory(self.directory / "locks", shared_parent=False))
        self._database = self.directory / "results.sqlite3"
        self.poll_interval = poll_interval
        # Wall time: results expire at the same instant for every process on the host.
        self._clock = clock or SystemClock()
        # Leases held by this process: owner -> (key, fd of the locked file). Touched from the
        # pool's threads, hence the mutex.
        self._mutex = threading.Lock()
        self._held: dict[str, tuple[str, int]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._next_sweep = 0.0
        self._initialize()
        after_fork = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: _call_if_alive(after_fork))

    def __repr__(self) -> str:
        return f"FileCoordinator(directory={str(self.directory)!r})"

    def grant_key(self, *parts: str | None) -> str:
        return self._sealer.name("grant", *parts)

    # -- the Coordinator protocol (on the caller's loop; the work runs on the pool) -----------

    async def try_lead(self, key: str, ttl: float) -> Lease | Published | None:
        future = self._submit(self._try_lead, _checked(key))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The thread carries on and may take the lease: give it back, or it is held until
            # this process exits.
            future.add_done_callback(self._abandon)
            raise

    async def publish(self, lease: Lease, outcome: Published, ttl: float) -> None:
        sealed = encode_outcome(self._sealer, lease.key, outcome)
        # Shielded: once started, the write and the release finish even if the caller is gone.
        await asyncio.shield(self._submit(self._publish, lease, sealed, max(0.0, ttl)))

    async def release(self, lease: Lease) -> None:
        await asyncio.shield(self._submit(self._release, lease))

    async def wait(self, key: str, timeout: float) -> Published | None:  # noqa: ASYNC109
        key = _checked(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            published, led = await self._submit(self._peek, key)
            if published is not None:
                return published
            remaining = deadline - loop.time()
            if not led or remaining <= 0:
                return None  # the lease is free (released, or its leader died): try to lead
            await asyncio.sleep(min(self.poll_interval, remaining))

    async def aclose(self) -> None:
        """Give up the leases this process holds and stop the thread pool (from any loop)."""
        with self._mutex:
            held, self._held = self._held, {}
        for key, fd in held.values():
            self._locks.unlock(key, fd)
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)

    # -- internals (on the pool's threads) ---------------------------------------------------

    def _submit(self, function: Callable[..., T], *args: object) -> asyncio.Future[T]:
        if self._pool is None:
            with self._mutex:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        _THREADS, thread_name_prefix="asgi-token-refresh-file"
                    )
        return asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(function, *args)
        )

    def _connect(self) -> sqlite3.Connection:
        # One connection per operation: nothing to share between threads or across a fork,
        # and opening a local SQLite file costs microseconds next to a token request.
        import sqlite3  # here: most apps never need it

        connection = sqlite3.connect(self._database, timeout=_BUSY_TIMEOUT, isolation_level=None)
        connection.execute("PRAGMA synchronous=NORMAL")  # durable enough for a cache, in WAL
        return connection

    def _initialize(self) -> None:
        fd = os.open(self._database, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        # Workers start together; switching to WAL wants the database to itself.
        with flocked(self.directory / "init.lock"), contextlib.closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _read(self, db: sqlite3.Connection, key: str) -> Published | None:
        row = db.execute(
            "SELECT sealed FROM results WHERE key = ? AND expires_at > ?", (key, self._clock.time())
        ).fetchone()
        return None if row is None else decode_outcome(self._sealer, key, bytes(row[0]))

    def _lookup(self, key: str) -> Published | None:
        with contextlib.closing(self._connect()) as db:
            return self._read(db, key)

    def _try_lead(self, key: str) -> Lease | Published | None:
        with contextlib.closing(self._connect()) as db:
            published = self._read(db, key)
            if published is not None:
                return published
            fd = self._locks.lock(key)
            if fd is None:
                return None  # another process leads
            try:
                # A leader may have published and released between our read and our lock.
                published = self._read(db, key)
            except BaseException:
                self._locks.unlock(key, fd)
                raise
        if published is not None:
            self._locks.unlock(key, fd)
            return published
        owner = secrets.token_hex(16)
        with self._mutex:
            self._held[owner] = (key, fd)
        return Lease(key, owner)

    def _abandon(self, future: asyncio.Future[Lease | Published | None]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        lease = future.result()
        if isinstance(lease, Lease) and self._pool is not None:
            self._pool.submit(self._release, lease)

    def _publish(self, lease: Lease, sealed: bytes, ttl: float) -> None:
        now = self._clock.time()
        try:
            with contextlib.closing(self._connect()) as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.execute(
                        "INSERT OR REPLACE INTO results (key, sealed, expires_at) VALUES (?, ?, ?)",
                        (lease.key, sealed, now + ttl),
                    )
                    if now >= self._next_sweep:
                        db.execute("DELETE FROM results WHERE expires_at <= ?", (now,))
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        finally:
            self._release(lease)  # after the commit: a follower that gets the lock finds it
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_EVERY
            self._locks.sweep(now)

    def _release(self, lease: Lease) -> None:
        with self._mutex:
            held = self._held.pop(lease.owner, None)
        if held is not None:
            self._locks.unlock(*held)

    def _peek(self, key: str) -> tuple[Published | None, bool]:
        """The published outcome, and whether another process holds the lease now."""
        published = self._lookup(key)
        if published is not None:
            return published, True
        return None, self._locks.held_elsewhere(key)

    def _after_fork_in_child(self) -> None:
        # The child shares the parent's open lock files: closing its copies (never LOCK_UN,
        # which would release the parent's lock) leaves the parent's leases intact.
        for _, fd in self._held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held = {}
        self._mutex = threading.Lock()
        self._pool = None  # its threads stayed in the parent


def _call_if_alive(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    bound = method()
    if bound is not None:
        bound()


def _checked(key: str) -> str:
    if not GRANT_KEY.fullmatch(key):
        raise ValueError("not a grant key of this coordinator")
    return key
