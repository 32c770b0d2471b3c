"""Test helpers: a movable clock, a fake OAuth2/OIDC provider and a loopback server.

:class:`FakeIdP` is a plain ASGI app that behaves like a real provider where it matters for
refresh storms: rotating refresh tokens, reuse detection that revokes the whole token family,
Okta-style grace periods and Keycloak-style reuse counts, scripted failures (:class:`Fault`) and
a gate that parks token requests so tests can line up concurrency without sleeping.

Use it in-process through :meth:`FakeIdP.transport`, or over real sockets with :func:`serve`.
Only the standard library and httpx are needed; :func:`serve` also needs uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit

import httpx

from ._clock import SYSTEM_CLOCK, Clock

__all__ = [
    "CapturedTelemetry",
    "FakeClock",
    "FakeIdP",
    "Fault",
    "Gate",
    "capture_telemetry",
    "serve",
]

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_SCOPES_SUPPORTED = ["openid", "profile", "email", "offline_access"]
_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]
_ROUTES = {  # path under the issuer -> (endpoint name for calls(), allowed methods)
    "/.well-known/openid-configuration": ("discovery", ("GET",)),
    "/authorize": ("authorize", ("GET",)),
    "/token": ("token", ("POST",)),
    "/userinfo": ("userinfo", ("GET", "POST")),
    "/revoke": ("revoke", ("POST",)),
}
_CODE_LIFETIME = 60.0  # seconds; RFC 6749 §4.1.2 asks for short-lived codes


class FakeClock:
    """A :class:`~asgi_token_refresh._clock.Clock` that only moves when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._time = start
        self._monotonic = 1000.0

    def time(self) -> float:
        """Wall-clock seconds since the epoch."""
        with self._lock:
            return self._time

    def monotonic(self) -> float:
        """Monotonic seconds; moves together with :meth:`time`."""
        with self._lock:
            return self._monotonic

    def advance(self, seconds: float) -> None:
        """Move both readings forward; time never goes backwards."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._time += seconds
            self._monotonic += seconds

    def __repr__(self) -> str:
        return f"FakeClock(time={self.time()!r})"


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted misbehaviour of the token endpoint; build it with the class methods."""

    name: str
    status: int = 500
    retry_after: int | None = None

    @classmethod
    def server_error(cls, status: int = 500) -> Fault:
        """A 5xx with a plain-text body, as a crashing gateway sends."""
        if not 500 <= status <= 599:
            raise ValueError("server_error status must be 5xx")
        return cls("server_error", status)

    @classmethod
    def unavailable(cls, retry_after: int = 7) -> Fault:
        """503 with ``Retry-After``."""
        return cls("unavailable", 503, retry_after)

    @classmethod
    def rate_limited(cls, retry_after: int = 3) -> Fault:
        """429 with ``Retry-After``."""
        return cls("rate_limited", 429, retry_after)

    @classmethod
    def hang(cls) -> Fault:
        """Never answer (until :meth:`FakeIdP.close`); the refresh token is left untouched."""
        return cls("hang", 503)

    @classmethod
    def hang_after_consuming(cls) -> Fault:
        """Process the request (rotating the refresh token), then never answer: a lost response."""
        return cls("hang_after_consuming", 503)

    @classmethod
    def malformed(cls) -> Fault:
        """200 whose body is not JSON although it claims to be."""
        return cls("malformed", 200)

    @classmethod
    def invalid_grant(cls, status: int = 400) -> Fault:
        """``invalid_grant`` with status 400, or 403 as Auth0 sends it."""
        if status not in (400, 403):
            raise ValueError("invalid_grant status must be 400 or 403")
        return cls("invalid_grant", status)

    @classmethod
    def invalid_client(cls) -> Fault:
        """401 ``invalid_client``."""
        return cls("invalid_client", 401)


_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


