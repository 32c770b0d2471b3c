"""OAuth2Client: one exchange with the provider, no caching, no locks.

The module is split the way golang.org/x/oauth2 splits its fetcher: pure functions build every
request and parse every response (``_oauth_messages``), and this thin async layer sends them
with httpx. The connection pool is kept per event loop (``PerLoop``), so one client can be
used from any loop or thread. Caching and single-flight live in ``_refresher``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from ._clock import SYSTEM_CLOCK, Clock
from ._discovery import Discovery
from ._errors import ConfigurationError, RefreshUnavailable, TokenEndpointError
from ._oauth_messages import (
    AUTH_METHODS,
    DEFAULT_RETRY_AFTER,
    AuthorizationRequest,
    ClientAuthMethod,
    ProviderMetadata,
    TokenRequest,
    build_token_request,
    classify_token_error,
    new_authorization_request,
    raise_for_token_response,
    request_secrets,
)
from ._provider_http import ProviderHTTP
from ._telemetry import Telemetry, default_telemetry, server_attributes
from ._tokens import TokenSet

__all__ = ["OAuth2Client"]


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
        jwks_uri: str | None = None,
        end_session_endpoint: str | None = None,
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
        self.clock: Clock = clock or SYSTEM_CLOCK
        #: Spans and metrics; Refreshers built on this client share it unless given their own.
        self.telemetry = telemetry or default_telemetry()
        self._http = ProviderHTTP(
            timeout=timeout,
            max_response_bytes=max_response_bytes,
            transport=transport,
            http_client=http_client,
            telemetry=self.telemetry,
        )
        # Endpoints given explicitly win over discovered ones (a provider may publish none).
        self._explicit = {
            name: value
            for name, value in (
                ("authorization_endpoint", authorization_endpoint),
                ("revocation_endpoint", revocation_endpoint),
                ("userinfo_endpoint", userinfo_endpoint),
                ("jwks_uri", jwks_uri),
                ("end_session_endpoint", end_session_endpoint),
            )
            if value is not None
        }
        for endpoint, url in self._explicit.items():
            if urlsplit(url).scheme not in ("http", "https"):
                raise ConfigurationError(f"{endpoint} must be an http(s) URL, not {url!r}")
        known = None
        if token_endpoint is not None:  # nothing to discover
            known = ProviderMetadata(token_endpoint=token_endpoint, issuer=issuer, **self._explicit)
        self._discovery = Discovery(self._http, issuer=issuer, known=known, explicit=self._explicit)
        # server.address (and .port) of the token endpoint, for spans; a discovered one is
        # known after the first discovery.
        self._server: dict[str, str | int] = server_attributes(token_endpoint or "")
        #: Identifies (provider, client) in cache keys, logs and the ``provider`` attribute.
        self.provider_url: str = issuer or token_endpoint or ""
        self.name: str = name or urlsplit(self.provider_url).hostname or "oauth2"
        # The series the dashboard and the alerts query start at zero (once per provider).
        self.telemetry.preinitialise(self.name)

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
            and self._http.same_as(other._http)
            and self.clock is other.clock
            and self.telemetry is other.telemetry
        )

    # -- endpoints -------------------------------------------------------------------------

    async def metadata(self) -> ProviderMetadata:
        """The provider's endpoints, discovering them on first use."""
        return await self._discovery.metadata()

    def server_attributes(self) -> Mapping[str, str | int]:
        """The token endpoint's ``server.address`` (and ``server.port`` if not the default),
        computed once; empty until a discovered endpoint is known."""
        return self._server

    @property
    def max_response_bytes(self) -> int:
        return self._http.max_response_bytes

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
        """Start a login: authorization code with PKCE S256, fresh ``state`` and ``nonce``
        (``prompt="consent"`` with ``offline_access``: :func:`new_authorization_request`)."""
        metadata = await self.metadata()
        if metadata.authorization_endpoint is None:
            raise ConfigurationError("the provider has no authorization_endpoint")
        return new_authorization_request(
            metadata.authorization_endpoint,
            client_id=self.client_id,
            redirect_uri=redirect_uri,
            scope=scope,
            state=state,
            nonce=nonce,
            prompt=prompt,
            extra=extra,
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

    async def revoke(self, token: str, *, token_type_hint: str = "refresh_token") -> bool:
        """Revoke a token (RFC 7009). ``False`` if the provider publishes no revocation
        endpoint (neither in OIDC discovery nor in RFC 8414 metadata, nor given)."""
        return await self._revoke(token, token_type_hint)

    async def jwks(self) -> Any:
        """The provider's JSON Web Key Set (``jwks_uri``), fetched now (callers cache it)."""
        metadata = await self.metadata()
        if metadata.jwks_uri is None:
            raise ConfigurationError(
                "the provider publishes no jwks_uri: pass OAuth2Client(jwks_uri=...) to verify "
                "ID tokens"
            )
        status, _, body = await self._http.send("GET", metadata.jwks_uri)
        if status != 200:
            raise RefreshUnavailable(
                "provider_error", retry_after=DEFAULT_RETRY_AFTER, detail=f"JWKS HTTP {status}"
            )
        return json.loads(body)

    async def aclose(self) -> None:
        """Close the running loop's pool (not an ``http_client`` that was passed in)."""
        await self._http.aclose()

    async def _post(self, request: TokenRequest) -> tuple[int, bytes]:
        """POST ``request``; the status and body, every non-terminal answer already raised as
        ``RefreshUnavailable`` and every terminal one as ``TokenEndpointError``."""
        status, headers, body = await self._http.send(
            "POST", request.url, data=request.form, headers=request.headers
        )
        secrets = request_secrets(request, self._client_secret)
        raise_for_token_response(status, headers, body, now=self.clock.time(), secrets=secrets)
        return status, body

    async def _token(self, grant: Mapping[str, str | None], previous: TokenSet | None) -> TokenSet:
        metadata = await self.metadata()
        if not self._server:
            self._server = server_attributes(metadata.token_endpoint)
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

    async def _revoke(self, token: str, token_type_hint: str) -> bool:
        metadata = await self.metadata()
        if metadata.revocation_endpoint is None:
            return False
        request = build_token_request(
            metadata.revocation_endpoint,
            {"token": token, "token_type_hint": token_type_hint},
            client_id=self.client_id,
            client_secret=self._client_secret,
            auth_method=self.auth_method,
        )
        await self._post(request)
        return True
