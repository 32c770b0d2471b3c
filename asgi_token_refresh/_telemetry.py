"""Spans and metrics: every instrument, attribute and span name is defined here, once.

Only the OpenTelemetry *API* is used at run time; with no SDK configured every call is a no-op.
Providers are injectable (``Telemetry(meter_provider=..., tracer_provider=...)``) so tests and
apps need not touch the global ones. Attributes are bounded — outcome, dedupe path, error type,
component, provider name — never a user, session or token. The fresh-token path records
nothing here: it bumps a plain integer that an observable counter reads at collection time.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from opentelemetry import metrics, trace

if TYPE_CHECKING:
    from opentelemetry.metrics import (
        CallbackOptions,
        Counter,
        MeterProvider,
        Observation,
        UpDownCounter,
    )
    from opentelemetry.trace import TracerProvider

__all__ = ["Telemetry", "default_telemetry", "server_attributes", "terminal_type"]

logger = logging.getLogger(__name__)

SCOPE = "asgi_token_refresh"

# Metric names (OpenTelemetry). dashboards/README.md lists the Prometheus names they become.
REFRESHES = "asgi_token_refresh.refreshes"
TOKEN_REQUESTS = "asgi_token_refresh.token.requests"
TERMINAL_FAILURES = "asgi_token_refresh.terminal_failures"
REFRESH_DURATION = "asgi_token_refresh.refresh.duration"
REFRESH_ACTIVE = "asgi_token_refresh.refresh.active"
REFRESH_WAITERS = "asgi_token_refresh.refresh.waiters"
REFRESH_INTERVAL = "asgi_token_refresh.refresh.interval"
TOKEN_FRESH = "asgi_token_refresh.token.fresh"
COORDINATOR_ERRORS = "asgi_token_refresh.coordinator.errors"
LOGOUTS = "asgi_token_refresh.logouts"
DUPLICATES = "asgi_token_refresh.refresh.duplicates"
#: Every metric the library records (a new one needs a dashboard panel: tests check).
METRICS = (
    REFRESHES,
    TOKEN_REQUESTS,
    TERMINAL_FAILURES,
    REFRESH_DURATION,
    REFRESH_ACTIVE,
    REFRESH_WAITERS,
    REFRESH_INTERVAL,
    TOKEN_FRESH,
    COORDINATOR_ERRORS,
    LOGOUTS,
    DUPLICATES,
)

# Span names.
SPAN_REFRESH = "asgi_token_refresh.refresh"
SPAN_ACQUIRE = "asgi_token_refresh.acquire"

# Attribute keys. ``error.type`` and ``server.address`` are OpenTelemetry semantic-convention
# keys; the library's own are namespaced (Prometheus labels: dots become underscores, e.g.
# ``asgi_token_refresh_outcome``).
_NS = "asgi_token_refresh."
# success | invalid_grant | invalid_client | provider_error | timeout | network_error
OUTCOME = _NS + "outcome"
GRANT = _NS + "grant"  # refresh_token | client_credentials
PROVIDER = _NS + "provider"  # OAuth2Client.name: a configured label, never a URL with secrets
DEDUPE = _NS + "dedupe"  # leader | joined | grace_cache | negative_cache | distributed
COMPONENT = _NS + "component"  # asgi | httpx | login
COORDINATOR = _NS + "coordinator"  # local | redis | file
REVOCATION = _NS + "revocation"  # revoked | unsupported | failed | skipped
# store_conflict | newer_stored | spent_here: how a duplicate refresh was noticed
DETECTED_BY = _NS + "detected_by"
ROTATED = _NS + "rotated"
WAITERS = _NS + "waiters"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INTERVAL_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0)
WAITER_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 1000)


# The attribute values the dashboard and the alerts query: every combination below starts at
# zero for each provider (Telemetry.preinitialise), so a panel reads 0 rather than "No data"
# and rate() sees an event's first count. dashboards/README.md says which event moves which.
OUTCOMES = (
    "success",
    "invalid_grant",
    "invalid_client",
    "provider_error",
    "timeout",
    "network_error",
)
GRANTS = ("refresh_token", "client_credentials")
DEDUPE_PATHS = ("leader", "joined", "grace_cache", "negative_cache", "distributed")
#: The terminal failures (``error.type``) each component can surface to its caller.
TERMINAL_TYPES = {
    "asgi": ("invalid_grant", "invalid_client", "no_session"),
    "httpx": ("invalid_grant", "invalid_client", "no_session", "downstream_401"),
    "login": ("invalid_grant", "invalid_client"),
}
REVOCATIONS = ("revoked", "unsupported", "failed", "skipped")
DETECTIONS = ("store_conflict", "newer_stored", "spent_here")


def terminal_type(reason: str) -> str:
    """The bounded ``error.type`` of a terminal failure."""
    if reason in ("invalid_grant", "no_session", "downstream_401"):
        return reason
    return "invalid_client"  # invalid_client, unauthorized_client: the client is refused


_DEFAULT_PORTS = {"http": 80, "https": 443}


def server_attributes(url: str) -> dict[str, str | int]:
    """``server.address`` of ``url`` (its host: never its path, query or userinfo), and
    ``server.port`` when it is not the scheme's default."""
    parts = urlsplit(url)
    if not parts.hostname:
        return {}
    attributes: dict[str, str | int] = {SERVER_ADDRESS: parts.hostname}
    try:
        port = parts.port
    except ValueError:  # pragma: no cover - endpoints are validated as http(s) URLs
        port = None
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        attributes[SERVER_PORT] = port
    return attributes


