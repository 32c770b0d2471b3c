"""The OAuth wire format, pure: every request built and every response classified here.

No I/O, so each piece is unit-tested without a transport (golang.org/x/oauth2 keeps its
fetcher the same way). ``OAuth2Client`` sends what these functions build.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from secrets import token_urlsafe
from typing import Literal, NoReturn
from urllib.parse import quote_plus, urlencode, urlsplit

from ._errors import ConfigurationError, RefreshUnavailable, TokenEndpointError

__all__ = [
    "AUTH_METHODS",
    "DEFAULT_RETRY_AFTER",
    "MAX_RETRY_AFTER",
    "TERMINAL_ERRORS",
    "AuthorizationRequest",
    "ClientAuthMethod",
    "ProviderMetadata",
    "TokenRequest",
    "build_authorization_url",
    "build_token_request",
    "classify_token_error",
    "new_authorization_request",
    "pkce_challenge",
    "raise_for_token_response",
    "redact",
    "request_secrets",
    "retry_after_seconds",
    "token_error",
]

ClientAuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]
AUTH_METHODS: frozenset[str] = frozenset({"client_secret_basic", "client_secret_post", "none"})

# Error codes some providers send with 4xx/5xx to mean "try later", not "this grant is bad".
#: The OAuth error codes that mean this grant (or this client) will never work again. Every
#: other answer is "provider unavailable or misbehaving": ``invalid_request`` and
#: ``invalid_scope`` too, because they say the request was wrong, not that the session is dead
#: (a misconfigured scope fails every session alike; logging users out would not fix it).
TERMINAL_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})
#: Retry-After is clamped to this many seconds, internally and towards browsers.
MAX_RETRY_AFTER = 120.0
_DELTA_SECONDS = re.compile(r"[0-9]+")  # ASCII digits only: "²".isdigit() is True
_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}")  # RFC 6749 §5.2, bounded
_MAX_DESCRIPTION = 200
# Used when a transient failure carries no Retry-After header.
DEFAULT_RETRY_AFTER = 5.0
# Form fields that are secrets, redacted from whatever the provider echoes back.
_SECRET_FIELDS = frozenset({"refresh_token", "code", "code_verifier", "client_secret", "token"})


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """The endpoints of a provider, given explicitly or read from OIDC discovery (RFC 8414
    authorization-server metadata fills in what OIDC discovery leaves out)."""

    token_endpoint: str
    authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    issuer: str | None = None
    jwks_uri: str | None = None
    end_session_endpoint: str | None = None

    @classmethod
    def from_discovery_document(cls, body: bytes, *, issuer: str) -> ProviderMetadata:
        """Parse ``/.well-known/openid-configuration`` (or RFC 8414's
        ``/.well-known/oauth-authorization-server``) and check it names ``issuer``."""
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
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
            jwks_uri=url("jwks_uri"),
            end_session_endpoint=url("end_session_endpoint"),
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


def new_authorization_request(
    authorization_endpoint: str,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str,
    state: str | None = None,
    nonce: str | None = None,
    prompt: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> AuthorizationRequest:
    """A new login: a fresh PKCE verifier, ``state`` (unless given) and, for ``openid``,
    ``nonce`` (unless given), and the URL that carries them.

    OIDC Core §11: ``offline_access`` is ignored by conforming providers unless the user is
    asked for consent, so ``prompt="consent"`` is added when it is requested.
    """
    scopes = scope.split()
    if prompt is None and "offline_access" in scopes:
        prompt = "consent"
    verifier = token_urlsafe(48)  # RFC 7636 §4.1: 43 to 128 characters (64 here)
    state = state or token_urlsafe(24)
    nonce = nonce or (token_urlsafe(24) if "openid" in scopes else None)
    url = build_authorization_url(
        authorization_endpoint,
        client_id=client_id,
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


def request_secrets(request: TokenRequest, client_secret: str | None) -> list[str]:
    """What an answer to ``request`` must not echo: its secret form fields, the client secret,
    and the Basic credentials (the secret, base64-encoded)."""
    found = [v for k, v in request.form.items() if k in _SECRET_FIELDS]
    if client_secret:
        found.append(client_secret)
    authorization = request.headers.get("Authorization", "")
    if authorization.startswith("Basic "):
        found.append(authorization.removeprefix("Basic "))
    return found


def retry_after_seconds(value: str | None, *, now: float) -> float | None:
    """Parse ``Retry-After`` (delta-seconds or HTTP-date, RFC 9110 §10.2.3) into seconds in
    ``[0, MAX_RETRY_AFTER]``; ``None`` for anything else. Total: no input raises."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return MAX_RETRY_AFTER if len(value) > 9 else min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
        seconds = when.timestamp() - now
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced, bounded in length: a provider may echo the refresh
    token or the client secret in ``error_description``."""
    for secret in secrets:
        if len(secret) >= 4:  # shorter strings are not secrets worth hiding, only noise
            text = text.replace(secret, "[redacted]")
    return text[:_MAX_DESCRIPTION]


def raise_for_token_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    secrets: Iterable[str] = (),
) -> None:
    """Raise the right error for a non-2xx token or revocation endpoint response.

    Only the terminal codes raise :class:`TokenEndpointError`; every other answer (5xx, 429,
    3xx, 404, a non-JSON body, ``invalid_request``, ``invalid_scope``...) raises
    :class:`RefreshUnavailable` via :func:`classify_token_error`. ``secrets`` are redacted
    from what the provider echoes.
    """
    if 200 <= status < 300:
        return
    classify_token_error(token_error(status, headers, body, now=now, secrets=secrets))


def token_error(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    secrets: Iterable[str] = (),
) -> TokenEndpointError:
    """What a non-2xx token or revocation endpoint response says, unclassified: its OAuth
    ``error`` (``invalid_response`` when the body carries none), description and URI
    (``secrets`` redacted) and ``Retry-After``.

    The ``error`` field decides, not the status: Auth0 answers ``invalid_grant`` with 403,
    oidc-provider with 400, and ``invalid_client`` may come as 401.
    """
    error, description, uri = "invalid_response", None, None
    secrets = list(secrets)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, digits or nesting too deep
        payload = None
    if isinstance(payload, Mapping):
        code = payload.get("error")
        # A code that echoes a secret is no code: it would reach error texts unredacted.
        if isinstance(code, str) and _ERROR_CODE.fullmatch(code) and redact(code, secrets) == code:
            error = code
            description = payload.get("error_description")
            uri = payload.get("error_uri")
    return TokenEndpointError(
        error,
        status=status,
        error_description=redact(description, secrets) if isinstance(description, str) else None,
        error_uri=redact(uri, secrets) if isinstance(uri, str) else None,
        retry_after=retry_after_seconds(headers.get("retry-after"), now=now),
    )


def classify_token_error(error: TokenEndpointError) -> NoReturn:
    """Raise ``error`` if it is terminal (this grant or this client will never work again),
    else :class:`RefreshUnavailable`: the provider is unavailable or misbehaving, the session
    is kept, and a retry after ``Retry-After`` may succeed."""
    if error.error in TERMINAL_ERRORS:
        raise error
    retry_after = DEFAULT_RETRY_AFTER if error.retry_after is None else error.retry_after
    detail = error.error if error.status is None else f"HTTP {error.status} {error.error}"
    if error.status is not None and 200 <= error.status < 300 and error.error_description:
        detail += f": {error.error_description}"  # a malformed success: our words, not theirs
    raise RefreshUnavailable("provider_error", retry_after=retry_after, detail=detail) from error