def _wake(waiters: list[_Waiter]) -> None:
    # The waiter's loop may belong to another thread: futures are not thread-safe, so the
    # result is set from inside that loop.
    for loop, future in waiters:
        with contextlib.suppress(RuntimeError):  # that loop is closed; nobody is waiting
            loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Gate:
    """Parks token requests until :meth:`release`; see :meth:`FakeIdP.pause_token_endpoint`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._released = False
        self._arrivals = 0
        self._parked: list[_Waiter] = []
        self._watchers: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def released(self) -> bool:
        with self._cond:
            return self._released

    def release(self) -> None:
        """Let every parked request (and every later one) through. Callable from any thread."""
        with self._cond:
            self._released = True
            parked, self._parked = self._parked, []
        _wake(parked)

    def wait_arrived(self, n: int, timeout: float = 5.0) -> None:
        """Block this thread until ``n`` requests have been parked, else ``TimeoutError``.

        Never call it on the thread whose event loop runs the IdP: use :meth:`arrived` there.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._arrivals >= n, timeout):
                raise TimeoutError(f"{self._arrivals} of {n} token requests arrived")

    async def arrived(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Async form of :meth:`wait_arrived`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        watcher = (n, loop, future)
        with self._cond:
            if self._arrivals >= n:
                return
            self._watchers.append(watcher)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            with self._cond:
                arrivals = self._arrivals
            raise TimeoutError(f"{arrivals} of {n} token requests arrived") from None
        finally:
            with self._cond:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)

    async def _park(self) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._released:
                return
            self._arrivals += 1
            self._parked.append((loop, future))
            self._cond.notify_all()
            ready = [(lp, f) for n, lp, f in self._watchers if self._arrivals >= n]
        _wake(ready)
        await future

    def __repr__(self) -> str:
        return f"Gate(arrivals={self._arrivals}, released={self.released})"


class _Reject(Exception):
    """An OAuth error answer (RFC 6749 §5.2), raised while handling a request."""

    def __init__(
        self, error: str, description: str, *, status: int = 400, outcome: str = ""
    ) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status
        self.outcome = outcome or error


def _invalid_client() -> _Reject:
    return _Reject("invalid_client", "client authentication failed", status=401)


@dataclass(eq=False)
class _Grant:
    """One authorization (a token family): every refresh and access token hangs off it."""

    client_id: str
    subject: str
    scope: str
    nonce: str | None = None
    refresh_token: str | None = None  # the current one
    active: bool = True


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
class _Code:
    client_id: str
    redirect_uri: str
    subject: str
    scope: str
    nonce: str | None
    challenge: str | None
    expires_at: float
    grant: _Grant | None = None  # set once exchanged


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "text/plain"


def _json(status: int, payload: Mapping[str, Any], *headers: tuple[str, str]) -> _Response:
    # RFC 6749 §5.1: token answers must not be cached; harmless on the other endpoints.
    headers = (("cache-control", "no-store"), ("pragma", "no-cache"), *headers)
    return _Response(status, json.dumps(payload).encode(), headers, "application/json")


def _error(reject: _Reject) -> _Response:
    extra = [("www-authenticate", 'Basic realm="fake-idp"')] if reject.status == 401 else []
    body = {"error": reject.error, "error_description": reject.description}
    return _json(reject.status, body, *extra)


