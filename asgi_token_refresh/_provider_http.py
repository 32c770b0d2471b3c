"""The HTTP layer under OAuth2Client: pools per event loop, bounded reads, no request in errors.

Every request to the provider (discovery, token, revocation, JWKS) goes through
:class:`ProviderHTTP`. It reads at most ``max_response_bytes``, on the wire and decoded (a gzip
bomb stops at the limit), and turns every httpx failure into a ``RefreshUnavailable`` that
carries no request: httpx errors hold the request, whose body holds the refresh token and whose
headers hold the client credentials.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from ._errors import RefreshUnavailable
from ._oauth_messages import DEFAULT_RETRY_AFTER
from ._per_loop import PerLoop

if TYPE_CHECKING:
    from ._telemetry import Telemetry

__all__ = ["ProviderHTTP", "instrumented"]

# Idle connections are dropped before common server idle timeouts (uvicorn's 5 s): reusing one
# the server is closing fails the refresh with a ReadError, and a refresh POST is not retried.
_POOL_LIMITS = httpx.Limits(keepalive_expiry=2.0)


class ProviderHTTP:
    """Sends requests to one provider. Without ``http_client`` each event loop gets its own
    pool (closed when that loop shuts down); a passed ``http_client`` is used as is."""

    def __init__(
        self,
        *,
        timeout: float,
        max_response_bytes: int,
        transport: httpx.AsyncBaseTransport | None,
        http_client: httpx.AsyncClient | None,
        telemetry: Telemetry | None,
    ) -> None:
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._transport = transport
        self._http = http_client
        self._telemetry = telemetry
        self._pools: PerLoop[httpx.AsyncClient] = PerLoop(
            self._new_pool, close=httpx.AsyncClient.aclose
        )

    def same_as(self, other: ProviderHTTP) -> bool:
        """Whether both send the same way (one transport, or each its own default pools)."""
        if self._http is not None or other._http is not None:
            return self._http is other._http
        return self._transport is other._transport

    def _client(self) -> httpx.AsyncClient:
        return self._http if self._http is not None else self._pools.get()

    def _new_pool(self) -> httpx.AsyncClient:
        transport = self._transport or httpx.AsyncHTTPTransport(limits=_POOL_LIMITS)
        if self._telemetry is not None:  # (None: not traced, as for the probe command)
            transport = instrumented(transport, self._telemetry)
        return httpx.AsyncClient(transport=transport, timeout=self.timeout, follow_redirects=False)

    async def aclose(self) -> None:
        """Close the running loop's pool (not an ``http_client`` that was passed in)."""
        pool = self._pools.pop()
        if pool is not None:
            await pool.aclose()

    async def send(self, method: str, url: str, **options: Any) -> tuple[int, httpx.Headers, bytes]:
        """One request; the status, headers and body, read up to ``max_response_bytes`` (on the
        wire and decoded both: a gzip bomb stops at the limit). Every failure is a
        ``RefreshUnavailable`` that carries no request: httpx errors hold the request, whose
        body holds the refresh token and whose headers hold the client credentials."""
        limit = self.max_response_bytes
        try:
            async with self._client().stream(method, url, **options) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limit or response.num_bytes_downloaded > limit:
                        raise RefreshUnavailable(
                            "provider_error",
                            retry_after=DEFAULT_RETRY_AFTER,
                            detail=f"response larger than {limit} bytes",
                        )
                return response.status_code, response.headers, bytes(body)
        except httpx.TimeoutException:
            raise RefreshUnavailable("timeout", retry_after=DEFAULT_RETRY_AFTER) from None
        except httpx.TransportError as exc:
            raise RefreshUnavailable(
                "network_error", retry_after=DEFAULT_RETRY_AFTER, detail=type(exc).__name__
            ) from None
        except httpx.HTTPError as exc:  # a body that does not decode, a bad redirect...
            raise RefreshUnavailable(
                "provider_error", retry_after=DEFAULT_RETRY_AFTER, detail=type(exc).__name__
            ) from None


def instrumented(
    transport: httpx.AsyncBaseTransport, telemetry: Telemetry
) -> httpx.AsyncBaseTransport:
    """``transport`` traced by opentelemetry-instrumentation-httpx when it is installed, into
    ``telemetry``'s own providers (its HTTP spans and duration metrics go where ours go).

    Its spans carry method, URL and status, never headers or bodies, so no token leaks there.
    """
    try:
        from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport
    except ImportError:  # pragma: no cover - the instrumentation is an optional dependency
        return transport
    return AsyncOpenTelemetryTransport(
        transport,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
