"""What one refresher reports: a span per caller and per flight, and the points of each.

Every name comes from :mod:`._telemetry`; this module decides what is recorded when. The
fresh path never comes here (it bumps a plain integer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from cachetools import TTLCache
from opentelemetry import trace

from ._errors import ReauthenticationRequired, RefreshUnavailable, TokenEndpointError
from ._logs import fingerprint
from ._oauth_messages import TERMINAL_ERRORS
from ._telemetry import (
    COORDINATOR,
    DEDUPE,
    DEDUPE_PATHS,
    DETECTED_BY,
    ERROR_TYPE,
    GRANT,
    GRANTS,
    OUTCOME,
    PROVIDER,
    REVOCATION,
    ROTATED,
    SPAN_ACQUIRE,
    SPAN_REFRESH,
    WAITERS,
    Telemetry,
)

__all__ = ["FlightRecorder", "flight_outcome", "mark_failed"]

logger = logging.getLogger(__name__)


def flight_outcome(error: BaseException | None) -> str:
    """The bounded ``outcome`` attribute of a flight."""
    if error is None:
        return "success"
    if isinstance(error, ReauthenticationRequired):
        return "invalid_grant" if error.reason == "invalid_grant" else "invalid_client"
    if isinstance(error, TokenEndpointError) and error.error in TERMINAL_ERRORS:
        # a refused client-credentials grant: the client, not a session, is the problem
        return "invalid_grant" if error.error == "invalid_grant" else "invalid_client"
    if isinstance(error, RefreshUnavailable) and error.reason in ("timeout", "network_error"):
        return error.reason
    return "provider_error"


def mark_failed(span: trace.Span, error: BaseException) -> None:
    _mark_failed(span, flight_outcome(error))


def _mark_failed(span: trace.Span, outcome: str) -> None:
    span.set_attribute(ERROR_TYPE, outcome)
    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))


class FlightRecorder:
    """What one refresher reports, with its attribute sets built once (a storm records one
    per caller). Every caller that needed a new token gets an ``acquire`` span and a
    ``token.requests`` point by how it was served; every flight a ``refresh`` span, with the
    token endpoint's ``server.address`` (from ``server``: the client's, empty until known)."""

    def __init__(
        self,
        telemetry: Telemetry,
        provider: str,
        monotonic: Callable[[], float],
        max_entries: int,
        server: Callable[[], Mapping[str, str | int]],
    ) -> None:
        self.telemetry = telemetry
        self.attributes = {PROVIDER: provider}
        self._server = server
        self._flight_spans: dict[str, Mapping[str, str | int]] = {}  # with server.address
        self._monotonic = monotonic
        self._dedupe = {path: {DEDUPE: path, PROVIDER: provider} for path in DEDUPE_PATHS}
        self._flight = {grant: {GRANT: grant, PROVIDER: provider} for grant in GRANTS}
        self._quiet_until = 0.0  # no "issued already due" warning before this (monotonic)
        self._said_unrevokable = False
        # When each grant was last refreshed, by the key of the refresh token it got then.
        # Feeds the refresh.interval histogram (storms show as short intervals).
        self._refreshed_at: TTLCache[bytes, float] = TTLCache(
            max_entries, 24 * 3600, timer=monotonic
        )
        # Keys of the refresh tokens this process spent (rotated), to tell a duplicate refresh
        # when the provider refuses one of them later.
        self._spent: TTLCache[bytes, bool] = TTLCache(max_entries, 24 * 3600, timer=monotonic)

    def served(self, path: str) -> trace.Span:
        """Count a caller that needed a new token and start its span, by how it is served.

        The span is not made current: nothing runs inside it but a wait, and skipping the
        context switch keeps a 10,000-caller storm cheap to release.
        """
        attributes = self._dedupe[path]
        self.telemetry.token_requests.add(1, attributes)
        return self.telemetry.tracer.start_span(SPAN_ACQUIRE, attributes=attributes)

    def leading(self) -> trace.Span:
        """Start the span of a caller that leads a flight. Its ``token.requests`` point waits
        for the flight to land (:meth:`landed`): ``leader``, or ``distributed`` when another
        process served the flight, so that every caller is counted once."""
        return self.telemetry.tracer.start_span(SPAN_ACQUIRE, attributes=self._dedupe["leader"])

    def issued_due(self, lifetime: float, skew: float) -> None:
        """Say, at most once a minute, that the provider issues tokens that are due at once."""
        now = self._monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + 60.0
        logger.warning(
            "the provider issued an access token that is already due (lifetime %.0f s, "
            "skew %g s): every request that uses it refreshes once; lower skew or ask the "
            "provider for longer-lived tokens",
            lifetime,
            skew,
        )

    def logout(self, revocation: str) -> None:
        """Count a logout; say once that the provider cannot revoke, which leaves the grant
        alive at the provider until it expires."""
        self.telemetry.logouts.add(1, {REVOCATION: revocation, **self.attributes})
        if revocation == "unsupported" and not self._said_unrevokable:
            self._said_unrevokable = True
            logger.warning(
                "the provider publishes no revocation endpoint (neither in OIDC discovery nor in "
                "RFC 8414 metadata): logout ends the session here, but its grant stays valid at "
                "the provider until it expires; pass OAuth2Client(revocation_endpoint=...) if "
                "it has one"
            )

    def duplicate(self, detected_by: str) -> None:
        """Count a refresh that turned out to duplicate someone else's: ``store_conflict`` (the
        store already held another token set of that generation), ``newer_stored`` (the
        provider refused the token and the store holds its successor) or ``spent_here`` (the
        provider refused a refresh token this process itself spent moments ago)."""
        self.telemetry.duplicates.add(1, {DETECTED_BY: detected_by, **self.attributes})

    def spent_here(self, key: bytes) -> bool:
        """Whether this process spent the refresh token behind ``key`` (rotated it)."""
        return key in self._spent

    def left(self, span: trace.Span, joined: trace.Span | None) -> None:
        """End a caller's span, linked to the flight it ``joined`` (the leader's is its parent)."""
        if joined is not None:
            span.add_link(joined.get_span_context())
        span.end()

    def refused(self, error: BaseException) -> None:
        span = self.served("negative_cache")
        mark_failed(span, error)
        span.end()

    def start_flight(self, grant: str, leader: trace.Span) -> trace.Span:
        """The flight's span: a child of the leader's; it ends when the flight lands."""
        context = trace.set_span_in_context(leader)
        return self.telemetry.tracer.start_span(
            SPAN_REFRESH, context=context, attributes=self._flight_attributes(grant)
        )

    def _flight_attributes(self, grant: str) -> Mapping[str, str | int]:
        """The flight span's attributes, built once the token endpoint is known (a discovered
        one is not before the first flight: that one gets ``server.address`` as it lands)."""
        attributes = self._flight_spans.get(grant)
        if attributes is None:
            server = self._server()
            if not server:
                return self._flight[grant]
            attributes = self._flight_spans[grant] = {**self._flight[grant], **server}
        return attributes

    def in_flight(self, delta: int) -> None:
        self.telemetry.active.add(delta, self.attributes)

    def coordinator_error(self, coordinator: str) -> None:
        self.telemetry.coordinator_errors.add(
            1, {COORDINATOR: coordinator, PROVIDER: self.attributes[PROVIDER]}
        )

    def landed(
        self,
        span: trace.Span | None,
        grant: str,
        *,
        called_provider: bool,
        error: BaseException | None,
        seconds: float,
        waiters: int,
        rotated: bool,
        rotation: tuple[bytes, bytes | None] | None,
        key: bytes,
        distributed: bool,
    ) -> None:
        """Record a flight that landed, and say so in one DEBUG line. ``rotation``: the keys
        of the refresh token it spent and of the one it got, when the provider issued a
        refresh-token grant. ``key``: the flight's key (a keyed hash of the grant).
        ``distributed``: another process served it (its leader is counted so, not as
        ``leader``)."""
        telemetry, attributes = self.telemetry, self.attributes
        outcome = flight_outcome(error)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "refresh flight landed: outcome=%s grant=%s grant_type=%s waiters=%d "
                "duration=%.3fs provider=%s called_provider=%s rotated=%s",
                outcome,
                fingerprint(key),
                grant,
                waiters,
                seconds,
                attributes[PROVIDER],
                called_provider,
                rotated,
            )
        telemetry.waiters.record(waiters, attributes)
        telemetry.token_requests.add(1, self._dedupe["distributed" if distributed else "leader"])
        if called_provider:
            telemetry.refreshes.add(1, {OUTCOME: outcome, GRANT: grant, **attributes})
            telemetry.duration.record(seconds, {OUTCOME: outcome, **attributes})
        if rotation is not None:
            spent, got = rotation
            now = self._monotonic()
            if got != spent:
                self._spent[spent] = True
            previous = self._refreshed_at.pop(spent, None)
            if previous is not None:
                telemetry.interval.record(now - previous, attributes)
            if got is not None:
                self._refreshed_at[got] = now
        if span is None:
            return
        span.set_attributes({OUTCOME: outcome, ROTATED: rotated, WAITERS: waiters})
        span.set_attributes(self._server())  # already there, or discovered in flight
        if error is not None:
            _mark_failed(span, outcome)
        span.end()