class FakeIdP:
    """An in-memory OAuth2/OIDC provider, as an ASGI app (asyncio). Thread-safe.

    A token request is counted, takes the next scripted fault, parks at the gate if one is
    set, then is answered. A reused refresh token within ``reuse_grace`` seconds (or the first
    ``reuse_count`` times) gets the grant's current refresh token; beyond that it is
    ``invalid_grant`` and, with ``revoke_on_reuse``, the whole grant dies. A replayed
    authorization code is treated the same way (RFC 6749 §4.1.2).

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
    ) -> None:
        self._issuer = issuer.rstrip("/") if issuer is not None else None
        self._last_issuer = self._issuer
        self.clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        self._clients = dict(clients if clients is not None else {"app": "app-secret"})
        self.subject = subject
        self.access_token_lifetime = access_token_lifetime
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.reuse_grace = reuse_grace
        self.reuse_count = reuse_count
        self.revoke_on_reuse = revoke_on_reuse
        self.offline_access_requires_consent = offline_access_requires_consent
        self.latency = latency

        self._lock = threading.Lock()
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _RefreshRecord] = {}
        self._access: dict[str, _AccessRecord] = {}
        self._faults: deque[Fault] = deque()
        self._gate: Gate | None = None
        self._hang_gate = Gate()  # hung requests park here until close()
        self._calls: Counter[str] = Counter()
        self._token_arrivals: Counter[str] = Counter()
        self._token_outcomes: Counter[tuple[str, str]] = Counter()
        self._grants_revoked = 0

    # -- the test-facing API ------------------------------------------------------------------

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
        """Requests to ``discovery``, ``authorize``, ``token``, ``userinfo`` or ``revoke``."""
        with self._lock:
            return self._calls[endpoint]

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
            return self._grant_tokens(grant)

    def __repr__(self) -> str:
        with self._lock:
            grants = {id(r.grant): r.grant for r in self._refresh.values()}
            active = sum(g.active for g in grants.values())
            return (
                f"FakeIdP(issuer={self._last_issuer!r}, clients={sorted(self._clients)!r}, "
                f"active_grants={active}, grants_revoked={self._grants_revoked})"
            )

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        issuer = self._issuer_for(scope)
        path: str = scope["path"]
        prefix = urlsplit(issuer).path
        route = path[len(prefix) :] if path.startswith(prefix) else None
        method: str = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = await _read_body(receive)

        endpoint, methods = _ROUTES.get(route or "", ("", ()))
        if not endpoint:
            response = _json(404, {"error": "not_found"})
        elif method not in methods:
            response = _Response(405, headers=(("allow", ", ".join(methods)),))
        elif endpoint == "token":
            response = await self._token_endpoint(headers, body)
        else:
            with self._lock:
                self._calls[endpoint] += 1
            if endpoint == "discovery":
                response = _json(200, self._discovery(issuer))
            elif endpoint == "authorize":
                query = scope["query_string"].decode("latin-1")
                response = self._authorize(dict(parse_qsl(query)))
            elif endpoint == "userinfo":
                response = self._userinfo(headers)
            else:
                response = self._revoke(headers, body)
        await _send_response(send, response)

    def _issuer_for(self, scope: _Scope) -> str:
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

    def _discovery(self, issuer: str) -> dict[str, Any]:
        return {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "userinfo_endpoint": f"{issuer}/userinfo",
            "revocation_endpoint": f"{issuer}/revoke",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["HS256", "none"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": _AUTH_METHODS,
            "revocation_endpoint_auth_methods_supported": _AUTH_METHODS,
            "scopes_supported": _SCOPES_SUPPORTED,
        }

    # -- /authorize ---------------------------------------------------------------------------

    def _authorize(self, query: dict[str, str]) -> _Response:
        client_id = query.get("client_id", "")
        redirect_uri = query.get("redirect_uri", "")
        # RFC 6749 §4.1.2.1: never redirect to a URI we cannot trust; tell the browser instead.
        if client_id not in self._clients:
            return _json(400, {"error": "invalid_request", "error_description": "unknown client"})
        if urlsplit(redirect_uri).scheme not in ("http", "https"):
            return _json(400, {"error": "invalid_request", "error_description": "bad redirect_uri"})
        state = query.get("state")

        def redirect(params: dict[str, str]) -> _Response:
            if state is not None:
                params["state"] = state
            sep = "&" if "?" in redirect_uri else "?"
            location = redirect_uri + sep + urlencode(params)
            return _Response(302, headers=(("location", location), ("cache-control", "no-store")))

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
            self._codes[code] = _Code(
                client_id=client_id,
                redirect_uri=redirect_uri,
                subject=query.get("login_hint") or self.subject,
                scope=" ".join(scopes),
                nonce=query.get("nonce"),
                challenge=challenge,
                expires_at=self.clock.time() + _CODE_LIFETIME,
            )
        return redirect({"code": code})

    # -- /token -------------------------------------------------------------------------------

    async def _token_endpoint(self, headers: dict[str, str], body: bytes) -> _Response:
        form = _parse_form(headers, body)
        grant_type = form.get("grant_type", "") if form is not None else ""
        with self._lock:
            self._calls["token"] += 1
            self._token_arrivals[grant_type] += 1
            fault = self._faults.popleft() if self._faults else None
            gate = self._gate
        if gate is not None:
            await gate._park()
        if self.latency > 0:
            await asyncio.sleep(self.latency)

        if fault is not None and fault.name != "hang_after_consuming":
            response, outcome = _fault_response(fault), f"fault:{fault.name}"
        else:
            with self._lock:
                try:
                    if form is None:
                        raise _Reject("invalid_request", "expected a form-encoded body")
                    answer, outcome = self._token(form, headers)
                    response = _json(200, answer)
                except _Reject as reject:
                    response, outcome = _error(reject), reject.outcome
            if fault is not None:
                outcome = "fault:hang_after_consuming"
        with self._lock:
            self._token_outcomes[grant_type, outcome] += 1
        if fault is not None and fault.name.startswith("hang"):
            await self._hang_gate._park()
            return _error(_Reject("temporarily_unavailable", "the IdP was closed", status=503))
        return response

    def _authenticate(self, form: Mapping[str, str], headers: Mapping[str, str]) -> str:
        """The authenticated client_id (RFC 6749 §2.3.1), or raise ``invalid_client``."""
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise _invalid_client()
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
            except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
                raise _invalid_client() from None
            raw_id, colon, raw_secret = decoded.partition(":")
            if not colon:
                raise _invalid_client()
            # §2.3.1: id and secret are form-urlencoded before being put into Basic.
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if "client_secret" in form:
                raise _Reject("invalid_request", "more than one client authentication method")
            if form.get("client_id", client_id) != client_id:
                raise _invalid_client()
        else:
            client_id = form.get("client_id", "")
            secret = form.get("client_secret", "")
        if client_id not in self._clients:
            raise _invalid_client()
        expected = self._clients[client_id]
        if expected is None:
            ok = not secret
        else:
            ok = hmac.compare_digest(secret.encode(), expected.encode())
        if not ok:
            raise _invalid_client()
        return client_id

    def _token(
        self, form: Mapping[str, str], headers: Mapping[str, str]
    ) -> tuple[dict[str, Any], str]:
        """The success body and outcome of a token request, or raise :class:`_Reject`."""
        client_id = self._authenticate(form, headers)
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return self._exchange_code(client_id, form), "success"
        if grant_type == "refresh_token":
            return self._refresh_grant(client_id, form)
        if grant_type == "client_credentials":
            return self._client_credentials(client_id, form), "success"
        if grant_type is None:
            raise _Reject("invalid_request", "grant_type is missing")
        raise _Reject("unsupported_grant_type", "grant_type is not supported")

    def _exchange_code(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        code = self._codes.get(form.get("code", ""))
        if code is None or code.client_id != client_id or code.expires_at <= self.clock.time():
            raise _Reject("invalid_grant", "unknown or expired authorization code")
        if code.grant is not None:
            # RFC 6749 §4.1.2: a replayed code should revoke what it already produced.
            if self.revoke_on_reuse and code.grant.active:
                self._revoke_grant(code.grant)
                raise _Reject("invalid_grant", "code already used", outcome="reuse_revoked")
            raise _Reject("invalid_grant", "code already used")
        if form.get("redirect_uri") != code.redirect_uri:
            raise _Reject("invalid_grant", "redirect_uri does not match")
        verifier = form.get("code_verifier")
        # A verifier without a challenge is refused too (OAuth 2.1 PKCE downgrade protection).
        if (code.challenge is None) != (verifier is None) or (
            verifier is not None
            and code.challenge is not None
            and not hmac.compare_digest(_s256(verifier), code.challenge)
        ):
            raise _Reject("invalid_grant", "PKCE verification failed")
        code.grant = _Grant(client_id, code.subject, code.scope, code.nonce)
        return self._grant_tokens(code.grant)

    def _refresh_grant(self, client_id: str, form: Mapping[str, str]) -> tuple[dict[str, Any], str]:
        record = self._refresh.get(form.get("refresh_token", ""))
        if record is None or record.grant.client_id != client_id or not record.grant.active:
            raise _Reject("invalid_grant", "refresh token is invalid, expired or revoked")
        grant = record.grant
        scope = grant.scope
        if "scope" in form:
            requested = form["scope"].split()
            if not set(requested) <= set(grant.scope.split()):
                raise _Reject("invalid_scope", "scope exceeds the grant")
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
            raise _Reject("invalid_grant", "refresh token reused", outcome="reuse_revoked")
        raise _Reject("invalid_grant", "refresh token already used")

    def _client_credentials(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        if self._clients[client_id] is None:
            raise _Reject("unauthorized_client", "public clients cannot use client_credentials")
        # A grant of its own, with the client as subject, so /revoke and /userinfo just work.
        grant = _Grant(client_id, client_id, " ".join(form.get("scope", "").split()))
        return self._tokens(grant, grant.scope, refresh_token=None)

    def _grant_tokens(self, grant: _Grant) -> dict[str, Any]:
        """First tokens of a new grant; a refresh token only with offline_access."""
        if "offline_access" in grant.scope.split():
            grant.refresh_token = self._new_refresh_token(grant)
        return self._tokens(grant, grant.scope, refresh_token=grant.refresh_token)

    def _tokens(self, grant: _Grant, scope: str, *, refresh_token: str | None) -> dict[str, Any]:
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
            body["id_token"] = self._id_token(grant)
        return body

    def _new_refresh_token(self, grant: _Grant) -> str:
        token = "rt_" + secrets.token_urlsafe(32)
        self._refresh[token] = _RefreshRecord(grant)
        return token

    def _id_token(self, grant: _Grant) -> str:
        now = int(self.clock.time())
        claims: dict[str, Any] = {
            "iss": self._last_issuer or "http://localhost",
            "sub": grant.subject,
            "aud": grant.client_id,
            "iat": now,
            "exp": now + int(self.access_token_lifetime),
        }
        if grant.nonce is not None:
            claims["nonce"] = grant.nonce
        return _jwt(claims, self._clients[grant.client_id])

    def _revoke_grant(self, grant: _Grant) -> None:
        if grant.active:
            grant.active = False
            self._grants_revoked += 1

    # -- /userinfo and /revoke ----------------------------------------------------------------

    def _userinfo(self, headers: Mapping[str, str]) -> _Response:
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
            return _json(401, body, challenge)
        sub = record.grant.subject
        return _json(200, {"sub": sub, "name": sub.title(), "email": f"{sub}@example.com"})

    def _revoke(self, headers: Mapping[str, str], body: bytes) -> _Response:
        form = _parse_form(headers, body)
        with self._lock:
            try:
                if form is None:
                    raise _Reject("invalid_request", "expected a form-encoded body")
                client_id = self._authenticate(form, headers)
                token = form.get("token")
                if not token:
                    raise _Reject("invalid_request", "token is missing")
            except _Reject as reject:
                return _error(reject)
            # RFC 7009 §2.2: unknown tokens, or other clients' tokens, still get a 200.
            refresh = self._refresh.get(token)
            access = self._access.get(token)
            if refresh is not None and refresh.grant.client_id == client_id:
                self._revoke_grant(refresh.grant)
            elif access is not None and access.grant.client_id == client_id:
                access.revoked = True
        return _Response(200)


def _fault_response(fault: Fault) -> _Response:
    retry = (("retry-after", str(fault.retry_after)),) if fault.retry_after is not None else ()
    if fault.name == "malformed":
        return _Response(200, b"<html><body>Bad Gateway</body></html>", (), "application/json")
    if fault.name == "invalid_grant":
        return _error(
            _Reject("invalid_grant", "refresh token is invalid or expired", status=fault.status)
        )
    if fault.name == "invalid_client":
        return _error(_invalid_client())
    # Gateways in front of an IdP answer these, usually not in OAuth's JSON.
    return _Response(fault.status, b"upstream failure", retry)


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier))), no padding."""
    return _b64url(hashlib.sha256(verifier.encode("ascii", "replace")).digest())


