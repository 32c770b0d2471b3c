"""The process-wide refresher: one flight per grant, stragglers served from a grace cache.

Read one refresh top to bottom: :meth:`Refresher.ensure_fresh` returns a fresh token set as
is (no lock, no I/O, no telemetry). Otherwise, under one lock, :meth:`Refresher._acquire`
finds a newer generation in the grace cache, a remembered refusal, or a seat on the flight
for that refresh token (``_single_flight``), starting it if there is none. The leader
launches the flight (``_flight.Pilot``), which re-checks the caches and the store, makes the
one exchange with the provider through the coordinator (``_exchange``), remembers the outcome
(``_caches``), releases every waiter on its own loop and persists the new tokens.
ARCHITECTURE.md follows the same path; the README's guarantees table lists the invariants.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn

from opentelemetry import trace

from ._caches import Caches, Refusal
from ._clock import Clock
from ._coordination import Coordinator
from ._errors import ConfigurationError, ReauthenticationRequired
from ._exchange import Exchange
from ._flight import CurrentTokenSet, FlightRequest, OnRefreshed, Pilot
from ._flight_recorder import FlightRecorder, mark_failed
from ._keys import NO_PARAMS, KeyMaker, TokenParams
from ._oauth import OAuth2Client
from ._oauth_messages import DEFAULT_RETRY_AFTER
from ._single_flight import Flight, SingleFlight, detach, run_blocking
from ._telemetry import Telemetry
from ._tokens import TokenSet

__all__ = ["CurrentTokenSet", "OnRefreshed", "Refresher", "SyncRefresher", "TokenParams"]

logger = logging.getLogger(__name__)


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
        self.skew, self.jitter, self.grace_ttl, self.timeout = skew, jitter, grace_ttl, timeout
        self.max_concurrency, self.max_entries = max_concurrency, max_entries
        self.clock: Clock = clock or client.clock
        self._now = self.clock.time  # bound once: the fresh path reads it on every request
        self._options = dict(  # what shared() compares
            skew=skew, jitter=jitter, grace_ttl=grace_ttl, timeout=timeout, clock=self.clock,
            max_concurrency=max_concurrency, max_entries=max_entries, coordinator=coordinator,
        )  # fmt: skip
        self.telemetry = telemetry or client.telemetry
        monotonic = self.clock.monotonic
        self._recorder = FlightRecorder(
            self.telemetry, client.name, monotonic, max_entries, client.server_attributes
        )
        # _flights.lock guards the flights and the caches: checking and boarding are one step.
        self._flights: SingleFlight[TokenSet, FlightRequest] = SingleFlight()
        self._caches = Caches(
            KeyMaker(client.provider_url, client.client_id),
            max_entries=max_entries,
            grace_ttl=grace_ttl,
            default_retry_after=DEFAULT_RETRY_AFTER,
            timer=monotonic,
        )
        self._exchange = Exchange(
            client,
            coordinator,
            timeout=timeout,
            grace_ttl=grace_ttl,
            clock=self.clock,
            recorder=self._recorder,
        )
        self._pilot = Pilot(
            self._flights,
            self._caches,
            self._exchange,
            self._recorder,
            max_concurrency=max_concurrency,
            timeout=timeout,
            monotonic=monotonic,
        )
        #: Fresh-path hits: a plain int (no SDK call per request), read by an observable counter.
        self.fresh_hits = 0
        self.telemetry.observe_fresh(self)
        # Every series the dashboard and the alerts query starts at zero (once per provider).
        self.telemetry.preinitialise(client.name, self._exchange.coordinator.name)

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

    @property
    def coordinator(self) -> Coordinator:
        """Shares flights with other processes; the default coordinates within this one."""
        return self._exchange.coordinator

    @property
    def metric_attributes(self) -> Mapping[str, str]:
        return self._recorder.attributes

    @property
    def waiting(self) -> int:
        """Callers waiting on a flight right now."""
        return self._flights.waiting()

    @property
    def sync(self) -> SyncRefresher:
        """This refresher for sync code in a worker thread (never inside an event loop)."""
        return SyncRefresher(self)

    # -- the fresh path: no lock, no I/O, no telemetry ------------------------------------------

    def refresh_due(self, token_set: TokenSet) -> bool:
        """Whether ``token_set`` should be replaced now: ``skew`` plus its share of ``jitter``
        before expiry, clamped to half the token's lifetime. The jitter share is fixed by the
        token set (``TokenSet.jitter_fraction``), the same in every process."""
        lead = self.skew + self.jitter * token_set.jitter_fraction
        half_lifetime = (token_set.expires_at - token_set.issued_at) * 0.5
        if lead > half_lifetime:
            lead = half_lifetime
        return self._now() >= token_set.expires_at - lead

    def serve_fresh(self, token_set: TokenSet) -> bool:
        """Whether ``token_set`` can be used as it is; counted as a fresh-path hit if so."""
        if self.refresh_due(token_set):
            return False
        self.fresh_hits += 1
        return True

    async def ensure_fresh(
        self,
        token_set: TokenSet,
        *,
        params: TokenParams = NO_PARAMS,
        current: CurrentTokenSet | None = None,
        on_refreshed: OnRefreshed | None = None,
    ) -> TokenSet:
        """``token_set`` if it is fresh, else its successor (from the cache or one flight).

        ``current`` reads the session's stored token set; the flight consults it before calling
        the provider and before declaring the session dead. ``on_refreshed`` receives the new
        token set even if every caller has gone. Both may be plain or async functions; they
        run on the event loop of the caller that leads the flight.
        """
        if not self.refresh_due(token_set):
            self.fresh_hits += 1
            return token_set
        return await self._acquire(token_set, None, params, current, on_refreshed)

    async def renew(
        self,
        token_set: TokenSet,
        *,
        failed_access_token: str | None = None,
        params: TokenParams = NO_PARAMS,
        current: CurrentTokenSet | None = None,
        on_refreshed: OnRefreshed | None = None,
    ) -> TokenSet:
        """Compare-and-refresh, for an access token the API rejected (default: ``token_set``'s).

        If a newer token set than the one that failed is already known, it is returned without
        calling the provider; otherwise this joins or starts the flight.
        """
        failed = failed_access_token or token_set.access_token
        return await self._acquire(token_set, failed, params, current, on_refreshed)

    async def client_credentials(
        self, params: TokenParams = NO_PARAMS, *, failed_access_token: str | None = None
    ) -> TokenSet:
        """A client-credentials (machine) token, cached per parameters, one flight at a time.

        ``failed_access_token``: an API rejected it, so a cached token equal to it is not
        returned again.
        """
        key = self._caches.keys.client_credentials(params)
        cached = self._machine_token(key, failed_access_token)
        if cached is not None:
            self.fresh_hits += 1
            return cached
        with self._flights.lock:
            # Again under the lock: a flight may have landed since the lock-free look above.
            cached = self._machine_token(key, failed_access_token)
            if cached is not None:
                self.fresh_hits += 1
                return cached
            refusal = self._caches.refusal(key)
            if refusal is None:
                waiter: asyncio.Future[TokenSet] = asyncio.get_running_loop().create_future()
                joined = self._flights.join(key, waiter)
                flight = joined or self._flights.start(
                    key, FlightRequest("client_credentials", None, params), waiter
                )
                leads = joined is None
        if refusal is not None:
            self._refuse(refusal)
        span = self._board(leads, flight)
        try:
            return await waiter
        except BaseException as exc:
            mark_failed(span, exc)
            raise
        finally:
            self._recorder.left(span, None if leads else flight.payload.span)

    def forget(self, token_set: TokenSet, *, params: TokenParams = NO_PARAMS) -> None:
        """After logout: stragglers holding this session's older refresh tokens must not be
        handed its tokens any more. They get ``ReauthenticationRequired("no_session")``."""
        if token_set.refresh_token is None:
            return
        with self._flights.lock:
            self._caches.logged_out(token_set, params)

    async def end_session(self, token_set: TokenSet, *, revoke: bool = True) -> None:
        """Logout (invariant 11): stragglers with this session's older refresh tokens are
        refused, a refresh in flight hands its tokens to nobody, and the grant is revoked at
        the provider (RFC 7009) when it publishes a revocation endpoint."""
        if token_set.refresh_token is not None:
            with self._flights.lock:
                _, newest, _ = self._caches.lookup(token_set, NO_PARAMS)
            self.forget(token_set)
            await self._exchange.end(newest, NO_PARAMS)  # and for the other processes
            await self._pilot.revoke_at_logout(newest.refresh_token or "", revoke=revoke)
        else:  # no grant to revoke; the session ends all the same, and is counted
            self._recorder.logout("skipped")

    # -- boarding -------------------------------------------------------------------------------

    def _machine_token(self, key: bytes, failed_access_token: str | None) -> TokenSet | None:
        """The cached client-credentials token for ``key`` if it is still good to hand out."""
        cached = self._caches.machine_tokens.get(key)
        if cached is None or cached.access_token == failed_access_token:
            return None
        return None if self.refresh_due(cached) else cached

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
            with self._flights.lock:
                key, newest, refusal = self._caches.lookup(token_set, params)
                served_by_cache = (
                    newest.access_token != failed_access_token
                    if failed_access_token is not None
                    else newest is not token_set and not self.refresh_due(newest)
                )
                if refusal is None and not served_by_cache:
                    waiter: asyncio.Future[TokenSet] = loop.create_future()
                    joined = self._flights.join(key, waiter)
                    flight = joined or self._flights.start(
                        key,
                        FlightRequest("refresh_token", newest, params, current, on_refreshed),
                        waiter,
                    )
                    leads = joined is None
                    if joined is not None:
                        request = joined.payload
                        request.current = request.current or current
                        request.on_refreshed = request.on_refreshed or on_refreshed
            if refusal is not None:
                self._refuse(refusal)
            if served_by_cache:
                self._recorder.served("grace_cache").end()
                return newest
            asked_at = self._now()
            span = self._board(leads, flight)
            try:
                result = await waiter
            except BaseException as exc:
                mark_failed(span, exc)
                raise
            finally:
                self._recorder.left(span, None if leads else flight.payload.span)
            if failed_access_token is not None or not self.refresh_due(result):
                return result
            if result.issued_at >= asked_at:  # issued while we waited, and due already
                self._recorder.issued_due(result.lifetime, self.skew)
                return result  # at most one flight per request, however short the lifetime
            # A token set read back from the store can already be due: go round once more so
            # that it is refreshed in the flight of *its* refresh token.
            token_set = result
        return result

    def _refuse(self, refusal: Refusal) -> NoReturn:
        """Serve a caller a remembered failure (dead session, provider down)."""
        error = refusal.error()
        self._recorder.refused(error)
        raise error

    def _board(self, leads: bool, flight: Flight[TokenSet, FlightRequest]) -> trace.Span:
        """Start the caller's span; a leader also launches the flight, whose span is a child
        of the leader's. The caller then awaits its waiter and ends the span with
        ``FlightRecorder.left`` (inline, not in a helper coroutine: a storm pays per frame)."""
        span = self._recorder.leading() if leads else self._recorder.served("joined")
        if leads:
            request = flight.payload
            request.span = self._recorder.start_flight(request.grant, span)
            detach(self._pilot.fly(flight))
        return span


class SyncRefresher:
    """:class:`Refresher` for sync code in a worker thread: the same methods, blocking."""

    __slots__ = ("refresher",)

    def __init__(self, refresher: Refresher) -> None:
        self.refresher = refresher

    def ensure_fresh(self, token_set: TokenSet, **options: Any) -> TokenSet:
        if self.refresher.serve_fresh(token_set):
            return token_set
        return run_blocking(self.refresher.ensure_fresh(token_set, **options))

    def renew(self, token_set: TokenSet, **options: Any) -> TokenSet:
        return run_blocking(self.refresher.renew(token_set, **options))

    def client_credentials(self, params: TokenParams = NO_PARAMS, **options: Any) -> TokenSet:
        return run_blocking(self.refresher.client_credentials(params, **options))
