"""What ``probe`` asks the provider, one request at a time, answers kept raw.

Unlike :class:`~asgi_token_refresh.OAuth2Client`, which turns every answer into a token set or
an error, the probe must see what the provider said: the status and ``error`` of a refusal,
whether ``expires_in`` or an ID token came at all, where each metadata document lives. It
builds its requests with the same pure functions (``_oauth_messages``) and sends them through
the same bounded HTTP layer (``_provider_http``). Every token it receives is remembered as a
secret, and every text it hands on is redacted of all of them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .._clock import Clock
from .._discovery import (
    OAUTH_METADATA_PATH,
    OIDC_CONFIGURATION_PATH,
    oauth_metadata_url,
    oidc_configuration_url,
)
from .._errors import ConfigurationError, RefreshUnavailable, TokenEndpointError
from .._oauth_messages import (
    ClientAuthMethod,
    ProviderMetadata,
    build_token_request,
    redact,
    request_secrets,
    token_error,
)
from .._provider_http import ProviderHTTP
from .._tokens import TokenSet

__all__ = ["Endpoints", "ProbeError", "ProbeProvider", "TokenAnswer"]

#: Names of the endpoints the probe reports, and the metadata fields they come from.
ENDPOINT_FIELDS = {
    "authorization": "authorization_endpoint",
    "token": "token_endpoint",
    "revocation": "revocation_endpoint",
    "end_session": "end_session_endpoint",
    "jwks": "jwks_uri",
    "userinfo": "userinfo_endpoint",
}
#: Where providers say how long a refresh token lives (Keycloak; Microsoft).
_REFRESH_LIFETIME_FIELDS = ("refresh_expires_in", "refresh_token_expires_in")


class ProbeError(Exception):
    """The probe cannot go on. ``exit_code`` 2: usage or configuration; 1: the provider is
    unreachable or misbehaving. The message is one line with no token in it."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, repr=False)
class TokenAnswer:
    """One token-endpoint answer: the tokens of a success, or the status and ``error`` of a
    refusal (``invalid_response`` when the body carries none). ``repr`` shows no token."""

    status: int
    error: str | None = None
    access_token: str | None = None
    refresh_token: str | None = None
    id_token: bool = False
    expires_in: float | None = None
    refresh_expires_in: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __repr__(self) -> str:
        return f"TokenAnswer(status={self.status}, error={self.error!r})"


@dataclass
class Endpoints:
    """What metadata was found, where, and the endpoints it names (OIDC first, RFC 8414
    filling the gaps)."""

    oidc: bool = False
    rfc8414_url: str | None = None
    rfc8414_compliant: bool = True  # found at the RFC 8414 §3.1 location (not issuer + path)
    urls: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(ENDPOINT_FIELDS))
    revocation_in: str | None = None  # "oidc", "rfc8414" or None


