"""What the leader of a flight does, as a task of its own loop that no caller owns.

It takes a provider slot (at most ``max_concurrency`` flights talk to the provider at once),
re-checks the grace cache and the store (invariant 3), makes the one exchange through the
coordinator, remembers the outcome, releases every waiter on its own loop and, last, persists
the new tokens through the session's hook, even if every caller has gone (invariant 4).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from opentelemetry import trace

from ._caches import LOGGED_OUT, Caches
from ._errors import ReauthenticationRequired, RefreshUnavailable, TokenEndpointError
from ._exchange import Exchange, Trip
from ._flight_recorder import FlightRecorder
from ._keys import TokenParams
from ._oauth_messages import DEFAULT_RETRY_AFTER
from ._single_flight import Flight, SingleFlight, Slots, release
from ._tokens import TokenSet

__all__ = ["CurrentTokenSet", "FlightRequest", "OnRefreshed", "Pilot", "call_hook"]

logger = logging.getLogger(__name__)

#: Reads the session's token set as it is stored now (another request may have rotated it).
CurrentTokenSet = Callable[[], "Awaitable[TokenSet | None] | TokenSet | None"]
#: Receives a token set the provider just issued, to persist it even if every caller is gone.
#: ``False`` back means the store already held another refresh of that generation: this one
#: was a duplicate (counted); anything else means saved.
OnRefreshed = Callable[[TokenSet], "Awaitable[bool | None] | bool | None"]
Grant = Literal["refresh_token", "client_credentials"]


class FlightRequest:
    """What a flight's leader flies: the grant, its token set and the session's hooks."""

    __slots__ = ("current", "grant", "on_refreshed", "params", "span", "token_set", "trip")

    def __init__(
        self,
        grant: Grant,
        token_set: TokenSet | None,
        params: TokenParams,
        current: CurrentTokenSet | None = None,
        on_refreshed: OnRefreshed | None = None,
    ) -> None:
        self.grant = grant
        self.token_set = token_set
        self.params = params
        # The first caller's hooks stand for all: every caller of one refresh token belongs to
        # the same session, and keeping one each keeps joining O(1).
        self.current = current
        self.on_refreshed = on_refreshed
        self.span: trace.Span | None = None  # the flight span; joiners link to it
        self.trip = Trip()


class Pilot:
    """Flies the flights of one refresher."""

    def __init__(
        self,
        flights: SingleFlight[TokenSet, FlightRequest],
        caches: Caches,
        exchange: Exchange,
        recorder: FlightRecorder,
        *,
        max_concurrency: int,
        timeout: float,
        monotonic: Callable[[], float],
    ) -> None:
        self._flights = flights
        self._caches = caches
        self._exchange = exchange
        self._recorder = recorder
        self._slots = Slots(max_concurrency)
        self.timeout = timeout
        self._monotonic = monotonic

    async def fly(self, flight: Flight[TokenSet, FlightRequest]) -> None:
        request = flight.payload
        result: TokenSet | None = None
        error: BaseException | None = None
        issued = False
        started = self._monotonic()
        self._recorder.in_flight(1)
        try:
            with trace.use_span(request.span or trace.INVALID_SPAN, end_on_exit=False):
                async with self._slots:
                    async with asyncio.timeout(self.timeout):
                        result, issued = await self._exchange_for(request)
        except TimeoutError:
            error = RefreshUnavailable(
                "timeout", retry_after=DEFAULT_RETRY_AFTER, detail=f"no answer in {self.timeout:g}s"
            )
        except asyncio.CancelledError:  # the leader's loop is shutting down
            error = RefreshUnavailable(
                "provider_error", retry_after=DEFAULT_RETRY_AFTER, detail="flight cancelled"
            )
            self._land(flight, None, error, remember=False, started=started)
            raise
        except Exception as exc:
            error = exc
        finally:
            self._recorder.in_flight(-1)
        orphan = self._land(flight, result, error, remember=True, started=started)
        if orphan is not None:
            # Logout won: the tokens the provider just issued belong to no session any more.
            await self._revoke(orphan)
        elif (
            issued
            and result is not None
            and request.on_refreshed is not None
            and await call_hook("on_refreshed", request.on_refreshed, result) is False
        ):
            self._recorder.duplicate("store_conflict")

    async def _exchange_for(self, request: FlightRequest) -> tuple[TokenSet, bool]:
        """The provider call, after the re-checks of invariant 3. Returns the token set and
        whether the provider issued it (rather than a cache, the store or another process)."""
        if request.grant == "client_credentials":
            return await self._exchange.client_credentials(request.params, request.trip), True
        token_set = request.token_set
        assert token_set is not None
        # Invariant 3: someone may have rotated this grant since the flight was created. A
        # newer generation found here may itself be due: the caller then goes round once more
        # and refreshes it under its own refresh token, never under this stale one.
        with self._flights.lock:
            _, newest, _ = self._caches.lookup(token_set, request.params)
        if newest is not token_set:
            return newest, False

        async def stored_newer() -> TokenSet | None:
            if request.current is None:
                return None
            stored = await call_hook("current", request.current)
            if (
                isinstance(stored, TokenSet)
                and stored.newer_than(token_set)
                and stored.refresh_token != token_set.refresh_token
            ):
                return stored
            return None

        stored = await stored_newer()
        if stored is not None:
            return stored, False
        return await self._exchange.refresh(token_set, request.params, stored_newer, request.trip)

    def _land(
        self,
        flight: Flight[TokenSet, FlightRequest],
        result: TokenSet | None,
        error: BaseException | None,
        *,
        remember: bool,
        started: float,
    ) -> TokenSet | None:
        """Cache the outcome, record it, then release every waiter (in that order, so whoever
        wakes up finds the caches, metrics and the flight span complete). Returns the token
        set the provider issued for a session that logged out while the flight was in the
        air: nobody gets it (invariant 11)."""
        request = flight.payload
        orphan = None
        with self._flights.lock:
            waiters = self._flights.land(flight)
            if waiters is None:
                return None
            if result is not None and self._caches.is_logged_out(flight.key):
                if result.refresh_token is not None:
                    self._caches.tombstone(
                        self._caches.keys.refresh_token(result.refresh_token, request.params)
                    )
                orphan, result = result, None
                error = LOGGED_OUT.error()
            elif result is not None or remember:
                machine = request.grant == "client_credentials"
                self._caches.remember(flight.key, machine, result, error)
        spent = request.token_set
        if (
            request.trip.called_provider
            and spent is not None
            and isinstance(error, ReauthenticationRequired)
            and error.reason == "invalid_grant"
            and self._recorder.spent_here(flight.key)
        ):
            self._recorder.duplicate("spent_here")  # this process rotated it already
        rotation = None
        if request.trip.called_provider and result is not None and spent is not None:
            got = result.refresh_token
            got_key = None if got is None else self._caches.keys.refresh_token(got, request.params)
            rotation = (flight.key, got_key)
        self._recorder.landed(
            request.span,
            request.grant,
            called_provider=request.trip.called_provider,
            error=error,
            seconds=self._monotonic() - started,
            waiters=len(waiters),
            rotated=result is not None
            and spent is not None
            and result.refresh_token != spent.refresh_token,
            rotation=rotation,
            key=flight.key,
            distributed=request.trip.distributed,
        )
        release(waiters, result, error)
        return orphan

    async def revoke_at_logout(self, refresh_token: str, *, revoke: bool) -> None:
        """Revoke a logged-out session's grant (RFC 7009), counted by what became of it."""
        if not revoke:
            self._recorder.logout("skipped")
            return
        try:
            revoked = await self._exchange.client.revoke(refresh_token)
        except (RefreshUnavailable, TokenEndpointError) as exc:
            # The session is gone here either way; the provider lets the grant expire.
            logger.warning("could not revoke the refresh token at logout: %s", exc)
            self._recorder.logout("failed")
            return
        self._recorder.logout("revoked" if revoked else "unsupported")

    async def _revoke(self, orphan: TokenSet) -> None:
        token = orphan.refresh_token or orphan.access_token
        hint = "refresh_token" if orphan.refresh_token else "access_token"
        try:
            await self._exchange.client.revoke(token, token_type_hint=hint)
        except (RefreshUnavailable, TokenEndpointError) as exc:
            logger.warning("could not revoke tokens issued after logout: %s", exc)


async def call_hook(name: str, hook: Callable[..., Any], *args: Any) -> Any:
    """A store hook, plain or async; its failure is logged, never the flight's."""
    try:
        outcome = hook(*args)
        if inspect.isawaitable(outcome):
            outcome = await outcome
    except Exception:
        logger.exception("%s hook failed; ignoring it", name)
        return None
    return outcome
