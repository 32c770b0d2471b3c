"""OAuth2Client: one exchange with the provider, no caching, no locks.

The module is split the way golang.org/x/oauth2 splits its fetcher: pure functions build every
request and parse every response (unit-tested without a transport), and a thin async layer sends
them with httpx. All network I/O runs on the library's I/O loop (see ``_ioloop``), so one client
can be used from any event loop or thread. Caching and single-flight live in ``_refresher``.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote_plus, urlencode, urlsplit

import httpx

from ._clock import SYSTEM_CLOCK, Clock
from ._errors import ConfigurationError, RefreshUnavailable, TokenEndpointError
from ._ioloop import io_loop, reset_after_fork
from ._telemetry import Telemetry, default_telemetry
from ._tokens import TokenSet

__all__ = [
    "AuthorizationRequest",
    "ClientAuthMethod",
    "OAuth2Client",
    "ProviderMetadata",
    "TokenRequest",
    "build_authorization_url",
    "build_token_request",
    "pkce_challenge",
    "raise_for_token_response",
    "retry_after_seconds",
]

ClientAuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]
_AUTH_METHODS: frozenset[str] = frozenset({"client_secret_basic", "client_secret_post", "none"})

# Error codes some providers send with 4xx/5xx to mean "try later", not "this grant is bad".
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})
# Used when a transient failure carries no Retry-After header.
DEFAULT_RETRY_AFTER = 5.0
# Idle connections are dropped before common server idle timeouts (uvicorn's 5 s): reusing one
# the server is closing fails the refresh with a ReadError, and a refresh POST is not retried.
_POOL_LIMITS = httpx.Limits(keepalive_expiry=2.0)


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """The endpoints of a provider, given explicitly or read from OIDC discovery."""

    token_endpoint: str
    authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    issuer: str | None = None

    @classmethod
    def from_discovery_document(cls, body: bytes, *, issuer: str) -> ProviderMetadata:
        """Parse ``/.well-known/openid-configuration`` and check it names ``issuer``."""
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigurationError(f"discovery document of {issuer} is not JSON") from None
        if not isinstance(doc, Mapping):
            raise ConfigurationError(f"discovery document of {issuer} is not a JSON object")
        # OpenID Connect Discovery §4.3: the issuer must be exactly the one we asked for.
        if str(doc.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
            raise ConfigurationError(
                f"discovery document names issuer {doc.get('issuer')!r}, expected {issuer!r}"
            )

        def url(name: str) -> str | None:
            value = doc.get(name)
            if value is None:
                return None
            if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
                raise ConfigurationError(f"discovery field {name} of {issuer} is not a URL")
            return value

        token_endpoint = url("token_endpoint")
        if token_endpoint is None:
            raise ConfigurationError(f"discovery document of {issuer} has no token_endpoint")
        return cls(
            token_endpoint=token_endpoint,
            authorization_endpoint=url("authorization_endpoint"),
            revocation_endpoint=url("revocation_endpoint"),
            userinfo_endpoint=url("userinfo_endpoint"),
            issuer=issuer,
        )


@dataclass(frozen=True, slots=True, repr=False)
class TokenRequest:
    """A POST to a token or revocation endpoint, fully built. ``repr`` shows no values."""

    url: str
    form: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"TokenRequest(url={self.url!r}, fields={sorted(self.form)!r})"


@dataclass(frozen=True, slots=True, repr=False)
class AuthorizationRequest:
    """Where to send the browser, and what the callback must check (keep it server-side or in
    an encrypted cookie: ``code_verifier`` is a secret)."""

    url: str
    state: str
    nonce: str | None
    code_verifier: str
    redirect_uri: str

    def __repr__(self) -> str:
        return f"AuthorizationRequest(url={self.url.split('?')[0]!r}, ...)"


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def build_authorization_url(
    authorization_endpoint: str,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str,
    state: str,
    code_verifier: str,
    nonce: str | None = None,
    prompt: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> str:
    """The authorization-code request URL (RFC 6749 §4.1.1) with PKCE S256 (RFC 7636)."""
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "code_challenge": pkce_challenge(code_verifier),
        "code_challenge_method": "S256",
    }
    if nonce is not None:
        params["nonce"] = nonce
    if prompt is not None:
        params["prompt"] = prompt
    params.update(extra or {})
    separator = "&" if urlsplit(authorization_endpoint).query else "?"
    return authorization_endpoint + separator + urlencode(params)


def build_token_request(
    url: str,
    grant: Mapping[str, str | None],
    *,
    client_id: str,
    client_secret: str | None,
    auth_method: ClientAuthMethod,
) -> TokenRequest:
    """Add client authentication (RFC 6749 §2.3.1) to a grant's form fields.

    ``None`` values are dropped, so callers can pass optional parameters unconditionally.
    """
    form = {k: v for k, v in grant.items() if v is not None}
    headers = {"Accept": "application/json"}
    if auth_method == "client_secret_basic":
        # §2.3.1: id and secret are form-urlencoded *before* base64 — many clients forget.
        raw = f"{quote_plus(client_id)}:{quote_plus(client_secret or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")
    elif auth_method == "client_secret_post":
        form["client_id"] = client_id
        form["client_secret"] = client_secret or ""
    else:
        form["client_id"] = client_id
    return TokenRequest(url=url, form=form, headers=headers)


def retry_after_seconds(value: str | None, *, now: float) -> float | None:
    """Parse ``Retry-After`` (delta-seconds or HTTP-date, RFC 9110 §10.2.3) into seconds."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def raise_for_token_response(
    status: int, headers: Mapping[str, str], body: bytes, *, now: float
) -> None:
    """Raise the right error for a non-2xx token or revocation endpoint response.

    The decision is made on the OAuth ``error`` field, not on the status: Auth0 answers
    ``invalid_grant`` with 403, oidc-provider with 400, and ``invalid_client`` may come as 401.
    429, 5xx and the transient error codes raise :class:`RefreshUnavailable`.
    """
    if 200 <= status < 300:
        return
    error, description, uri = "invalid_response", None, None
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = None
    if isinstance(payload, Mapping) and isinstance(payload.get("error"), str):
        error = payload["error"]
        description = payload.get("error_description")
        uri = payload.get("error_uri")
        description = description if isinstance(description, str) else None
        uri = uri if isinstance(uri, str) else None
    retry_after = retry_after_seconds(headers.get("retry-after"), now=now)
    endpoint_error = TokenEndpointError(
        error,
        status=status,
        error_description=description,
        error_uri=uri,
        retry_after=retry_after,
    )
    if status == 429 or status >= 500 or error in _TRANSIENT_ERRORS:
        raise RefreshUnavailable(
            "provider_error",
            retry_after=DEFAULT_RETRY_AFTER if retry_after is None else retry_after,
            detail=f"HTTP {status} {error}",
        ) from endpoint_error
    raise endpoint_error


