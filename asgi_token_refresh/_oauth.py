"""OAuth2Client: one exchange with the provider, no caching, no locks.

The module is split the way golang.org/x/oauth2 splits its fetcher: pure functions build every
request and parse every response (``_oauth_messages``), and this thin async layer sends them
with httpx. The connection pool is kept per event loop (``PerLoop``), so one client can be
used from any loop or thread. Caching and single-flight live in ``_refresher``.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from ._clock import SYSTEM_CLOCK, Clock
from ._errors import ConfigurationError, RefreshUnavailable, TokenEndpointError
from ._oauth_messages import (
    AUTH_METHODS,
    DEFAULT_RETRY_AFTER,
    AuthorizationRequest,
    ClientAuthMethod,
    ProviderMetadata,
    TokenRequest,
    build_authorization_url,
    build_token_request,
    classify_token_error,
    raise_for_token_response,
)
from ._per_loop import PerLoop
from ._telemetry import Telemetry, default_telemetry
from ._tokens import TokenSet

__all__ = ["OAuth2Client", "instrumented"]

# Form fields that are secrets, redacted from whatever the provider echoes back.
_SECRET_FIELDS = frozenset({"refresh_token", "code", "code_verifier", "client_secret", "token"})
# Idle connections are dropped before common server idle timeouts (uvicorn's 5 s): reusing one
# the server is closing fails the refresh with a ReadError, and a refresh POST is not retried.
_POOL_LIMITS = httpx.Limits(keepalive_expiry=2.0)


class OAuth2Client:
    """Talks to one provider as one client: refresh, client credentials, authorization code with
    PKCE, revocation.

    Build it with explicit endpoints or with :meth:`from_discovery` (the document is fetched on
    first use and cached). Pass ``transport`` (e.g. ``FakeIdP.transport()``) or a whole
    ``http_client`` to control the HTTP layer. Without ``http_client`` each event loop gets its
    own pool; a passed ``http_client`` is used as is, so it must belong to the one loop the app
    runs on. The secret never appears in ``repr`` or errors.

    Every provider answer has a defined outcome: a terminal OAuth error (``invalid_grant``,
    ``invalid_client``, ``unauthorized_client``) raises :class:`TokenEndpointError`; anything
    else that is not a token response (5xx, 429, 3xx, 404, ``invalid_request``,
    ``invalid_scope``, garbage, more than ``max_response_bytes``) raises
    :class:`RefreshUnavailable`, with ``Retry-After`` clamped to 0..120 s. Nothing the provider
    echoes of a token or the secret reaches an error's text.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str | None = None,
        token_endpoint: str | None = None,
        authorization_endpoint: str | None = None,
        revocation_endpoint: str | None = None,
        userinfo_endpoint: str | None = None,
        issuer: str | None = None,
        auth_method: ClientAuthMethod = "client_secret_basic",
        timeout: float = 10.0,
        default_token_lifetime: float = 3600.0,
        max_response_bytes: int = 256 * 1024,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        clock: Clock | None = None,
        name: str | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if not client_id:
            raise ConfigurationError("client_id is required")
        if auth_method not in AUTH_METHODS:
            raise ConfigurationError(
                f"auth_method must be one of {sorted(AUTH_METHODS)}, not {auth_method!r}"
            )
        if auth_method != "none" and not client_secret:
            raise ConfigurationError(f"auth_method {auth_method!r} needs a client_secret")
        if token_endpoint is None and issuer is None:
            raise ConfigurationError("give token_endpoint, or use OAuth2Client.from_discovery()")
        for label, value in (("token_endpoint", token_endpoint), ("issuer", issuer)):
            if value is not None and urlsplit(value).scheme not in ("http", "https"):
                raise ConfigurationError(f"{label} must be an http(s) URL, not {value!r}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigurationError("timeout must be a positive number of seconds")
        if not (math.isfinite(default_token_lifetime) and default_token_lifetime > 0):
            raise ConfigurationError("default_token_lifetime must be a positive number of seconds")
        if max_response_bytes < 1024:
            raise ConfigurationError("max_response_bytes must be at least 1024")
        if transport is not None and http_client is not None:
            raise ConfigurationError("pass transport or http_client, not both")

        self.client_id = client_id
        self._client_secret = client_secret
        self.auth_method: ClientAuthMethod = auth_method
        self.issuer = issuer
        self.timeout = timeout
        self.default_token_lifetime = default_token_lifetime
        #: Larger answers (compressed or decoded) are a misbehaving provider: 503, not memory.
        self.max_response_bytes = max_response_bytes
        self.clock: Clock = clock or SYSTEM_CLOCK
        self._transport = transport
        self._http = http_client
        self._owns_http = http_client is None
        self._metadata: ProviderMetadata | None = None
        if token_endpoint is not None:
            self._metadata = ProviderMetadata(
                token_endpoint=token_endpoint,
                authorization_endpoint=authorization_endpoint,
                revocation_endpoint=revocation_endpoint,
                userinfo_endpoint=userinfo_endpoint,
                issuer=issuer,
            )
        # Each loop's pool (unless http_client was passed): made on first use there, closed
        # when that loop shuts down.
        self._pools: PerLoop[httpx.AsyncClient] = PerLoop(
            self._new_pool, close=httpx.AsyncClient.aclose
        )
        # Discovery runs once; concurrent first callers on one loop share it.
        self._discovery: PerLoop[dict[str, asyncio.Future[ProviderMetadata]]] = PerLoop(dict)
        #: Identifies (provider, client) in cache keys, logs and the ``provider`` attribute.
        self.provider_url: str = issuer or token_endpoint or ""
        self.name: str = name or urlsplit(self.provider_url).hostname or "oauth2"
        #: Spans and metrics; Refreshers built on this client share it unless given their own.
        self.telemetry = telemetry or default_telemetry()

    @classmethod
    def from_discovery(cls, issuer: str, *, client_id: str, **options: Any) -> OAuth2Client:
        """A client whose endpoints come from ``{issuer}/.well-known/openid-configuration``."""
        return cls(issuer=issuer, client_id=client_id, **options)

    def __repr__(self) -> str:
        return (
            f"OAuth2Client(provider={self.provider_url!r}, client_id={self.client_id!r}, "
            f"auth_method={self.auth_method!r})"
        )

    def interchangeable(self, other: OAuth2Client) -> bool:
        """Whether ``other`` talks to the same provider as the same client in the same way."""
        return (
            (self.provider_url, self.client_id, self.auth_method, self._client_secret)
            == (other.provider_url, other.client_id, other.auth_method, other._client_secret)
            and self._transport is other._transport
            and ((self._owns_http and other._owns_http) or self._http is other._http)
            and self.clock is other.clock
            and self.telemetry is other.telemetry
        )

    # -- endpoints -------------------------------------------------------------------------

    async def metadata(self) -> ProviderMetadata:
        """The provider's endpoints, discovering them on first use."""
        if self._metadata is not None:
            return self._metadata
        pending = self._discovery.get()
        discovery = pending.get("discovery")
        if discovery is None:
            discovery = pending["discovery"] = asyncio.ensure_future(self._fetch_discovery())
        try:
            # shield: one impatient caller must not cancel discovery for everyone else.
            self._metadata = await asyncio.shield(discovery)
        except BaseException:
            if discovery.done():
                pending.pop("discovery", None)  # failures are not cached: the next one retries
            raise
        return self._metadata

    async def _fetch_discovery(self) -> ProviderMetadata:
        assert self.issuer is not None
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        status, _, body = await self._send("GET", url)
        if status == 429 or status >= 500:
            raise RefreshUnavailable(
                "provider_error", retry_after=DEFAULT_RETRY_AFTER, detail=f"discovery HTTP {status}"
            )
        if status != 200:
            raise ConfigurationError(f"discovery at {url} answered HTTP {status}")
        return ProviderMetadata.from_discovery_document(body, issuer=self.issuer)

    # -- grants ----------------------------------------------------------------------------

    async def refresh(
        self,
        refresh_token: str,
        *,
        scope: str | None = None,
        resource: str | None = None,
        audience: str | None = None,
        previous: TokenSet | None = None,
    ) -> TokenSet:
        """One ``refresh_token`` grant (RFC 6749 §6). Not deduplicated: use a Refresher."""
        grant = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "scope": scope,
            "resource": resource,
            "audience": audience,
        }
        return await self._token(grant, previous)

    async def client_credentials(
        self,
        *,
        scope: str | None = None,
        resource: str | None = None,
        audience: str | None = None,
    ) -> TokenSet:
        """One ``client_credentials`` grant (RFC 6749 §4.4)."""
        grant = {
            "grant_type": "client_credentials",
            "scope": scope,
            "resource": resource,
            "audience": audience,
        }
        return await self._token(grant, None)

    async def authorization_url(
        self,
        redirect_uri: str,
        *,
        scope: str = "openid",
        state: str | None = None,
        nonce: str | None = None,
        prompt: str | None = None,
        **extra: str,
    ) -> AuthorizationRequest:
        """Start a login: authorization code with PKCE S256, fresh ``state`` and ``nonce``.

        OIDC Core §11: ``offline_access`` is ignored by conforming providers unless the user
        is asked for consent, so ``prompt="consent"`` is added when it is requested.
        """
        metadata = await self.metadata()
        if metadata.authorization_endpoint is None:
            raise ConfigurationError("the provider has no authorization_endpoint")
        if prompt is None and "offline_access" in scope.split():
            prompt = "consent"
        verifier = secrets.token_urlsafe(48)
        state = state or secrets.token_urlsafe(24)
        nonce = nonce or (secrets.token_urlsafe(24) if "openid" in scope.split() else None)
        url = build_authorization_url(
            metadata.authorization_endpoint,
            client_id=self.client_id,
            redirect_uri=redirect_uri,
            scope=scope,
            state=state,
            code_verifier=verifier,
            nonce=nonce,
            prompt=prompt,
            extra=extra,
        )
        return AuthorizationRequest(
            url=url, state=state, nonce=nonce, code_verifier=verifier, redirect_uri=redirect_uri
        )

    async def exchange_code(self, code: str, *, redirect_uri: str, code_verifier: str) -> TokenSet:
        """Redeem an authorization code (RFC 6749 §4.1.3, RFC 7636 §4.5)."""
        grant = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        return await self._token(grant, None)

    async def revoke(self, token: str, *, token_type_hint: str = "refresh_token") -> None:
        """Revoke a token (RFC 7009). A provider without a revocation endpoint is a no-op."""
        await self._revoke(token, token_type_hint)

    async def aclose(self) -> None:
        """Close the running loop's pool (not an ``http_client`` that was passed in)."""
        pool = self._pools.pop()
        if pool is not None:
            await pool.aclose()

    # -- I/O ------------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        return self._http if self._http is not None else self._pools.get()

    def _new_pool(self) -> httpx.AsyncClient:
        transport = instrumented(
            self._transport or httpx.AsyncHTTPTransport(limits=_POOL_LIMITS),
            self.telemetry.tracer_provider,
        )
        return httpx.AsyncClient(transport=transport, timeout=self.timeout, follow_redirects=False)

    async def _send(
        self, method: str, url: str, **options: Any
    ) -> tuple[int, httpx.Headers, bytes]:
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

    async def _post(self, request: TokenRequest) -> tuple[int, bytes]:
        """POST ``request``; the status and body, every non-terminal answer already raised as
        ``RefreshUnavailable`` and every terminal one as ``TokenEndpointError``."""
        status, headers, body = await self._send(
            "POST", request.url, data=request.form, headers=request.headers
        )
        secrets = [v for k, v in request.form.items() if k in _SECRET_FIELDS]
        if self._client_secret:
            secrets.append(self._client_secret)
        raise_for_token_response(status, headers, body, now=self.clock.time(), secrets=secrets)
        return status, body

    async def _token(self, grant: Mapping[str, str | None], previous: TokenSet | None) -> TokenSet:
        metadata = await self.metadata()
        request = build_token_request(
            metadata.token_endpoint,
            grant,
            client_id=self.client_id,
            client_secret=self._client_secret,
            auth_method=self.auth_method,
        )
        status, body = await self._post(request)
        try:
            return TokenSet.from_token_response(
                body,
                issued_at=self.clock.time(),
                default_lifetime=self.default_token_lifetime,
                previous=previous,
            )
        except TokenEndpointError as exc:  # a malformed 2xx: the provider misbehaves
            exc.status = status
            classify_token_error(exc)

    async def _revoke(self, token: str, token_type_hint: str) -> None:
        metadata = await self.metadata()
        if metadata.revocation_endpoint is None:
            return
        request = build_token_request(
            metadata.revocation_endpoint,
            {"token": token, "token_type_hint": token_type_hint},
            client_id=self.client_id,
            client_secret=self._client_secret,
            auth_method=self.auth_method,
        )
        await self._post(request)


def instrumented(
    transport: httpx.AsyncBaseTransport, tracer_provider: Any = None
) -> httpx.AsyncBaseTransport:
    """``transport`` traced by opentelemetry-instrumentation-httpx when it is installed.

    Its spans carry method, URL and status, never headers or bodies, so no token leaks there.
    """
    try:
        from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport
    except ImportError:  # pragma: no cover - the instrumentation is an optional dependency
        return transport
    return AsyncOpenTelemetryTransport(transport, tracer_provider=tracer_provider)
