"""The fake provider's endpoints around ``/authorize`` and ``/token``.

OIDC discovery and RFC 8414 metadata, the JWK Set, ``/userinfo``, ``/revoke`` (RFC 7009) and
the ``end_session_endpoint`` (OIDC RP-Initiated Logout 1.0). :class:`ProviderEndpoints` is the
part of :class:`~asgi_token_refresh.testing.FakeIdP` that answers them from its records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from ._grants import ID_TOKEN_ALGORITHMS, TokenIssuer
from ._http import Reject, Response, authenticate_client, error_response, json_response, parse_form

_SCOPES_SUPPORTED = ["openid", "profile", "email", "offline_access"]
_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]
_CLAIMS_SUPPORTED = ["iss", "sub", "aud", "azp", "exp", "iat", "auth_time", "nonce", "sid"]
_CLAIMS_SUPPORTED += ["name", "email"]


class ProviderEndpoints(TokenIssuer):
    """Discovery, JWKS, userinfo, revocation and logout. Each takes ``_lock`` itself."""

    revocation_in_oauth_metadata_only: bool  # set by FakeIdP

    # -- metadata -----------------------------------------------------------------------------

    def _oauth_metadata(self, issuer: str) -> dict[str, Any]:
        """RFC 8414 authorization server metadata: always names the revocation endpoint."""
        return {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "jwks_uri": f"{issuer}/jwks",
            "revocation_endpoint": f"{issuer}/revoke",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": _AUTH_METHODS,
            "revocation_endpoint_auth_methods_supported": _AUTH_METHODS,
            "scopes_supported": _SCOPES_SUPPORTED,
        }

    def _discovery(self, issuer: str) -> dict[str, Any]:
        """OpenID Provider metadata (OIDC Discovery 1.0 §3)."""
        meta = self._oauth_metadata(issuer) | {
            "userinfo_endpoint": f"{issuer}/userinfo",
            "end_session_endpoint": f"{issuer}/logout",
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": list(ID_TOKEN_ALGORITHMS),
            "claims_supported": _CLAIMS_SUPPORTED,
        }
        if self.revocation_in_oauth_metadata_only:  # as several real providers do
            del meta["revocation_endpoint"], meta["revocation_endpoint_auth_methods_supported"]
        return meta

    def _jwks(self) -> Response:
        with self._lock:
            jwks = self._signing_keys().jwks()
        # Cacheable, as real JWKS are: a relying party must refetch on an unknown kid.
        headers = (("cache-control", "public, max-age=300"),)
        return Response(200, json.dumps(jwks).encode(), headers, "application/json")

    # -- /userinfo and /revoke ----------------------------------------------------------------

    def _userinfo(self, headers: Mapping[str, str]) -> Response:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        with self._lock:
            record = self._access.get(token.strip()) if scheme.lower() == "bearer" else None
            valid = (
                record is not None
                and not record.revoked
                and record.grant.active
                and self.clock.time() < record.expires_at
            )
        if record is None or not valid:
            challenge = ("www-authenticate", 'Bearer error="invalid_token"')
            body = {"error": "invalid_token", "error_description": "access token is not valid"}
            return json_response(401, body, challenge)
        sub = record.grant.subject
        return json_response(200, {"sub": sub, "name": sub.title(), "email": f"{sub}@example.com"})

    def _revoke(self, headers: Mapping[str, str], body: bytes) -> Response:
        form = parse_form(headers, body)
        with self._lock:
            try:
                if form is None:
                    raise Reject("invalid_request", "expected a form-encoded body")
                client_id = authenticate_client(self._clients, form, headers)
                token = form.get("token")
                if not token:
                    raise Reject("invalid_request", "token is missing")
            except Reject as reject:
                return error_response(reject)
            # RFC 7009 §2.2: unknown tokens, or other clients' tokens, still get a 200.
            refresh = self._refresh.get(token)
            access = self._access.get(token)
            if refresh is not None and refresh.grant.client_id == client_id:
                self._revoke_grant(refresh.grant)
            elif access is not None and access.grant.client_id == client_id:
                access.revoked = True
        return Response(200)

    # -- end_session_endpoint -----------------------------------------------------------------

    def _end_session(self, issuer: str, params: Mapping[str, str] | None) -> Response:
        """RP-Initiated Logout: end the hinted login's session, then redirect or say so.

        ``id_token_hint`` must be an ID token this provider signed (expired is fine) for a
        known client; ``client_id``, when sent too, must be its audience. A
        ``post_logout_redirect_uri`` needs one of the two to name the client, and must be an
        absolute http(s) URI (the fake registers no URIs per client). Refresh tokens outlive
        the session, as offline_access tokens do at real providers: ``/revoke`` ends those.
        """
        if params is None:
            return _logout_error("expected a query or a form-encoded body")
        hint, client_id = params.get("id_token_hint"), params.get("client_id")
        redirect_uri, state = params.get("post_logout_redirect_uri"), params.get("state")
        with self._lock:
            claims = None
            if hint is not None:
                claims = self._signing_keys().verify(hint, issuer=issuer)
                audience = claims.get("aud") if claims is not None else None
                if not isinstance(audience, str) or audience not in self._clients:
                    return _logout_error("id_token_hint is not an ID token this provider issued")
                if client_id is not None and client_id != audience:
                    return _logout_error("client_id is not the id_token_hint's audience")
            elif client_id is not None and client_id not in self._clients:
                return _logout_error("unknown client")
            if redirect_uri is not None:
                if claims is None and client_id is None:
                    return _logout_error(
                        "post_logout_redirect_uri needs id_token_hint or client_id"
                    )
                target = urlsplit(redirect_uri)
                if target.scheme not in ("http", "https") or not target.netloc:
                    return _logout_error("post_logout_redirect_uri is not registered")
            if claims is not None and isinstance(claims.get("sid"), str):
                self._close_session(claims["sid"])
        if redirect_uri is None:
            return Response(200, b"signed out", (("cache-control", "no-store"),))
        if state is not None:
            redirect_uri += ("&" if "?" in redirect_uri else "?") + urlencode({"state": state})
        return Response(302, headers=(("location", redirect_uri), ("cache-control", "no-store")))


def _logout_error(description: str) -> Response:
    return json_response(400, {"error": "invalid_request", "error_description": description})
