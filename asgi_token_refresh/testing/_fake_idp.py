"""The fake OAuth2/OIDC provider as an ASGI app: its test-facing API, routing, ``/authorize``
and ``/token`` (with scripted faults, the pause gate and latency).

What tokens exist and how they are issued, rotated and revoked lives in :mod:`._grants`, the
signing keys in :mod:`._keys`, and the other endpoints (metadata, JWKS, userinfo, revocation,
logout) in :mod:`._endpoints`; this module turns requests into calls on them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter, deque
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx

from .._clock import SYSTEM_CLOCK, Clock
from ._endpoints import ProviderEndpoints
from ._faults import Fault, Gate, fault_response
from ._grants import Code
from ._http import (
    Receive,
    Reject,
    Response,
    Scope,
    Send,
    error_response,
    json_response,
    lifespan,
    parse_form,
    read_body,
    send_response,
)

_OAUTH_METADATA = "/.well-known/oauth-authorization-server"
_ROUTES = {  # path under the issuer -> (endpoint name for calls(), allowed methods)
    "/.well-known/openid-configuration": ("discovery", ("GET",)),
    _OAUTH_METADATA: ("oauth_metadata", ("GET",)),
    "/authorize": ("authorize", ("GET",)),
    "/token": ("token", ("POST",)),
    "/userinfo": ("userinfo", ("GET", "POST")),
    "/revoke": ("revoke", ("POST",)),
    "/jwks": ("jwks", ("GET",)),
    "/logout": ("end_session", ("GET", "POST")),
}
_CODE_LIFETIME = 60.0  # seconds; RFC 6749 §4.1.2 asks for short-lived codes


class FakeIdP(ProviderEndpoints):
    """An in-memory OAuth2/OIDC provider, as an ASGI app (asyncio). Thread-safe.

    A token request is counted, takes the next scripted fault, parks at the gate if one is
    set, then is answered. A reused refresh token within ``reuse_grace`` seconds (or the first
    ``reuse_count`` times) gets the grant's current refresh token; beyond that it is
    ``invalid_grant`` and, with ``revoke_on_reuse``, the whole grant dies. A replayed
    authorization code is treated the same way (RFC 6749 §4.1.2). A dead refresh token (reused,
    revoked, unknown) is answered ``invalid_grant`` with ``dead_token_status``: 400 as RFC 6749
    §5.2 says, or 403 as Auth0 answers, or 401.

    ID tokens (with ``openid`` in the scope, at login and on every refresh) are signed with a
    real ``id_token_alg`` key (``"RS256"`` or ``"ES256"``, needs the ``oidc`` extra) whose
    ``kid`` is in the JWK Set at ``{issuer}/jwks``. Claims: ``iss``, ``sub``, ``aud`` and
    ``azp`` (the client_id), ``iat``, ``exp`` (``iat + access_token_lifetime``, by ``clock``),
    ``auth_time``, ``sid`` and, at login only, the authorization request's ``nonce``. See
    :meth:`rotate_signing_key` and :meth:`tamper_next_id_token`. Each login opens a provider
    session that ``{issuer}/logout`` (the ``end_session_endpoint``) ends.

    Metadata is served as OIDC discovery and as RFC 8414 authorization server metadata, the
    latter both at ``/.well-known/oauth-authorization-server{issuer path}`` (RFC 8414 §3.1) and
    under the issuer's path; ``revocation_in_oauth_metadata_only`` leaves the revocation
    endpoint out of OIDC discovery, as several real providers do.

    ``close()`` releases parked requests and answers hung ones 503 ``temporarily_unavailable``
    (to a client that already gave up, that answer is simply lost); later ``Fault.hang`` faults
    answer that 503 at once. The IdP keeps serving otherwise.
    """

    def __init__(
        self,
        *,
        issuer: str | None = "https://idp.test",
        clock: Clock | None = None,
        clients: Mapping[str, str | None] | None = None,
        subject: str = "alice",
        access_token_lifetime: float = 300.0,
        rotate_refresh_tokens: bool = True,
        reuse_grace: float = 0.0,
        reuse_count: int = 0,
        revoke_on_reuse: bool = True,
        offline_access_requires_consent: bool = True,
        latency: float = 0.0,
        id_token_alg: str = "RS256",
        revocation_in_oauth_metadata_only: bool = False,
        dead_token_status: int = 400,
    ) -> None:
        self._issuer = issuer.rstrip("/") if issuer is not None else None
        super().__init__(
            issuer=self._issuer,
            clock=clock if clock is not None else SYSTEM_CLOCK,
            clients=dict(clients if clients is not None else {"app": "app-secret"}),
            access_token_lifetime=access_token_lifetime,
            rotate_refresh_tokens=rotate_refresh_tokens,
            reuse_grace=reuse_grace,
            reuse_count=reuse_count,
            revoke_on_reuse=revoke_on_reuse,
            id_token_alg=id_token_alg,
            dead_token_status=dead_token_status,
        )
        self.revocation_in_oauth_metadata_only = revocation_in_oauth_metadata_only
        self.subject = subject
        self.offline_access_requires_consent = offline_access_requires_consent
        self.latency = latency

        self._faults: deque[Fault] = deque()
        self._gate: Gate | None = None
        self._hang_gate = Gate()  # hung requests park here until close()
        self._calls: Counter[str] = Counter()
        self._token_arrivals: Counter[str] = Counter()
        self._token_outcomes: Counter[tuple[str, str]] = Counter()

    # -- the test-facing API (the part about grants, sessions and keys is in _grants) ----------

    @property
    def issuer(self) -> str | None:
        """The configured issuer, or with ``issuer=None`` the one last seen on a request."""
        with self._lock:
            return self._last_issuer

    def transport(self) -> httpx.ASGITransport:
        """An httpx transport into this app; use it with ``base_url=issuer``."""
        return httpx.ASGITransport(app=self)

    def script(self, *faults: Fault) -> None:
        """Queue faults; each token request consumes the oldest one."""
        with self._lock:
            self._faults.extend(faults)

    def pause_token_endpoint(self) -> Gate:
        """Park every token request (after counting it) until the returned gate is released.

        A previous gate is released.
        """
        gate = Gate()
        with self._lock:
            previous, self._gate = self._gate, gate
        if previous is not None:
            previous.release()
        return gate

    def close(self) -> None:
        """Release every parked and hung request. Idempotent."""
        with self._lock:
            gate = self._gate
        self._hang_gate.release()
        if gate is not None:
            gate.release()

    def token_calls(self, grant_type: str | None = None, outcome: str | None = None) -> int:
        """Token requests so far, by grant type and/or outcome (e.g. ``"fault:hang"``).

        Without ``outcome`` a request counts on arrival; with it, once it has been decided.
        """
        with self._lock:
            if outcome is None:
                if grant_type is None:
                    return self._calls["token"]
                return self._token_arrivals[grant_type]
            return sum(
                n
                for (g, o), n in self._token_outcomes.items()
                if o == outcome and grant_type in (None, g)
            )

    def calls(self, endpoint: str) -> int:
        """Requests to an endpoint, by name.

        ``discovery``, ``oauth_metadata`` (RFC 8414), ``jwks``, ``authorize``, ``token``,
        ``userinfo``, ``revoke`` or ``end_session``.
        """
        with self._lock:
            return self._calls[endpoint]

    def __repr__(self) -> str:
        with self._lock:
            grants = {id(r.grant): r.grant for r in self._refresh.values()}
            active = sum(g.active for g in grants.values())
            return (
                f"FakeIdP(issuer={self._last_issuer!r}, clients={sorted(self._clients)!r}, "
                f"active_grants={active}, grants_revoked={self._grants_revoked})"
            )

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        issuer = self._issuer_for(scope)
        path: str = scope["path"]
        prefix = urlsplit(issuer).path
        if prefix and path == _OAUTH_METADATA + prefix:  # RFC 8414 §3.1: the issuer path last
            route: str | None = _OAUTH_METADATA
        else:
            route = path[len(prefix) :] if path.startswith(prefix) else None
        method: str = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = await read_body(receive)

        endpoint, methods = _ROUTES.get(route or "", ("", ()))
        if not endpoint:
            response = json_response(404, {"error": "not_found"})
        elif method not in methods:
            response = Response(405, headers=(("allow", ", ".join(methods)),))
        elif endpoint == "token":
            response = await self._token_endpoint(headers, body)
        else:
            with self._lock:
                self._calls[endpoint] += 1
            query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
            if endpoint == "discovery":
                response = json_response(200, self._discovery(issuer))
            elif endpoint == "oauth_metadata":
                response = json_response(200, self._oauth_metadata(issuer))
            elif endpoint == "jwks":
                response = self._jwks()
            elif endpoint == "authorize":
                response = self._authorize(query)
            elif endpoint == "userinfo":
                response = self._userinfo(headers)
            elif endpoint == "end_session":
                params = query if method == "GET" else parse_form(headers, body)
                response = self._end_session(issuer, params)
            else:
                response = self._revoke(headers, body)
        await send_response(send, response)

    def _issuer_for(self, scope: Scope) -> str:
        if self._issuer is not None:
            return self._issuer
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if host is None:
            server_host, port = scope.get("server") or ("localhost", 80)
            host = f"{server_host}:{port}"
        issuer = f"{scope.get('scheme', 'http')}://{host}"
        with self._lock:
            self._last_issuer = issuer
        return issuer

    # -- /authorize ---------------------------------------------------------------------------

    def _authorize(self, query: dict[str, str]) -> Response:
        client_id = query.get("client_id", "")
        redirect_uri = query.get("redirect_uri", "")
        # RFC 6749 §4.1.2.1: never redirect to a URI we cannot trust; tell the browser instead.
        if client_id not in self._clients:
            return json_response(
                400, {"error": "invalid_request", "error_description": "unknown client"}
            )
        if urlsplit(redirect_uri).scheme not in ("http", "https"):
            return json_response(
                400, {"error": "invalid_request", "error_description": "bad redirect_uri"}
            )
        state = query.get("state")

        def redirect(params: dict[str, str]) -> Response:
            if state is not None:
                params["state"] = state
            sep = "&" if "?" in redirect_uri else "?"
            location = redirect_uri + sep + urlencode(params)
            return Response(302, headers=(("location", location), ("cache-control", "no-store")))

        challenge = query.get("code_challenge")
        method = query.get("code_challenge_method")
        problem = None
        if query.get("response_type") != "code":
            problem = ("unsupported_response_type", "only response_type=code is supported")
        elif challenge is None and self._clients[client_id] is None:
            problem = ("invalid_request", "public clients must use PKCE (S256)")
        elif challenge is not None and method != "S256":
            problem = ("invalid_request", "code_challenge_method must be S256")
        if problem is not None:
            return redirect({"error": problem[0], "error_description": problem[1]})

        scopes = query.get("scope", "").split()
        consented = "consent" in query.get("prompt", "").split()
        if self.offline_access_requires_consent and not consented:
            # OIDC Core §11: offline_access is ignored unless the user was asked for consent.
            scopes = [s for s in scopes if s != "offline_access"]
        code = "code_" + secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = Code(
                client_id=client_id,
                redirect_uri=redirect_uri,
                subject=query.get("login_hint") or self.subject,
                scope=" ".join(scopes),
                nonce=query.get("nonce"),
                challenge=challenge,
                expires_at=self.clock.time() + _CODE_LIFETIME,
                sid=self._open_session(),
                auth_time=int(self.clock.time()),
            )
        return redirect({"code": code})

    # -- /token -------------------------------------------------------------------------------

    async def _token_endpoint(self, headers: dict[str, str], body: bytes) -> Response:
        form = parse_form(headers, body)
        grant_type = form.get("grant_type", "") if form is not None else ""
        with self._lock:
            self._calls["token"] += 1
            self._token_arrivals[grant_type] += 1
            fault = self._faults.popleft() if self._faults else None
            gate = self._gate
        if gate is not None:
            await gate._park()
        # Always at least one suspension, as over a network: an in-process provider that
        # answered without yielding would serialise concurrent callers and hide every storm.
        await asyncio.sleep(self.latency)

        if fault is not None and fault.name != "hang_after_consuming":
            response, outcome = fault_response(fault), f"fault:{fault.name}"
        else:
            with self._lock:
                try:
                    if form is None:
                        raise Reject("invalid_request", "expected a form-encoded body")
                    answer, outcome = self._token(form, headers)
                    response = json_response(200, answer)
                except Reject as reject:
                    response, outcome = error_response(reject), reject.outcome
            if fault is not None:
                outcome = "fault:hang_after_consuming"
        with self._lock:
            self._token_outcomes[grant_type, outcome] += 1
        if fault is not None and fault.name.startswith("hang"):
            await self._hang_gate._park()
            return error_response(
                Reject("temporarily_unavailable", "the IdP was closed", status=503)
            )
        return response