class ProbeProvider:
    """Sends the probe's requests to one provider as one client."""

    def __init__(
        self,
        *,
        issuer: str,
        client_id: str,
        client_secret: str | None,
        auth_method: ClientAuthMethod,
        clock: Clock,
        timeout: float = 10.0,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self._client_secret = client_secret
        self.auth_method: ClientAuthMethod = auth_method
        self.clock = clock
        self.endpoints = Endpoints()
        self._http = ProviderHTTP(
            timeout=timeout,
            max_response_bytes=256 * 1024,
            transport=None,
            http_client=None,
            telemetry=None,
        )
        # Every token, code and verifier seen: never printed, redacted from every text.
        self._secrets: set[str] = {client_secret} if client_secret else set()

    def remember_secret(self, value: str) -> None:
        self._secrets.add(value)

    def redact(self, text: str) -> str:
        return redact(text, sorted(self._secrets, key=len, reverse=True))

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- metadata -----------------------------------------------------------------------------

    async def discover(self) -> Endpoints:
        """Fetch OIDC discovery and RFC 8414 metadata (§3.1 location, then under the issuer's
        path as some providers serve it). Neither usable: a configuration error."""
        found = self.endpoints
        oidc = await self._document(oidc_configuration_url(self.issuer), strict=True)
        candidates = [oauth_metadata_url(self.issuer)]
        if urlsplit(self.issuer).path:
            candidates.append(self.issuer + OAUTH_METADATA_PATH)
        oauth = None
        for url in candidates:
            oauth = await self._document(url, strict=False)
            if oauth is not None:
                found.rfc8414_url = url
                found.rfc8414_compliant = url == candidates[0]
                break
        if oidc is None and oauth is None:
            raise ProbeError(
                f"no metadata at {self.issuer}: neither {OIDC_CONFIGURATION_PATH} nor "
                f"{OAUTH_METADATA_PATH} answered (is --issuer the provider's issuer, path "
                "included?)",
                exit_code=2,
            )
        found.oidc = oidc is not None
        for name, attribute in ENDPOINT_FIELDS.items():
            for document in (oidc, oauth):
                value = getattr(document, attribute, None)
                if value is not None and found.urls[name] is None:
                    found.urls[name] = value
        if oidc is not None and oidc.revocation_endpoint is not None:
            found.revocation_in = "oidc"
        elif oauth is not None and oauth.revocation_endpoint is not None:
            found.revocation_in = "rfc8414"
        return found

    async def _document(self, url: str, *, strict: bool) -> ProviderMetadata | None:
        status, _, body = await self._send("GET", url, what="metadata")
        if strict and (status == 429 or status >= 500):
            raise ProbeError(f"{url} answered HTTP {status}", exit_code=1)
        if status != 200:
            return None
        try:
            return ProviderMetadata.from_discovery_document(body, issuer=self.issuer)
        except ConfigurationError as exc:
            if strict:  # OIDC discovery that names another issuer is a configuration error
                raise ProbeError(str(exc), exit_code=2) from None
            return None

    # -- token endpoint -----------------------------------------------------------------------

    async def refresh(self, refresh_token: str) -> TokenAnswer:
        return await self.token({"grant_type": "refresh_token", "refresh_token": refresh_token})

    async def token(self, grant: Mapping[str, str | None]) -> TokenAnswer:
        """One token request; a refusal is an answer too, never an exception. A provider that
        cannot be reached, or answers a success that is no token response: :class:`ProbeError`."""
        endpoint = self.endpoints.urls["token"]
        if endpoint is None:
            raise ProbeError("the provider's metadata names no token_endpoint", exit_code=1)
        request = build_token_request(
            endpoint,
            grant,
            client_id=self.client_id,
            client_secret=self._client_secret,
            auth_method=self.auth_method,
        )
        status, headers, body = await self._send(
            "POST", endpoint, what="token endpoint", data=request.form, headers=request.headers
        )
        if not 200 <= status < 300:
            # Read as the library reads it, everything the provider may echo redacted.
            secrets_ = [*self._secrets, *request_secrets(request, self._client_secret)]
            refusal = token_error(status, headers, body, now=self.clock.time(), secrets=secrets_)
            return TokenAnswer(status, refusal.error)
        return self._tokens(status, body)

    def _tokens(self, status: int, body: bytes) -> TokenAnswer:
        try:
            payload: Any = json.loads(body)
            # Validation as the library does it: the same answers are accepted or refused.
            token_set = TokenSet.from_token_response(
                payload, issued_at=self.clock.time(), default_lifetime=3600.0
            )
        except (ValueError, RecursionError, TokenEndpointError):
            raise ProbeError(
                f"the token endpoint answered HTTP {status} with no valid token response",
                exit_code=1,
            ) from None
        for value in (token_set.access_token, token_set.refresh_token, token_set.id_token):
            if value is not None:
                self.remember_secret(value)
        refresh_lifetime = next(
            (payload[name] for name in _REFRESH_LIFETIME_FIELDS if name in payload), None
        )
        return TokenAnswer(
            status,
            access_token=token_set.access_token,
            refresh_token=token_set.refresh_token,
            id_token=token_set.id_token is not None,
            expires_in=token_set.lifetime if payload.get("expires_in") is not None else None,
            refresh_expires_in=_seconds(refresh_lifetime),
        )

    # -- revocation and userinfo --------------------------------------------------------------

    async def revoke(self, refresh_token: str) -> int | None:
        """RFC 7009 revocation; the status, or None if no revocation endpoint is published."""
        endpoint = self.endpoints.urls["revocation"]
        if endpoint is None:
            return None
        request = build_token_request(
            endpoint,
            {"token": refresh_token, "token_type_hint": "refresh_token"},
            client_id=self.client_id,
            client_secret=self._client_secret,
            auth_method=self.auth_method,
        )
        status, _, _ = await self._send(
            "POST", endpoint, what="revocation endpoint", data=request.form, headers=request.headers
        )
        return status

    async def userinfo(self, access_token: str) -> int | None:
        """The userinfo endpoint's status for this access token; None if none is published."""
        endpoint = self.endpoints.urls["userinfo"]
        if endpoint is None:
            return None
        headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json"}
        status, _, _ = await self._send("GET", endpoint, what="userinfo endpoint", headers=headers)
        return status

    @staticmethod
    def never_issued_token() -> str:
        """A refresh token no provider issued, to see how it answers an unknown one."""
        return "probe-never-issued-" + secrets.token_urlsafe(24)

    async def _send(
        self, method: str, url: str, *, what: str, **options: Any
    ) -> tuple[int, Mapping[str, str], bytes]:
        try:
            return await self._http.send(method, url, **options)
        except RefreshUnavailable as exc:  # carries no request, so no token
            detail = exc.reason + (f": {exc.detail}" if exc.detail else "")
            raise ProbeError(
                f"the provider is unreachable ({what} {_origin(url)}: {detail})", exit_code=1
            ) from None


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds != float("inf") else None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