def _jwt(claims: Mapping[str, Any], secret: str | None) -> str:
    """An HS256 JWT keyed with the client secret; ``alg: none`` for public clients."""
    header = {"alg": "HS256" if secret is not None else "none", "typ": "JWT"}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64url(signature)


def _parse_form(headers: Mapping[str, str], body: bytes) -> dict[str, str] | None:
    """A form body as a dict; None when it is not one or repeats a parameter (RFC 6749 §3.1)."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        return None
    form = dict(pairs)
    return form if len(form) == len(pairs) else None


async def _read_body(receive: _Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send_response(send: _Send, response: _Response) -> None:
    headers = [(b"content-type", response.content_type.encode())]
    headers += [(k.encode(), v.encode("latin-1")) for k, v in response.headers]
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def _lifespan(receive: _Receive, send: _Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@contextlib.contextmanager
def serve(app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn on a background thread; yields its base URL.

    Port 0 picks a free port. On exit the server is stopped; requests still running after a
    3 s grace are cancelled (so call ``FakeIdP.close()`` first to end hung ones cleanly).
    """
    import uvicorn  # optional dependency: only this helper needs it

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets
    # whose protocol says TCP, and with Nagle on every keep-alive request waits ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.bind((host, port))
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,  # leave the application's logging configuration alone
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=3,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="asgi-token-refresh-serve"
        )
        thread.start()
        try:
            deadline = time.monotonic() + 10.0
            # uvicorn offers no startup event, so poll its flag.
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("uvicorn did not start")
                time.sleep(0.005)
            url_host = f"[{host}]" if family == socket.AF_INET6 else host
            yield f"http://{url_host}:{bound_port}"
        finally:
            server.should_exit = True
            thread.join()
    finally:
        sock.close()


