"""What the fake provider has issued, and its rules for issuing more.

Clients, authorization codes, grants (token families) and the refresh and access tokens hanging
off them, with the policies that matter in a refresh storm: rotation, Okta-style reuse grace,
Keycloak-style reuse counts and revoking a whole family on reuse. Also the provider sessions
that logins open and logouts end, and the ID tokens, signed by :mod:`._keys`; a code's PKCE
check is :mod:`._pkce`. No I/O here: the endpoints hold ``_lock`` around every call and turn a
``Reject`` into an answer.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._clock import Clock
from ._http import Reject, authenticate_client
from ._pkce import check_code_verifier

if TYPE_CHECKING:
    from ._keys import KeyRing

ID_TOKEN_ALGORITHMS = ("RS256", "ES256")
#: How providers answer ``invalid_grant`` to a dead refresh token: RFC 6749 §5.2 says 400
#: (node oidc-provider does); Auth0 sends 403; some gateways 401.
DEAD_TOKEN_STATUSES = (400, 401, 403)


@dataclass(eq=False)
class _Grant:
    """One authorization (a token family): every refresh and access token hangs off it."""

    client_id: str
    subject: str
    scope: str
    nonce: str | None = None
    refresh_token: str | None = None  # the current one
    active: bool = True
    sid: str = ""  # the provider session the login opened
    auth_time: int = 0  # when the user logged in (OIDC Core §2)


@dataclass(eq=False)
class _RefreshRecord:
    grant: _Grant
    consumed_at: float | None = None  # monotonic time of rotation
    reuses: int = 0


@dataclass(eq=False)
class _AccessRecord:
    grant: _Grant
    expires_at: float
    revoked: bool = False


@dataclass(eq=False)
class Code:
    client_id: str
    redirect_uri: str
    subject: str
    scope: str
    nonce: str | None
    challenge: str | None
    expires_at: float
    sid: str
    auth_time: int
    grant: _Grant | None = None  # set once exchanged


class TokenIssuer:
    """The token side of :class:`~asgi_token_refresh.testing.FakeIdP`: its records and rules.

    The public members are FakeIdP's questions about grants and take ``_lock``; the private
    methods expect it to be held.
    """

    def __init__(
        self,
        *,
        issuer: str | None,
        clock: Clock,
        clients: dict[str, str | None],
        access_token_lifetime: float,
        rotate_refresh_tokens: bool,
        reuse_grace: float,
        reuse_count: int,
        revoke_on_reuse: bool,
        id_token_alg: str,
        dead_token_status: int = 400,
    ) -> None:
        if id_token_alg not in ID_TOKEN_ALGORITHMS:
            raise ValueError(f"id_token_alg must be one of {ID_TOKEN_ALGORITHMS}")
        if dead_token_status not in DEAD_TOKEN_STATUSES:
            raise ValueError(f"dead_token_status must be one of {DEAD_TOKEN_STATUSES}")
        self._last_issuer = issuer  # what ID tokens name; FakeIdP learns it from requests
        self.clock = clock
        self._clients = clients
        self.access_token_lifetime = access_token_lifetime
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.reuse_grace = reuse_grace
        self.reuse_count = reuse_count
        self.revoke_on_reuse = revoke_on_reuse
        self.dead_token_status = dead_token_status

        # Guards the records below, _last_issuer, and FakeIdP's counters, faults and gate.
        self._lock = threading.Lock()
        self._codes: dict[str, Code] = {}
        self._refresh: dict[str, _RefreshRecord] = {}
        self._access: dict[str, _AccessRecord] = {}
        self._grants_revoked = 0
        self._sessions: set[str] = set()  # sids of open provider sessions
        self._sessions_ended = 0
        self._id_token_alg = id_token_alg
        self._keys: KeyRing | None = None  # see _signing_keys()
        self._tampers: deque[str] = deque()

    # -- the test-facing API about grants, sessions and keys (the rest is on FakeIdP) ---------

    @property
    def grants_revoked(self) -> int:
        """Grants revoked by reuse detection or by ``/revoke``."""
        with self._lock:
            return self._grants_revoked

    def is_grant_active(self, refresh_token: str) -> bool:
        """Whether the grant this refresh token belongs to is still alive."""
        with self._lock:
            record = self._refresh.get(refresh_token)
            return record is not None and record.grant.active

    def issue(
        self,
        subject: str = "alice",
        *,
        client_id: str = "app",
        scope: str = "openid offline_access",
    ) -> dict[str, Any]:
        """Create a grant without the browser flow; returns the token-endpoint response body.

        It is not counted as a token call. A refresh token comes only with ``offline_access``.
        """
        if client_id not in self._clients:
            raise ValueError(f"unknown client_id {client_id!r}")
        with self._lock:
            grant = _Grant(client_id, subject, " ".join(scope.split()))
            grant.sid, grant.auth_time = self._open_session(), int(self.clock.time())
            return self._grant_tokens(grant)

    @property
    def sessions_ended(self) -> int:
        """Provider sessions ended at the ``end_session_endpoint``.

        Each login, and each :meth:`issue`, opens one; its ID tokens carry its ``sid``.
        """
        with self._lock:
            return self._sessions_ended

    def rotate_signing_key(self, alg: str | None = None, *, drop_old: bool = False) -> str:
        """Sign ID tokens with a new key from now on; returns its ``kid``.

        ``alg`` (``"RS256"`` or ``"ES256"``) defaults to the current one. The old public keys
        stay in the JWKS, so tokens signed before still verify, unless ``drop_old``.
        """
        if alg is not None and alg not in ID_TOKEN_ALGORITHMS:
            raise ValueError(f"alg must be one of {ID_TOKEN_ALGORITHMS}")
        with self._lock:
            return self._signing_keys().rotate(alg, drop_old=drop_old)

    def tamper_next_id_token(self, kind: str) -> None:
        """Spoil the ID token of the next successful code exchange; calls queue up.

        Each kind breaks one check a relying party must make: ``"bad_signature"``,
        ``"unknown_kid"`` (signed by a key the JWKS never had), ``"wrong_issuer"``,
        ``"wrong_audience"``, ``"expired"`` (an hour ago), ``"nonce_mismatch"``, ``"alg_none"``
        (unsigned), ``"hs256_with_public_key"`` (HMAC keyed with the public key's PEM: the
        key-confusion attack) and ``"missing_exp"``. The rest of the answer is unchanged.
        """
        from ._keys import check_tamper_kind

        check_tamper_kind(kind)
        with self._lock:
            self._tampers.append(kind)

    # -- the token endpoint's rules -----------------------------------------------------------

    def _token(
        self, form: Mapping[str, str], headers: Mapping[str, str]
    ) -> tuple[dict[str, Any], str]:
        """The success body and outcome of a token request, or raise :class:`Reject`."""
        client_id = authenticate_client(self._clients, form, headers)
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return self._exchange_code(client_id, form), "success"
        if grant_type == "refresh_token":
            return self._refresh_grant(client_id, form)
        if grant_type == "client_credentials":
            return self._client_credentials(client_id, form), "success"
        if grant_type is None:
            raise Reject("invalid_request", "grant_type is missing")
        raise Reject("unsupported_grant_type", "grant_type is not supported")

    def _exchange_code(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        code = self._codes.get(form.get("code", ""))
        if code is None or code.client_id != client_id or code.expires_at <= self.clock.time():
            raise Reject("invalid_grant", "unknown or expired authorization code")
        if code.grant is not None:
            # RFC 6749 §4.1.2: a replayed code should revoke what it already produced.
            if self.revoke_on_reuse and code.grant.active:
                self._revoke_grant(code.grant)
                raise Reject("invalid_grant", "code already used", outcome="reuse_revoked")
            raise Reject("invalid_grant", "code already used")
        if form.get("redirect_uri") != code.redirect_uri:
            raise Reject("invalid_grant", "redirect_uri does not match")
        check_code_verifier(code.challenge, form.get("code_verifier"))
        code.grant = _Grant(
            client_id, code.subject, code.scope, code.nonce, sid=code.sid, auth_time=code.auth_time
        )
        return self._grant_tokens(code.grant, login=True)

    def _refresh_grant(self, client_id: str, form: Mapping[str, str]) -> tuple[dict[str, Any], str]:
        record = self._refresh.get(form.get("refresh_token", ""))
        if record is None or record.grant.client_id != client_id or not record.grant.active:
            raise self._dead("refresh token is invalid, expired or revoked")
        grant = record.grant
        scope = grant.scope
        if "scope" in form:
            requested = form["scope"].split()
            if not set(requested) <= set(grant.scope.split()):
                raise Reject("invalid_scope", "scope exceeds the grant")
            scope = " ".join(requested)
        if not self.rotate_refresh_tokens:
            return self._tokens(grant, scope, refresh_token=None), "success"

        now = self.clock.monotonic()
        if record.consumed_at is None:
            record.consumed_at = now
            grant.refresh_token = self._new_refresh_token(grant)
            return self._tokens(grant, scope, refresh_token=grant.refresh_token), "success"
        # A reused token: Okta-style grace first, then Keycloak-style count. Either way the
        # client gets the grant's current refresh token, so the family stays a single chain.
        in_grace = now - record.consumed_at < self.reuse_grace
        if in_grace or record.reuses < self.reuse_count:
            record.reuses += 0 if in_grace else 1
            body = self._tokens(grant, scope, refresh_token=grant.refresh_token)
            return body, "reuse_allowed"
        if self.revoke_on_reuse:
            self._revoke_grant(grant)
            raise self._dead("refresh token reused", outcome="reuse_revoked")
        raise self._dead("refresh token already used")

    def _dead(self, description: str, *, outcome: str = "") -> Reject:
        """``invalid_grant`` for a refresh token, with the provider's status for it."""
        return Reject("invalid_grant", description, status=self.dead_token_status, outcome=outcome)

    def _client_credentials(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        if self._clients[client_id] is None:
            raise Reject("unauthorized_client", "public clients cannot use client_credentials")
        # A grant of its own, with the client as subject, so /revoke and /userinfo just work.
        grant = _Grant(client_id, client_id, " ".join(form.get("scope", "").split()))
        return self._tokens(grant, grant.scope, refresh_token=None)

    def _grant_tokens(self, grant: _Grant, *, login: bool = False) -> dict[str, Any]:
        """First tokens of a new grant; a refresh token only with offline_access."""
        if "offline_access" in grant.scope.split():
            grant.refresh_token = self._new_refresh_token(grant)
        return self._tokens(grant, grant.scope, refresh_token=grant.refresh_token, login=login)

    def _tokens(
        self, grant: _Grant, scope: str, *, refresh_token: str | None, login: bool = False
    ) -> dict[str, Any]:
        access_token = "at_" + secrets.token_urlsafe(24)
        expires_at = self.clock.time() + self.access_token_lifetime
        self._access[access_token] = _AccessRecord(grant, expires_at)
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": _number(self.access_token_lifetime),
        }
        if scope:
            body["scope"] = scope
        if refresh_token is not None:
            body["refresh_token"] = refresh_token
        if "openid" in scope.split():
            body["id_token"] = self._id_token(grant, login=login)
        return body

    def _new_refresh_token(self, grant: _Grant) -> str:
        token = "rt_" + secrets.token_urlsafe(32)
        self._refresh[token] = _RefreshRecord(grant)
        return token

    def _id_token(self, grant: _Grant, *, login: bool) -> str:
        now = int(self.clock.time())
        claims: dict[str, Any] = {
            "iss": self._last_issuer or "http://localhost",
            "sub": grant.subject,
            "aud": grant.client_id,
            "azp": grant.client_id,
            "iat": now,
            "exp": now + int(self.access_token_lifetime),
            "auth_time": grant.auth_time,
            "sid": grant.sid,
        }
        # OIDC Core §12.2: a refreshed ID token keeps iss, sub, aud and auth_time, not the nonce.
        if login and grant.nonce is not None:
            claims["nonce"] = grant.nonce
        tamper = self._tampers.popleft() if login and self._tampers else None
        return self._signing_keys().sign(claims, tamper)

    def _signing_keys(self) -> KeyRing:
        if self._keys is None:
            try:
                from ._keys import KeyRing
            except ImportError as exc:  # pragma: no cover - the oidc extra is missing
                raise ImportError(
                    "FakeIdP signs ID tokens with cryptography and PyJWT: "
                    "pip install 'asgi-token-refresh[oidc]'"
                ) from exc
            self._keys = KeyRing(self._id_token_alg)
        return self._keys

    def _open_session(self) -> str:
        sid = "sid-" + secrets.token_urlsafe(12)
        self._sessions.add(sid)
        return sid

    def _close_session(self, sid: str) -> None:
        if sid in self._sessions:
            self._sessions.discard(sid)
            self._sessions_ended += 1

    def _revoke_grant(self, grant: _Grant) -> None:
        if grant.active:
            grant.active = False
            self._grants_revoked += 1


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