class OAuth2Client:
    """Talks to one provider as one client: refresh, client credentials, authorization code with
    PKCE, revocation.

    Build it with explicit endpoints or with :meth:`from_discovery` (the document is fetched on
    first use and cached). Pass ``transport`` (e.g. ``FakeIdP.transport()``) or a whole
    ``http_client`` to control the HTTP layer; either is used only from the library's I/O loop.
    The secret never appears in ``repr`` or errors.
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
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        clock: Clock | None = None,
        name: str | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if not client_id:
            raise ConfigurationError("client_id is required")
        if auth_method not in _AUTH_METHODS:
            raise ConfigurationError(
                f"auth_method must be one of {sorted(_AUTH_METHODS)}, not {auth_method!r}"
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
        if transport is not None and http_client is not None:
            raise ConfigurationError("pass transport or http_client, not both")

        self.client_id = client_id
        self._client_secret = client_secret
        self.auth_method: ClientAuthMethod = auth_method
        self.issuer = issuer
        self.timeout = timeout
        self.default_token_lifetime = default_token_lifetime
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
        # Discovery runs once; concurrent first callers share it. Created on the I/O loop.
        self._discovery: asyncio.Future[ProviderMetadata] | None = None
        #: Identifies (provider, client) in cache keys, logs and the ``provider`` attribute.
        self.provider_url: str = issuer or token_endpoint or ""
        self.name: str = name or urlsplit(self.provider_url).hostname or "oauth2"
        #: Spans and metrics; Refreshers built on this client share it unless given their own.
        self.telemetry = telemetry or default_telemetry()
        reset_after_fork(self)

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
        return await io_loop.run(self._discover())

    async def _discover(self) -> ProviderMetadata:
        if self._metadata is not None:
            return self._metadata
        if self._discovery is None:
            self._discovery = asyncio.ensure_future(self._fetch_discovery())
        try:
            # shield: one impatient caller must not cancel discovery for everyone else.
            self._metadata = await asyncio.shield(self._discovery)
        except BaseException:
            if self._discovery.done():
                self._discovery = None  # failures are not cached: the next caller retries
            raise
        return self._metadata

    async def _fetch_discovery(self) -> ProviderMetadata:
        assert self.issuer is not None
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            response = await self._client().get(url)
        except httpx.TimeoutException:
            raise RefreshUnavailable("timeout", retry_after=DEFAULT_RETRY_AFTER) from None
        except httpx.TransportError as exc:
            raise RefreshUnavailable(
                "network_error", retry_after=DEFAULT_RETRY_AFTER, detail=type(exc).__name__
            ) from None
        if response.status_code == 429 or response.status_code >= 500:
            raise RefreshUnavailable(
                "provider_error",
                retry_after=DEFAULT_RETRY_AFTER,
                detail=f"discovery HTTP {response.status_code}",
            )
        if response.status_code != 200:
            raise ConfigurationError(f"discovery at {url} answered HTTP {response.status_code}")
        return ProviderMetadata.from_discovery_document(response.content, issuer=self.issuer)

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
        return await io_loop.run(self._token(grant, previous))

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
        return await io_loop.run(self._token(grant, None))

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
        return await io_loop.run(self._token(grant, None))

    async def revoke(self, token: str, *, token_type_hint: str = "refresh_token") -> None:
        """Revoke a token (RFC 7009). A provider without a revocation endpoint is a no-op."""
        await io_loop.run(self._revoke(token, token_type_hint))

    async def aclose(self) -> None:
        """Close the HTTP client this object created (not one that was passed in)."""
        await io_loop.run(self._aclose())

    # -- I/O (runs on the I/O loop) ------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            transport = instrumented(
                self._transport or httpx.AsyncHTTPTransport(limits=_POOL_LIMITS),
                self.telemetry.tracer_provider,
            )
            self._http = httpx.AsyncClient(
                transport=transport, timeout=self.timeout, follow_redirects=False
            )
        return self._http

    async def _aclose(self) -> None:
        if self._http is not None and self._owns_http:
            await self._http.aclose()
            self._http = None

    def _after_fork_in_child(self) -> None:
        # The pool's connections and the discovery future belong to the parent's I/O loop.
        self._discovery = None
        if self._owns_http:
            self._http = None

    async def _post(self, request: TokenRequest) -> httpx.Response:
        try:
            return await self._client().post(
                request.url, data=request.form, headers=request.headers
            )
        except httpx.TimeoutException:
            raise RefreshUnavailable("timeout", retry_after=DEFAULT_RETRY_AFTER) from None
        except httpx.TransportError as exc:
            # `from None`: httpx errors carry the request, whose body holds the refresh token.
            raise RefreshUnavailable(
                "network_error", retry_after=DEFAULT_RETRY_AFTER, detail=type(exc).__name__
            ) from None

    async def _token(self, grant: Mapping[str, str | None], previous: TokenSet | None) -> TokenSet:
        metadata = await self._discover()
        request = build_token_request(
            metadata.token_endpoint,
            grant,
            client_id=self.client_id,
            client_secret=self._client_secret,
            auth_method=self.auth_method,
        )
        response = await self._post(request)
        now = self.clock.time()
        raise_for_token_response(response.status_code, response.headers, response.content, now=now)
        try:
            return TokenSet.from_token_response(
                response.content,
                issued_at=now,
                default_lifetime=self.default_token_lifetime,
                previous=previous,
            )
        except TokenEndpointError as exc:
            exc.status = response.status_code
            raise

    async def _revoke(self, token: str, token_type_hint: str) -> None:
        metadata = await self._discover()
        if metadata.revocation_endpoint is None:
            return
        request = build_token_request(
            metadata.revocation_endpoint,
            {"token": token, "token_type_hint": token_type_hint},
            client_id=self.client_id,
            client_secret=self._client_secret,
            auth_method=self.auth_method,
        )
        response = await self._post(request)
        raise_for_token_response(
            response.status_code, response.headers, response.content, now=self.clock.time()
        )


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
