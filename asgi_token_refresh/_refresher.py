"""The process-wide refresher: one flight per grant, stragglers served from a grace cache.

A caller whose token set is due asks :class:`Refresher` for a new one. Under one lock it either
gets a newer token set from the grace cache, a cached failure, or a place in the flight for that
refresh token — starting the flight if there is none. Flights run on the library's I/O loop,
detached from every caller, so a cancelled request cancels only its own wait, and callers on any
event loop or thread share them. DESIGN.md §3 lists the invariants this module keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import inspect
import logging
import math
import secrets
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NoReturn

from cachetools import TLRUCache, TTLCache
from opentelemetry import trace

from ._clock import Clock
from ._coordination import Coordinator, Lease, LocalCoordinator, Published
from ._errors import (
    ConfigurationError,
    ReauthenticationRequired,
    RefreshUnavailable,
    TokenEndpointError,
    TokenRefreshError,
)
from ._ioloop import io_loop, reset_after_fork
from ._oauth import DEFAULT_RETRY_AFTER, OAuth2Client
from ._telemetry import (
    COORDINATOR,
    DEDUPE,
    ERROR_TYPE,
    GRANT,
    OUTCOME,
    PROVIDER,
    ROTATED,
    SPAN_ACQUIRE,
    SPAN_REFRESH,
    WAITERS,
    Telemetry,
)
from ._tokens import TokenSet

__all__ = ["CurrentTokenSet", "OnRefreshed", "Refresher", "TokenParams"]

logger = logging.getLogger("asgi_token_refresh")

#: Reads the session's token set as it is stored now (another request may have rotated it).
CurrentTokenSet = Callable[[], "Awaitable[TokenSet | None] | TokenSet | None"]
#: Receives a token set the provider just issued, to persist it even if every caller is gone.
OnRefreshed = Callable[[TokenSet], "Awaitable[None] | None"]

# OAuth error codes that mean this grant (or this client) will never work again.
_TERMINAL_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})
# A chain of rotations longer than this inside one grace TTL is not a chain but a bug.
_MAX_CHAIN = 32
# A lease outlives the leader's own provider call by this much, so it never expires under a
# live leader; a dead leader's lease frees the grant this long after its timeout.
_LEASE_MARGIN = 5.0
# After a coordinator error, flights coordinate locally only for this long, then try again.
_COORDINATOR_RETRY = 5.0
_LOCAL = LocalCoordinator()
# Keys are keyed hashes so that no cache, log line or metric ever holds a token. The key is
# per process; the distributed coordinator derives its own from the app's secret.
_KEY_SECRET = secrets.token_bytes(32)


@dataclass(frozen=True, slots=True)
class TokenParams:
    """Request parameters that make two token requests different (RFC 8707 ``resource``,
    the de-facto ``audience``). Never coalesce requests whose parameters differ."""

    scope: str | None = None
    resource: str | None = None
    audience: str | None = None


_NO_PARAMS = TokenParams()


def _hash_key(*parts: str | None) -> bytes:
    digest = hashlib.blake2b(digest_size=16, key=_KEY_SECRET)
    for part in parts:
        if part is None:
            digest.update(b"\x00")
        else:
            raw = part.encode()
            digest.update(b"\x01" + len(raw).to_bytes(4, "big") + raw)
    return digest.digest()


class _Flight:
    """One exchange with the token endpoint and everyone waiting for it."""

    __slots__ = (
        "called_provider",
        "done",
        "error",
        "grant",
        "joined",
        "key",
        "on_refreshed",
        "params",
        "read_current",
        "result",
        "span",
        "token_set",
        "waiters",
    )

    def __init__(
        self,
        key: bytes,
        grant: Literal["refresh_token", "client_credentials"],
        token_set: TokenSet | None,
        params: TokenParams,
    ) -> None:
        self.key = key
        self.grant = grant
        self.token_set = token_set
        self.params = params
        self.waiters: list[asyncio.Future[TokenSet]] = []
        # The first caller's hooks stand for all: every caller of one refresh token belongs to
        # the same session, and keeping one each keeps joining O(1).
        self.read_current: CurrentTokenSet | None = None
        self.on_refreshed: OnRefreshed | None = None
        self.done = False
        self.result: TokenSet | None = None
        self.error: BaseException | None = None
        self.joined = 0  # callers that joined after the leader
        self.called_provider = False
        self.span: trace.Span | None = None  # the flight span; joiners link to it


def _release(
    waiters: list[asyncio.Future[TokenSet]], result: TokenSet | None, error: BaseException | None
) -> None:
    for waiter in waiters:
        if waiter.done():  # that caller was cancelled; the flight does not care
            continue
        if error is None:
            assert result is not None
            waiter.set_result(result)
        else:
            waiter.set_exception(copy.copy(error))


class Refresher:
    """Process-wide, TTL-cached, single-flight token refresh for one OAuth client.

    Share one per (provider, client id): :meth:`shared` returns it. ``skew`` seconds before
    expiry (clamped to half the token's lifetime, plus up to ``jitter`` seconds) a token set is
    due. A rotation is remembered under the old refresh token for ``grace_ttl`` so stragglers
    are served without calling the provider; a terminal failure is remembered as long, a
    transient one for its ``Retry-After`` (capped at ``grace_ttl``). At most ``max_concurrency``
    token requests are in flight at once, queued first come first served; each has ``timeout``
    seconds once it runs.
    """

    _registry: ClassVar[dict[tuple[str, str], Refresher]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        client: OAuth2Client,
        *,
        skew: float = 60.0,
        jitter: float = 5.0,
        grace_ttl: float = 60.0,
        timeout: float = 15.0,
        max_concurrency: int = 10,
        max_entries: int = 50_000,
        clock: Clock | None = None,
        telemetry: Telemetry | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        for name, value in (("skew", skew), ("jitter", jitter), ("grace_ttl", grace_ttl)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"{name} must be a non-negative number of seconds")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigurationError("timeout must be a positive number of seconds")
        if max_concurrency < 1 or max_entries < 1:
            raise ConfigurationError("max_concurrency and max_entries must be at least 1")
        self.client = client
        self.skew = skew
        self.jitter = jitter
        self.grace_ttl = grace_ttl
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.max_entries = max_entries
        self.clock: Clock = clock or client.clock
        self._now = self.clock.time  # bound once: the fresh path reads it on every request
        self._options = {
            "skew": skew,
            "jitter": jitter,
            "grace_ttl": grace_ttl,
            "timeout": timeout,
            "max_concurrency": max_concurrency,
            "max_entries": max_entries,
            "clock": self.clock,
            "coordinator": coordinator,
        }
        #: Shares flights with other processes; the default coordinates within this one only.
        self.coordinator: Coordinator = coordinator or _LOCAL
        self._coordinator_down_until = 0.0
        # _lock guards _flights, _grace, _failures and every _Flight's waiter lists and state.
        self._lock = threading.Lock()
        self._flights: dict[bytes, _Flight] = {}
        # old refresh token's key -> the token set that replaced it
        self._grace: TTLCache[bytes, TokenSet] = TTLCache(
            max_entries, grace_ttl, timer=self.clock.monotonic
        )
        # key -> (error, seconds to remember it)
        self._failures: TLRUCache[bytes, tuple[TokenRefreshError, float]] = TLRUCache(
            max_entries, lambda _k, v, now: now + v[1], timer=self.clock.monotonic
        )
        # Client-credentials tokens by parameters; read without the lock (dict.get is atomic).
        self._machine_tokens: dict[bytes, TokenSet] = {}
        self._slots: asyncio.Semaphore | None = None  # lives on the I/O loop, made there
        # When each grant was last refreshed, by the key of the refresh token it got then
        # (read and written only on the I/O loop). Feeds the refresh.interval histogram.
        self._refreshed_at: TTLCache[bytes, float] = TTLCache(max_entries, 24 * 3600)
        self.telemetry = telemetry or client.telemetry
        # Attribute sets are built once: a storm records one per caller.
        self._attributes = {PROVIDER: client.name}
        self._dedupe_attributes = {
            path: {DEDUPE: path, PROVIDER: client.name}
            for path in ("leader", "joined", "grace_cache", "negative_cache", "distributed")
        }
        self._coordinator_attributes = {COORDINATOR: self.coordinator.name, PROVIDER: client.name}
        self._flight_attributes = {
            grant: {GRANT: grant, PROVIDER: client.name}
            for grant in ("refresh_token", "client_credentials")
        }
        #: Fresh-path hits: a plain int (no SDK call per request), read by an observable counter.
        self.fresh_hits = 0
        self.telemetry.observe_fresh(self)
        reset_after_fork(self)

    @classmethod
    def shared(cls, client: OAuth2Client, **options: Any) -> Refresher:
        """The process-wide refresher for ``client``'s provider and client id.

        The first call creates it; later calls return the same one, and raise
        :class:`ConfigurationError` if they ask for different options.
        """
        identity = (client.provider_url, client.client_id)
        with cls._registry_lock:
            existing = cls._registry.get(identity)
            if existing is None:
                existing = cls._registry[identity] = cls(client, **options)
            elif any(existing._options.get(k, v) != v for k, v in options.items()):
                raise ConfigurationError(
                    f"a refresher for {client!r} already exists with other options; "
                    "pass the same options or the same Refresher to every user"
                )
            elif client is not existing.client and not client.interchangeable(existing.client):
                # Sharing is the point (one flight per grant), but silently swapping in another
                # client's transport or clock would be a surprise.
                raise ConfigurationError(
                    f"a refresher for {client!r} already uses another OAuth2Client with a "
                    "different transport, clock or telemetry; reuse that client, or pass "
                    "refresher=Refresher(client) to keep them apart"
                )
            return existing

    def __repr__(self) -> str:
        return (
            f"Refresher(client={self.client!r}, skew={self.skew:g}, grace_ttl={self.grace_ttl:g}, "
            f"flights={len(self._flights)})"
        )

    # -- the fresh path: no lock, no I/O, no telemetry ------------------------------------------

    def refresh_due(self, token_set: TokenSet) -> bool:
        """Whether ``token_set`` should be replaced now: ``skew`` plus its jitter before expiry,
        clamped to half the token's lifetime (what ``TokenSet.refresh_due`` computes, inlined:
        this runs on every request)."""
        # The jitter is a fixed fraction per token set, from the (cached) hash of its access
        # token: sessions spread out, and one token's answer never flips between calls.
        fraction = (hash(token_set.access_token) & 0xFFFF) / 65536.0
        lead = self.skew + self.jitter * fraction
        half_lifetime = (token_set.expires_at - token_set.issued_at) * 0.5
        if lead > half_lifetime:
            lead = half_lifetime
        return self._now() >= token_set.expires_at - lead

    async def ensure_fresh(
        self,
        token_set: TokenSet,
        *,
        params: TokenParams = _NO_PARAMS,
        current: CurrentTokenSet | None = None,
        on_refreshed: OnRefreshed | None = None,
    ) -> TokenSet:
        """``token_set`` if it is fresh, else its successor (from the cache or one flight).

        ``current`` reads the session's stored token set; the flight consults it before calling
        the provider and before declaring the session dead. ``on_refreshed`` receives the new
        token set even if every caller has gone. Both run on the library's I/O loop and may be
        plain or async functions; they must not use objects bound to another event loop.
        """
        if not self.refresh_due(token_set):
            self.fresh_hits += 1
            return token_set
        return await self._acquire(token_set, None, params, current, on_refreshed)

    async def refresh(
        self,
        token_set: TokenSet,
        *,
        failed_access_token: str | None = None,
        params: TokenParams = _NO_PARAMS,
        current: CurrentTokenSet | None = None,
        on_refreshed: OnRefreshed | None = None,
    ) -> TokenSet:
        """Compare-and-refresh, for an access token the API rejected (default: ``token_set``'s).

        If a newer token set than the one that failed is already known, it is returned without
        calling the provider; otherwise this joins or starts the flight.
        """
        failed = failed_access_token or token_set.access_token
        return await self._acquire(token_set, failed, params, current, on_refreshed)

    def ensure_fresh_sync(self, token_set: TokenSet, **options: Any) -> TokenSet:
        """Blocking :meth:`ensure_fresh`, for sync code in a worker thread."""
        if not self.refresh_due(token_set):
            self.fresh_hits += 1
            return token_set
        return io_loop.run_sync(self.ensure_fresh(token_set, **options))

    def refresh_sync(self, token_set: TokenSet, **options: Any) -> TokenSet:
        """Blocking :meth:`refresh`, for sync code in a worker thread."""
        return io_loop.run_sync(self.refresh(token_set, **options))

    async def client_credentials(
        self, params: TokenParams = _NO_PARAMS, *, failed_access_token: str | None = None
    ) -> TokenSet:
        """A client-credentials (machine) token, cached per parameters, one flight at a time.

        ``failed_access_token``: an API rejected it, so a cached token equal to it is not
        returned again.
        """
        key = _hash_key(
            "client_credentials",
            self.client.provider_url,
            self.client.client_id,
            params.scope,
            params.resource,
            params.audience,
        )
        cached = self._machine_token(key, failed_access_token)
        if cached is not None:
            self.fresh_hits += 1
            return cached
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[TokenSet] = loop.create_future()
        with self._lock:
            # Again under the lock: a flight may have landed since the lock-free look above.
            cached = self._machine_token(key, failed_access_token)
            if cached is not None:
                return cached
            failure = self._failures.get(key) if self._failures else None
            if failure is None:
                path, flight = self._board(key, "client_credentials", None, params, waiter)
        if failure is not None:
            self._refuse(failure[0])
        return await self._wait(path, flight, waiter)

    def _machine_token(self, key: bytes, failed_access_token: str | None) -> TokenSet | None:
        """The cached client-credentials token for ``key`` if it is still good to hand out."""
        cached = self._machine_tokens.get(key)
        if cached is None or cached.access_token == failed_access_token:
            return None
        return None if self.refresh_due(cached) else cached

    def forget(self, token_set: TokenSet, *, params: TokenParams = _NO_PARAMS) -> None:
        """After logout: stragglers holding this session's older refresh tokens must not be
        handed its tokens any more. They get ``ReauthenticationRequired("no_session")``."""
        if token_set.refresh_token is None:
            return
        with self._lock:
            key, _ = self._newest(token_set, params)
            error = ReauthenticationRequired("no_session", "logged out")
            self._failures[key] = (error, self.grace_ttl)

    # -- joining ----------------------------------------------------------------------------

    def _key(self, refresh_token: str, params: TokenParams) -> bytes:
        return _hash_key(
            "refresh_token",
            self.client.provider_url,
            self.client.client_id,
            refresh_token,
            params.scope,
            params.resource,
            params.audience,
        )

    def _newest(self, token_set: TokenSet, params: TokenParams) -> tuple[bytes, TokenSet]:
        """Follow the grace cache from ``token_set`` to the newest generation. Needs _lock."""
        assert token_set.refresh_token is not None
        key = self._key(token_set.refresh_token, params)
        for _ in range(_MAX_CHAIN):
            successor = self._grace.get(key)
            if successor is None or successor.issued_at < token_set.issued_at:
                break
            token_set = successor
            if successor.refresh_token is None:
                break
            next_key = self._key(successor.refresh_token, params)
            if next_key == key:  # the provider does not rotate: same refresh token, new access
                break
            key = next_key
        return key, token_set

    async def _acquire(
        self,
        token_set: TokenSet,
        failed_access_token: str | None,
        params: TokenParams,
        current: CurrentTokenSet | None,
        on_refreshed: OnRefreshed | None,
    ) -> TokenSet:
        if token_set.refresh_token is None:
            raise ReauthenticationRequired("no_session", "the session has no refresh token")
        loop = asyncio.get_running_loop()
        for _ in range(2):
            waiter: asyncio.Future[TokenSet] = loop.create_future()
            flight: _Flight | None = None
            with self._lock:
                key, newest = self._newest(token_set, params)
                failure = self._failures.get(key) if self._failures else None
                served_by_cache = (
                    newest.access_token != failed_access_token
                    if failed_access_token is not None
                    else newest is not token_set and not self.refresh_due(newest)
                )
                if failure is None and not served_by_cache:
                    path, flight = self._board(key, "refresh_token", newest, params, waiter)
                    flight.read_current = flight.read_current or current
                    flight.on_refreshed = flight.on_refreshed or on_refreshed
            if failure is not None:
                self._refuse(failure[0])
            if flight is None:
                self._served("grace_cache").end()
                return newest
            result = await self._wait(path, flight, waiter)
            # Only a token set read back from the store can already be due; go round once more
            # so that it is refreshed in the flight of *its* refresh token.
            if failed_access_token is not None or not self.refresh_due(result):
                return result
            token_set = result
        return result

    def _board(
        self,
        key: bytes,
        grant: Literal["refresh_token", "client_credentials"],
        token_set: TokenSet | None,
        params: TokenParams,
        waiter: asyncio.Future[TokenSet],
    ) -> tuple[str, _Flight]:
        """Join the flight for ``key``, starting it if there is none. Needs _lock."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight(key, grant, token_set, params)
            path = "leader"
        else:
            path = "joined"
            flight.joined += 1
        flight.waiters.append(waiter)
        return path, flight

    def _refuse(self, failure: TokenRefreshError) -> NoReturn:
        """Serve a caller a remembered failure (dead session, provider down)."""
        span = self._served("negative_cache")
        _mark_failed(span, failure)
        span.end()
        raise copy.copy(failure)

    def _served(self, path: str) -> trace.Span:
        """Count a caller that needed a new token and start its span, by how it is served.

        The span is not made current: nothing runs inside it but a wait, and skipping the
        context switch keeps a 10,000-caller storm cheap to release.
        """
        attributes = self._dedupe_attributes[path]
        self.telemetry.token_requests.add(1, attributes)
        return self.telemetry.tracer.start_span(SPAN_ACQUIRE, attributes=attributes)

    async def _wait(self, path: str, flight: _Flight, waiter: asyncio.Future[TokenSet]) -> TokenSet:
        """Wait for ``flight`` (starting it if this caller leads), inside the caller's span."""
        span = self._served(path)
        try:
            if path == "leader":
                # The flight span is a child of the leader's span; it ends when the flight does.
                flight.span = self.telemetry.tracer.start_span(
                    SPAN_REFRESH,
                    context=trace.set_span_in_context(span),
                    attributes=self._flight_attributes[flight.grant],
                )
                io_loop.submit(self._fly(flight))
            return await waiter
        except BaseException as exc:
            _mark_failed(span, exc)
            raise
        finally:
            if path == "joined" and flight.span is not None:
                span.add_link(flight.span.get_span_context())
            span.end()

    # -- flying (on the I/O loop) ---------------------------------------------------------------

    async def _fly(self, flight: _Flight) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        telemetry, attributes = self.telemetry, self._attributes
        span = flight.span or trace.INVALID_SPAN
        result: TokenSet | None = None
        error: BaseException | None = None
        issued = False
        started = self.clock.monotonic()
        telemetry.active.add(1, attributes)
        try:
            with trace.use_span(span, end_on_exit=False):
                async with self._slots:
                    async with asyncio.timeout(self.timeout):
                        result, issued = await self._exchange(flight)
        except TimeoutError:
            error = RefreshUnavailable(
                "timeout", retry_after=DEFAULT_RETRY_AFTER, detail=f"no answer in {self.timeout:g}s"
            )
        except asyncio.CancelledError:
            error = RefreshUnavailable(
                "provider_error", retry_after=DEFAULT_RETRY_AFTER, detail="flight cancelled"
            )
            self._settle(flight, None, error, cache=False, seconds=self.clock.monotonic() - started)
            raise
        except Exception as exc:
            error = exc
        finally:
            telemetry.active.add(-1, attributes)
        self._settle(flight, result, error, cache=True, seconds=self.clock.monotonic() - started)
        if issued and result is not None:
            await self._persist(flight, result)

    def _record(
        self, flight: _Flight, result: TokenSet | None, error: BaseException | None, seconds: float
    ) -> None:
        telemetry, attributes = self.telemetry, self._attributes
        outcome = _outcome(error)
        waiters = flight.joined + 1
        telemetry.waiters.record(waiters, attributes)
        if flight.called_provider:
            telemetry.refreshes.add(1, {OUTCOME: outcome, GRANT: flight.grant, **attributes})
            telemetry.duration.record(seconds, {OUTCOME: outcome, **attributes})
        rotated = (
            result is not None
            and flight.token_set is not None
            and result.refresh_token != flight.token_set.refresh_token
        )
        if flight.called_provider and result is not None and flight.grant == "refresh_token":
            now = self.clock.monotonic()
            previous = self._refreshed_at.pop(flight.key, None)
            if previous is not None:
                telemetry.interval.record(now - previous, attributes)
            if result.refresh_token is not None:
                self._refreshed_at[self._key(result.refresh_token, flight.params)] = now
        span = flight.span
        if span is None:
            return
        span.set_attributes({OUTCOME: outcome, ROTATED: rotated, WAITERS: waiters})
        if error is not None:
            span.set_attribute(ERROR_TYPE, outcome)
            span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
        span.end()

    async def _exchange(self, flight: _Flight) -> tuple[TokenSet, bool]:
        """The provider call, with the re-checks of invariants 3 and 5. Returns the token set
        and whether the provider issued it (rather than a cache or the store)."""
        client = self.client
        params = flight.params
        if flight.grant == "client_credentials":
            flight.called_provider = True
            issued = await client.client_credentials(
                scope=params.scope, resource=params.resource, audience=params.audience
            )
            return issued, True

        token_set = flight.token_set
        assert token_set is not None
        assert token_set.refresh_token is not None
        # Invariant 3: someone may have rotated this grant since the flight was created.
        with self._lock:
            _, newest = self._newest(token_set, params)
        # A newer generation found here may itself be due: the caller then goes round once
        # more and refreshes it under its own refresh token, never under this stale one.
        if newest is not token_set:
            return newest, False
        stored = await self._read_current(flight)
        if stored is not None:
            return stored, False
        return await self._coordinated(flight, token_set)

    async def _coordinated(self, flight: _Flight, token_set: TokenSet) -> tuple[TokenSet, bool]:
        """Lead the grant across processes (or take what another process published), then
        call the provider and publish the outcome for the other processes."""
        coordinator = self._coordinator_now()
        params = flight.params
        key = coordinator.grant_key(
            self.client.provider_url,
            self.client.client_id,
            token_set.refresh_token,
            params.scope,
            params.resource,
            params.audience,
        )
        lease_ttl = self.timeout + _LEASE_MARGIN  # outlives our own provider call
        try:
            claim = await self._claim(coordinator, key, lease_ttl)
        except Exception as exc:  # Redis down, say: carry on with the local flight alone
            self._coordinator_failed(coordinator, exc)
            coordinator, claim = _LOCAL, Lease(key, "local")
        else:
            if coordinator is not _LOCAL:  # a follower never publishes: the claim says it too
                self._coordinator_ok()
        if not isinstance(claim, Lease):
            self.telemetry.token_requests.add(1, self._dedupe_attributes["distributed"])
            if isinstance(claim, TokenSet):
                return claim, False
            raise copy.copy(claim)
        try:
            outcome = await self._call_provider(flight, token_set)
        except (ReauthenticationRequired, RefreshUnavailable) as exc:
            ttl = self.grace_ttl if isinstance(exc, ReauthenticationRequired) else exc.retry_after
            await self._publish(coordinator, claim, exc, min(ttl, self.grace_ttl))
            raise
        except BaseException:
            await self._release(coordinator, claim)
            raise
        await self._publish(coordinator, claim, outcome[0], self.grace_ttl)
        return outcome

    async def _claim(
        self, coordinator: Coordinator, key: str, lease_ttl: float
    ) -> Lease | Published:
        while True:  # bounded by the flight's timeout
            claim = await coordinator.try_lead(key, lease_ttl)
            if claim is not None:
                return claim
            published = await coordinator.wait(key, lease_ttl)
            if published is not None:
                return published
            # The leader's lease ended without an outcome (it died): try to lead ourselves.

    async def _call_provider(self, flight: _Flight, token_set: TokenSet) -> tuple[TokenSet, bool]:
        assert token_set.refresh_token is not None
        params = flight.params
        flight.called_provider = True
        try:
            issued = await self.client.refresh(
                token_set.refresh_token,
                scope=params.scope,
                resource=params.resource,
                audience=params.audience,
                previous=token_set,
            )
        except TokenEndpointError as exc:
            if exc.error not in _TERMINAL_ERRORS:
                raise
            # Invariant 5: another process may have rotated the token we just presented.
            stored = await self._read_current(flight)
            if stored is not None:
                return stored, False
            raise ReauthenticationRequired(exc.error) from exc
        return issued, True

    # -- the coordinator, and living without it ---------------------------------------------------

    def _coordinator_now(self) -> Coordinator:
        if self._coordinator_down_until > self.clock.monotonic():
            return _LOCAL
        return self.coordinator

    def _coordinator_failed(self, coordinator: Coordinator, exc: Exception) -> None:
        self.telemetry.coordinator_errors.add(1, self._coordinator_attributes)
        if self._coordinator_down_until == 0.0:  # log once per outage
            logger.warning(
                "%s coordinator unavailable (%s); refreshing with local coordination only",
                coordinator.name,
                type(exc).__name__,
            )
        self._coordinator_down_until = self.clock.monotonic() + _COORDINATOR_RETRY

    def _coordinator_ok(self) -> None:
        if self._coordinator_down_until:
            logger.warning("%s coordinator is back", self.coordinator.name)
            self._coordinator_down_until = 0.0

    async def _publish(
        self, coordinator: Coordinator, lease: Lease, outcome: Published, ttl: float
    ) -> None:
        try:
            await coordinator.publish(lease, outcome, ttl)
        except Exception as exc:
            self._coordinator_failed(coordinator, exc)
        else:
            if coordinator is not _LOCAL:
                self._coordinator_ok()

    async def _release(self, coordinator: Coordinator, lease: Lease) -> None:
        try:
            await coordinator.release(lease)
        except Exception as exc:
            self._coordinator_failed(coordinator, exc)

    async def _read_current(self, flight: _Flight) -> TokenSet | None:
        """The stored token set, if it is a newer generation than the flight's."""
        assert flight.token_set is not None
        if flight.read_current is None:
            return None
        try:
            stored = flight.read_current()
            if inspect.isawaitable(stored):
                stored = await stored
        except Exception:
            logger.exception("current-token-set reader failed; ignoring it")
            return None
        if (
            isinstance(stored, TokenSet)
            and stored.issued_at >= flight.token_set.issued_at
            and stored.refresh_token != flight.token_set.refresh_token
        ):
            return stored
        return None

    def _settle(
        self,
        flight: _Flight,
        result: TokenSet | None,
        error: BaseException | None,
        *,
        cache: bool,
        seconds: float,
    ) -> None:
        """Cache the outcome, record it, then release every waiter (in that order, so whoever
        wakes up finds the caches, metrics and the flight span complete)."""
        fingerprint = flight.key.hex()[:12]
        with self._lock:
            if flight.done:
                return
            if result is not None:
                if flight.grant == "client_credentials":
                    self._remember_machine_token(flight.key, result)
                else:
                    self._grace[flight.key] = result
            elif cache and isinstance(error, ReauthenticationRequired):
                self._failures[flight.key] = (error, self.grace_ttl)
                logger.info("session %s needs reauthentication: %s", fingerprint, error.reason)
            elif cache and isinstance(error, RefreshUnavailable | TokenEndpointError):
                # A short memory stops a crowd of requests from hammering a provider that is down.
                ttl = getattr(error, "retry_after", None) or DEFAULT_RETRY_AFTER
                self._failures[flight.key] = (error, min(ttl, self.grace_ttl))
                logger.warning("token refresh for %s failed: %s", fingerprint, error)
            del self._flights[flight.key]
            flight.done, flight.result, flight.error = True, result, error
            waiters, flight.waiters = flight.waiters, []
        self._record(flight, result, error, seconds)
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[TokenSet]]] = {}
        for waiter in waiters:
            by_loop.setdefault(waiter.get_loop(), []).append(waiter)
        for loop, group in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its callers are gone
                loop.call_soon_threadsafe(_release, group, result, error)

    def _remember_machine_token(self, key: bytes, token_set: TokenSet) -> None:
        tokens = self._machine_tokens
        tokens[key] = token_set
        while len(tokens) > self.max_entries:
            del tokens[next(iter(tokens))]

    async def _persist(self, flight: _Flight, token_set: TokenSet) -> None:
        if flight.on_refreshed is None:
            return
        try:
            outcome = flight.on_refreshed(token_set)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            logger.exception("on_refreshed callback failed; the new tokens were not persisted")

    def _after_fork_in_child(self) -> None:
        # Flights in progress belong to the parent's I/O thread, which the child does not have.
        self._lock = threading.Lock()
        self._flights.clear()
        self._slots = None


def _mark_failed(span: trace.Span, error: BaseException) -> None:
    outcome = _outcome(error)
    span.set_attribute(ERROR_TYPE, outcome)
    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))


def _outcome(error: BaseException | None) -> str:
    """The bounded ``outcome`` attribute of a flight."""
    if error is None:
        return "success"
    if isinstance(error, ReauthenticationRequired):
        return "invalid_grant" if error.reason == "invalid_grant" else "invalid_client"
    if isinstance(error, TokenEndpointError) and error.error in _TERMINAL_ERRORS:
        # a refused client-credentials grant: the client, not a session, is the problem
        return "invalid_grant" if error.error == "invalid_grant" else "invalid_client"
    if isinstance(error, RefreshUnavailable) and error.reason in ("timeout", "network_error"):
        return error.reason
    return "provider_error"
