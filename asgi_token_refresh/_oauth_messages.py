"""The OAuth wire format, pure: every request built and every response classified here.

No I/O, so each piece is unit-tested without a transport (golang.org/x/oauth2 keeps its
fetcher the same way). ``OAuth2Client`` sends what these functions build.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote_plus, urlencode, urlsplit

from ._errors import ConfigurationError, RefreshUnavailable, TokenEndpointError

__all__ = [
    "AUTH_METHODS",
    "DEFAULT_RETRY_AFTER",
    "AuthorizationRequest",
    "ClientAuthMethod",
    "ProviderMetadata",
    "TokenRequest",
    "build_authorization_url",
    "build_token_request",
    "pkce_challenge",
    "raise_for_token_response",
    "retry_after_seconds",
]

ClientAuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]
AUTH_METHODS: frozenset[str] = frozenset({"client_secret_basic", "client_secret_post", "none"})

# Error codes some providers send with 4xx/5xx to mean "try later", not "this grant is bad".
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})
# Used when a transient failure carries no Retry-After header.
DEFAULT_RETRY_AFTER = 5.0


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