def _version() -> str:
    try:
        return importlib.metadata.version("asgi-token-refresh")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "0"


class FreshCounting(Protocol):
    """Something that counts fresh-path hits in a plain int (no SDK call per request)."""

    @property
    def fresh_hits(self) -> int: ...

    @property
    def metric_attributes(self) -> Mapping[str, str]: ...


class Telemetry:
    """Tracer and instruments for the refreshers, middleware and SDK wrappers that use it.

    Pass providers to get your own; without them, use :func:`default_telemetry` (the global
    providers, instruments registered once per process).
    """

    def __init__(
        self,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        version = _version()
        meter = metrics.get_meter(SCOPE, version, meter_provider=meter_provider)
        self.tracer = trace.get_tracer(SCOPE, version, tracer_provider=tracer_provider)
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.refreshes = meter.create_counter(
            REFRESHES, "{refresh}", "Calls to the token endpoint, one per flight"
        )
        self.token_requests = meter.create_counter(
            TOKEN_REQUESTS,
            "{request}",
            "Callers that needed a new token, by how they were served (all but leader are "
            "dedupe hits)",
        )
        self.terminal_failures = meter.create_counter(
            TERMINAL_FAILURES, "{failure}", "Terminal failures surfaced to a caller"
        )
        self.duration = meter.create_histogram(
            REFRESH_DURATION,
            "s",
            "Duration of a refresh flight",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.active = meter.create_up_down_counter(
            REFRESH_ACTIVE, "{refresh}", "Refresh flights in progress"
        )
        self.waiters = meter.create_histogram(
            REFRESH_WAITERS,
            "{request}",
            "Callers that joined each flight",
            explicit_bucket_boundaries_advisory=WAITER_BUCKETS,
        )
        self.interval = meter.create_histogram(
            REFRESH_INTERVAL,
            "s",
            "Time since the previous refresh of the same session (storms show as short ones)",
            explicit_bucket_boundaries_advisory=INTERVAL_BUCKETS,
        )
        self.coordinator_errors = meter.create_counter(
            COORDINATOR_ERRORS,
            "{error}",
            "Coordinator (Redis, file) failures; flights fall back to local coordination",
        )
        self.logouts = meter.create_counter(
            LOGOUTS,
            "{logout}",
            "Sessions ended by logout, by what became of the grant at the provider",
        )
        self.duplicates = meter.create_counter(
            DUPLICATES,
            "{refresh}",
            "Provider calls that refreshed a session someone else had already refreshed (without "
            "a shared coordinator, replicas each refresh), by how it was noticed",
        )
        # Series started at zero (preinitialise): what was asked for, and the zero points not
        # yet recorded since the first collection (see preinitialise). Guarded by _zero_lock.
        self._zero_lock = threading.Lock()
        self._zeroed: set[tuple[str, ...]] = set()
        self._unflushed: list[tuple[Counter | UpDownCounter, dict[str, str]]] = []
        # Weak: a global meter must not keep every Refresher (and its caches) alive.
        self._fresh_sources: weakref.WeakSet[FreshCounting] = weakref.WeakSet()
        meter.create_observable_counter(
            TOKEN_FRESH,
            [self._observe_fresh],
            "{request}",
            "Token requests answered on the fresh path, without refresh",
        )

    def observe_fresh(self, source: FreshCounting) -> None:
        """Report ``source.fresh_hits`` (a plain running count) as the fresh-path counter."""
        self._fresh_sources.add(source)

    def preinitialise(self, provider: str, coordinator: str | None = None) -> None:
        """Start at zero every series the dashboard and the alerts query for ``provider``
        (outcome x grant, dedupe paths, terminal error types by component, duplicates,
        logouts, flights in progress) and, given its name, the ``coordinator``'s errors.
        Once per (telemetry, provider) and (provider, coordinator): a Refresher and an
        OAuth2Client call it when they are made, never the fresh path.

        The zeros are recorded now and once more at the first collection: the OpenTelemetry
        API drops what is recorded on the global meter provider before an SDK is installed,
        and apps often make their client at import time, before they set one up.
        """
        wanted: list[tuple[str, ...]] = [("provider", provider)]
        if coordinator is not None:
            wanted.append(("coordinator", provider, coordinator))
        with self._zero_lock:
            new = [series for series in wanted if series not in self._zeroed]
            self._zeroed.update(new)
            zeros = [zero for series in new for zero in self._zero_points(series)]
            self._unflushed += zeros
        for instrument, attributes in zeros:
            instrument.add(0, attributes)

    def _zero_points(
        self, series: tuple[str, ...]
    ) -> list[tuple[Counter | UpDownCounter, dict[str, str]]]:
        if series[0] == "coordinator":
            _, provider, coordinator = series
            return [(self.coordinator_errors, {COORDINATOR: coordinator, PROVIDER: provider})]
        by = {PROVIDER: series[1]}
        zeros: list[tuple[Counter | UpDownCounter, dict[str, str]]] = [(self.active, by)]
        zeros += [(self.refreshes, {OUTCOME: o, GRANT: g, **by}) for o in OUTCOMES for g in GRANTS]
        zeros += [(self.token_requests, {DEDUPE: path, **by}) for path in DEDUPE_PATHS]
        zeros += [
            (self.terminal_failures, {ERROR_TYPE: error, COMPONENT: component, **by})
            for component, errors in TERMINAL_TYPES.items()
            for error in errors
        ]
        zeros += [(self.duplicates, {DETECTED_BY: how, **by}) for how in DETECTIONS]
        zeros += [(self.logouts, {REVOCATION: what, **by}) for what in REVOCATIONS]
        return zeros

    def terminal_failure(self, reason: str, component: str, provider: str | None) -> None:
        """Count one terminal failure surfaced to a caller by ``component`` (``asgi``,
        ``httpx`` or ``login``); ``reason`` is the error's (``invalid_grant``, ``no_session``,
        ``unauthorized_client``...), counted by its bounded ``error.type``."""
        attributes = {ERROR_TYPE: terminal_type(reason), COMPONENT: component}
        if provider is not None:
            attributes[PROVIDER] = provider
        self.terminal_failures.add(1, attributes)

    def _observe_fresh(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        if self._unflushed:  # the first collection: an SDK is there now (see preinitialise)
            with self._zero_lock:
                zeros, self._unflushed = self._unflushed, []
            for instrument, attributes in zeros:
                instrument.add(0, attributes)
        totals: dict[tuple[tuple[str, str], ...], int] = {}
        for source in list(self._fresh_sources):
            labels = tuple(sorted(source.metric_attributes.items()))
            totals[labels] = totals.get(labels, 0) + source.fresh_hits
        return [Observation(count, dict(labels)) for labels, count in totals.items()]


@functools.cache
def default_telemetry() -> Telemetry:
    """The process-wide Telemetry on the global providers (an SDK may be set up later)."""
    return Telemetry()