class CapturedTelemetry:
    """A :class:`~asgi_token_refresh.Telemetry` wired to in-memory SDK exporters.

    Pass ``captured.telemetry`` to ``OAuth2Client(telemetry=...)`` (or a Refresher), run the
    code, then read ``spans()`` and ``points(metric)``; no global provider is touched.
    """

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from ._telemetry import Telemetry

        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.telemetry = Telemetry(
            meter_provider=self.meter_provider, tracer_provider=self.tracer_provider
        )

    def spans(self, name: str | None = None) -> list[Any]:
        """Finished spans, optionally only those called ``name``."""
        return [s for s in self.exporter.get_finished_spans() if name in (None, s.name)]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """``(attributes, point)`` for every data point of ``metric`` collected now."""
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, Any], Any]] = []
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for each in scope.metrics:
                    if each.name == metric:
                        found += [(dict(p.attributes or {}), p) for p in each.data.data_points]
        return found

    def value(self, metric: str, **attributes: str) -> float:
        """Sum of a counter's points whose attributes include ``attributes`` (0 if none).

        Attribute keys with dots (``error.type``) are passed with underscores (``error_type``).
        """
        wanted = {k.replace("_", "."): v for k, v in attributes.items() if k == "error_type"}
        wanted |= {k: v for k, v in attributes.items() if k != "error_type"}
        return sum(
            getattr(point, "value", getattr(point, "count", 0))
            for labels, point in self.points(metric)
            if all(labels.get(k) == v for k, v in wanted.items())
        )

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def capture_telemetry() -> CapturedTelemetry:
    """In-memory spans and metrics for tests (needs ``opentelemetry-sdk``)."""
    return CapturedTelemetry()
