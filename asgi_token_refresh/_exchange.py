"""One exchange with the token endpoint for one grant, through the coordinator.

The single flight has already made this the only caller in the process. Here the flight asks
its coordinator whether it leads the grant across processes (or takes what another process
published), calls the provider, classifies the answer (terminal or transient), and publishes
the outcome for the other processes. If the coordinator fails, the exchange carries on with
local coordination only, for a few seconds, and says so once.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable

from ._clock import Clock
from ._coordination import Coordinator, Lease, LocalCoordinator, Published
from ._errors import ReauthenticationRequired, RefreshUnavailable, TokenEndpointError
from ._flight_recorder import FlightRecorder
from ._keys import TokenParams
from ._oauth import OAuth2Client
from ._oauth_messages import TERMINAL_ERRORS
from ._tokens import TokenSet

__all__ = ["COORDINATOR_RETRY", "Exchange", "StoredNewer", "Trip"]

logger = logging.getLogger(__name__)

# A lease outlives the leader's own provider call by this much, so it never expires under a
# live leader; a dead leader's lease frees the grant this long after its timeout.
_LEASE_MARGIN = 5.0
# After a coordinator error, flights coordinate locally only for this long, then try again.
COORDINATOR_RETRY = 5.0
_LOCAL = LocalCoordinator()

#: Reads the session's stored token set if it is a newer generation than the flight's.
StoredNewer = Callable[[], Awaitable[TokenSet | None]]


class Trip:
    """What one exchange did, for the flight's telemetry."""

    __slots__ = ("called_provider", "distributed")

    def __init__(self) -> None:
        self.called_provider = False
        self.distributed = False  # another process's published outcome served the flight


class Exchange:
    """Calls the provider for one grant at a time per process, and per cluster through
    ``coordinator``. ``timeout`` bounds the caller's own provider call (the lease outlives it)."""

    def __init__(
        self,
        client: OAuth2Client,
        coordinator: Coordinator | None,
        *,
        timeout: float,
        grace_ttl: float,
        clock: Clock,
        recorder: FlightRecorder,
    ) -> None:
        self.client = client
        #: Shares flights with other processes; the default coordinates within this one only.
        self.coordinator: Coordinator = coordinator or _LOCAL
        self._lease_ttl = timeout + _LEASE_MARGIN
        self._grace_ttl = grace_ttl
        self._clock = clock
        self._recorder = recorder
        self._down_until = 0.0  # monotonic time until which the coordinator is not asked

    async def client_credentials(self, params: TokenParams, trip: Trip) -> TokenSet:
        trip.called_provider = True
        return await self.client.client_credentials(
            scope=params.scope, resource=params.resource, audience=params.audience
        )

    async def refresh(
        self, token_set: TokenSet, params: TokenParams, stored_newer: StoredNewer, trip: Trip
    ) -> tuple[TokenSet, bool]:
        """The successor of ``token_set``, and whether the provider issued it (rather than
        another process). Raises ``ReauthenticationRequired`` or ``RefreshUnavailable``."""
        assert token_set.refresh_token is not None
        coordinator = self.coordinator if self._down_until <= self._clock.monotonic() else _LOCAL
        key = self._grant_key(coordinator, token_set.refresh_token, params)
        try:
            claim = await self._claim(coordinator, key)
        except Exception as exc:  # Redis down, say: carry on with the local flight alone
            self._failed(coordinator, exc)
            coordinator, claim = _LOCAL, Lease(key, "local")
        else:
            if coordinator is not _LOCAL:  # a follower never publishes: the claim says it too
                self._ok()
        if not isinstance(claim, Lease):
            trip.distributed = True  # counted as the flight lands, instead of its leader
            if isinstance(claim, TokenSet):
                return claim, False
            raise copy.copy(claim)
        try:
            outcome = await self._call_provider(token_set, params, stored_newer, trip)
        except (ReauthenticationRequired, RefreshUnavailable) as exc:
            ttl = self._grace_ttl
            if isinstance(exc, RefreshUnavailable):
                ttl = min(exc.retry_after, ttl)
            await self._settle(coordinator, coordinator.publish(claim, exc, ttl))
            raise
        except BaseException:
            await self._settle(coordinator, coordinator.release(claim))
            raise
        await self._settle(coordinator, coordinator.publish(claim, outcome[0], self._grace_ttl))
        return outcome

    async def end(self, token_set: TokenSet, params: TokenParams) -> None:
        """After logout: publish "logged out" for the session's grant, so that a process that
        still holds its refresh token takes that answer instead of refreshing it."""
        assert token_set.refresh_token is not None
        coordinator = self.coordinator
        if coordinator is _LOCAL or self._down_until > self._clock.monotonic():
            return
        key = self._grant_key(coordinator, token_set.refresh_token, params)
        try:
            claim = await coordinator.try_lead(key, self._lease_ttl)
        except Exception as exc:
            self._failed(coordinator, exc)
            return
        if isinstance(claim, Lease):  # (else another process is at it: its outcome stands)
            logged_out = ReauthenticationRequired("no_session", "logged out")
            await self._settle(coordinator, coordinator.publish(claim, logged_out, self._grace_ttl))

    def _grant_key(self, coordinator: Coordinator, refresh_token: str, params: TokenParams) -> str:
        client = self.client
        return coordinator.grant_key(
            client.provider_url,
            client.client_id,
            refresh_token,
            params.scope,
            params.resource,
            params.audience,
        )

    async def _claim(self, coordinator: Coordinator, key: str) -> Lease | Published:
        while True:  # bounded by the flight's timeout
            claim = await coordinator.try_lead(key, self._lease_ttl)
            if claim is not None:
                return claim
            published = await coordinator.wait(key, self._lease_ttl)
            if published is not None:
                return published
            # The leader's lease ended without an outcome (it died): try to lead ourselves.

    async def _call_provider(
        self, token_set: TokenSet, params: TokenParams, stored_newer: StoredNewer, trip: Trip
    ) -> tuple[TokenSet, bool]:
        assert token_set.refresh_token is not None
        trip.called_provider = True
        try:
            issued = await self.client.refresh(
                token_set.refresh_token,
                scope=params.scope,
                resource=params.resource,
                audience=params.audience,
                previous=token_set,
            )
        except TokenEndpointError as exc:
            if exc.error not in TERMINAL_ERRORS:
                raise
            # Invariant 5: another process may have rotated the token we just presented.
            stored = await stored_newer()
            if stored is not None:
                self._recorder.duplicate("newer_stored")  # our call repeated theirs
                return stored, False
            raise ReauthenticationRequired(exc.error) from exc
        return issued, True

    # -- the coordinator, and living without it ---------------------------------------------

    async def _settle(self, coordinator: Coordinator, step: Awaitable[None]) -> None:
        """Publish or release; a coordinator failure here only switches to local mode."""
        try:
            await step
        except Exception as exc:
            self._failed(coordinator, exc)
        else:
            if coordinator is not _LOCAL:
                self._ok()

    def _failed(self, coordinator: Coordinator, exc: Exception) -> None:
        self._recorder.coordinator_error(coordinator.name)
        if self._down_until == 0.0:  # log once per outage
            logger.warning(
                "%s coordinator unavailable (%s); refreshing with local coordination only",
                coordinator.name,
                type(exc).__name__,
            )
        self._down_until = self._clock.monotonic() + COORDINATOR_RETRY

    def _ok(self) -> None:
        if self._down_until:
            logger.warning("%s coordinator is back", self.coordinator.name)
            self._down_until = 0.0
