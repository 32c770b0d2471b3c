"""OIDCLogin: login, callback and logout routes for any ASGI app (a verified OIDC relying party).

Mount it under the app that ``TokenRefreshMiddleware`` wraps; it starts and ends sessions
through the request's accessor (``scope["state"]["token"]``), so it shares the middleware's
client, refresher and store.

- ``GET {mount}/login?next=/path`` starts an authorization-code login with PKCE S256, ``state``
  and ``nonce``. The pending login is sealed (AES-GCM) into a cookie of its own, named after a
  hash of its ``state``: it lives in the browser that started it, on any worker or host, and
  no number of anonymous logins can push anyone else's out.
- ``GET {mount}/callback`` finds that cookie *before* consuming anything (knowing a victim's
  ``state`` without their cookie changes nothing), redeems the code, verifies the ID token
  (``_id_token``) and starts the session. Every refusal is a 400 with a plain-text reason and
  no session; a provider outage is a 503 with ``Retry-After``.
- ``POST {mount}/logout`` refuses cross-site requests (``Sec-Fetch-Site``, else ``Origin``),
  ends the session (revocation, stragglers refused) and, when the provider has an
  ``end_session_endpoint``, continues with RP-initiated logout.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlencode

from ._cookies import CookieWriter, SameSite, request_cookies
from ._errors import ConfigurationError, LoginFailed, RefreshUnavailable, TokenEndpointError
from ._id_token import IdTokenVerifier
from ._login_http import (
    Receive,
    Scope,
    Send,
    mount_path,
    origin,
    redirect,
    route_path,
    safe_return_path,
    same_origin,
    text,
    unavailable,
)
from ._oauth import OAuth2Client
from ._sealing import Sealer
from ._tokens import TokenSet

__all__ = ["OIDCLogin", "safe_return_path"]

logger = logging.getLogger(__name__)


_PENDING_PREFIX = "atr_login_"
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_UNKNOWN_LOGIN = (
    "This login is unknown or has expired, or it was started in another browser. "
    "Please log in again."
)


def _pending_cookie(state: str) -> str:
    return _PENDING_PREFIX + hashlib.sha256(state.encode()).hexdigest()[:16]


class OIDCLogin:
    """Login, callback and logout as an ASGI app to mount, e.g. at ``/auth``.

        login = OIDCLogin(client, secret_keys=[SECRET])
        app = Starlette(routes=[Mount("/auth", app=login), ...],
                        middleware=[Middleware(TokenRefreshMiddleware, client=client, ...)])

    ``secret_keys`` seal pending logins (the first seals, every one opens; share them between
    workers). ``redirect_uri`` is the callback's absolute URL as registered at the provider
    (default: derived from the request, ``{scheme}://{host}{mount}/callback``).
    ``offline_access`` in ``scope`` asks for a refresh token (with ``prompt=consent``, as
    OIDC requires). After logout the browser goes to ``after_logout``, through the provider's
    end-session endpoint when it has one.
    """

    def __init__(
        self,
        client: OAuth2Client,
        *,
        secret_keys: Sequence[str | bytes],
        scope: str = "openid profile email offline_access",
        redirect_uri: str | None = None,
        after_logout: str = "/",
        post_logout_redirect_uri: str | None = None,
        secure_cookies: bool = True,
        same_site: SameSite = "lax",
        login_ttl: float = 600.0,
        leeway: float = 60.0,
        state_key: str = "token",
    ) -> None:
        if not (math.isfinite(login_ttl) and login_ttl > 0):
            raise ConfigurationError("login_ttl must be a positive number of seconds")
        if same_site == "strict":  # the callback is a cross-site navigation from the provider
            raise ConfigurationError("SameSite=Strict cookies never reach the login callback")
        self.client = client
        self.scope = scope
        self.redirect_uri = redirect_uri
        self.after_logout = safe_return_path(after_logout)
        self.post_logout_redirect_uri = post_logout_redirect_uri
        self.login_ttl = login_ttl
        self.state_key = state_key
        self._sealer = Sealer(secret_keys, purpose="atr-login-v1", extra="oidc")
        self._secure = secure_cookies
        self._same_site = same_site
        self._verifier = IdTokenVerifier(client, leeway=leeway)
        self._openid = "openid" in scope.split()

    def __repr__(self) -> str:
        return f"OIDCLogin(client={self.client!r}, scope={self.scope!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route = route_path(scope)
        method = scope.get("method", "GET")
        handlers = {"/login": ("GET", self._login), "/callback": ("GET", self._callback)}
        handlers["/logout"] = ("POST", self._logout)
        if route not in handlers:
            await text(send, 404, "Not found")
            return
        allowed, handler = handlers[route]
        if method != allowed:
            await text(send, 405, f"Use {allowed}", [(b"allow", allowed.encode())])
            return
        accessor = scope.get("state", {}).get(self.state_key)
        if accessor is None:
            raise ConfigurationError("OIDCLogin must be mounted inside TokenRefreshMiddleware")
        await handler(scope, accessor, send)

    # -- login ------------------------------------------------------------------------------

    async def _login(self, scope: Scope, accessor: Any, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return_to = safe_return_path((query.get("next") or [None])[0])
        redirect_uri = self.redirect_uri or origin(scope) + mount_path(scope) + "/callback"
        try:
            start = await self.client.authorization_url(redirect_uri, scope=self.scope)
        except RefreshUnavailable as exc:
            await unavailable(send, exc)
            return
        pending = {
            "state": start.state,
            "nonce": start.nonce,
            "verifier": start.code_verifier,
            "redirect_uri": redirect_uri,
            "next": return_to,
            "created": self.client.clock.time(),
        }
        name = _pending_cookie(start.state)
        sealed = self._sealer.seal(json.dumps(pending).encode(), name.encode())
        value = base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")
        cookie = self._writer(scope).set(name, value, self.login_ttl)
        await redirect(send, start.url, [cookie])

    # -- callback ---------------------------------------------------------------------------

    async def _callback(self, scope: Scope, accessor: Any, send: Send) -> None:
        raw = scope.get("query_string", b"").decode("latin-1")  # bytes a server let through
        query = {k: v[0] for k, v in parse_qs(raw).items()}
        state, code = query.get("state"), query.get("code")
        writer = self._writer(scope)
        if "error" in query:
            error = query["error"] if _ERROR_CODE.fullmatch(query["error"]) else "error"
            gone = [writer.delete(_pending_cookie(state))] if state else []
            await text(send, 400, f"The provider refused the login ({error}).", cookies=gone)
            return
        if not state or not code:
            await text(send, 400, "The login callback needs a code and a state.")
            return
        name = _pending_cookie(state)
        pending = self._open_pending(scope, name, state)  # the binding, checked first
        if pending is None:
            await text(send, 400, _UNKNOWN_LOGIN)
            return
        consumed = [writer.delete(name)]  # from here on the pending login is used up
        try:
            tokens = await self._redeem(code, pending)
        except LoginFailed as exc:
            logger.info("login refused: %s", exc.reason)
            await text(send, 400, f"Login failed: {exc.reason}.", cookies=consumed)
            return
        except RefreshUnavailable as exc:
            await unavailable(send, exc, consumed)
            return
        try:
            await accessor.login(tokens)
        except LoginFailed as exc:  # the store cannot hold them
            logger.warning("login refused: %s", exc.reason)
            await text(send, 400, f"Login failed: {exc.reason}.", cookies=consumed)
            return
        await redirect(send, pending["next"], consumed)

    def _open_pending(self, scope: Scope, name: str, state: str) -> dict[str, Any] | None:
        blob = request_cookies(scope.get("headers", ())).get(name)
        if not blob:
            return None
        try:
            raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
            pending = json.loads(self._sealer.open(raw, name.encode()))
        except (ValueError, TypeError):
            return None
        if not isinstance(pending, dict) or not secrets.compare_digest(
            str(pending.get("state", "")).encode(), state.encode()
        ):
            return None
        created = pending.get("created")
        if (
            not isinstance(created, int | float)
            or created + self.login_ttl < self.client.clock.time()
        ):
            return None
        return pending

    async def _redeem(self, code: str, pending: dict[str, Any]) -> TokenSet:
        try:
            tokens = await self.client.exchange_code(
                code, redirect_uri=pending["redirect_uri"], code_verifier=pending["verifier"]
            )
        except TokenEndpointError as exc:
            # A terminal failure at login (the code was refused, or the app's credentials):
            # counted once, as component "login"; invalid_client here means no one can log in.
            self.client.telemetry.terminal_failure(exc.error, "login", self.client.name)
            raise LoginFailed(f"the provider refused the code ({exc.error})") from None
        if not self._openid:
            return tokens
        if tokens.id_token is None:
            raise LoginFailed("the provider sent no ID token")
        claims = await self._verifier.verify(tokens.id_token, nonce=pending.get("nonce"))
        return TokenSet(
            access_token=tokens.access_token,
            expires_at=tokens.expires_at,
            issued_at=tokens.issued_at,
            refresh_token=tokens.refresh_token,
            id_token=tokens.id_token,
            token_type=tokens.token_type,
            scope=tokens.scope,
            extra=tokens.extra,
            claims=claims,
        )

    # -- logout -----------------------------------------------------------------------------

    async def _logout(self, scope: Scope, accessor: Any, send: Send) -> None:
        if not same_origin(scope):
            await text(send, 403, "Cross-site logout requests are refused.")
            return
        token_set = await accessor.token_set()
        await accessor.logout()
        target = self.after_logout
        try:
            metadata = await self.client.metadata()
        except RefreshUnavailable:
            metadata = None
        if metadata is not None and metadata.end_session_endpoint and token_set is not None:
            params = {"client_id": self.client.client_id}
            if token_set.id_token:
                params["id_token_hint"] = token_set.id_token
            params["post_logout_redirect_uri"] = (
                self.post_logout_redirect_uri or origin(scope) + self.after_logout
            )
            separator = "&" if "?" in metadata.end_session_endpoint else "?"
            target = metadata.end_session_endpoint + separator + urlencode(params)
        await redirect(send, target, [])

    def _writer(self, scope: Scope) -> CookieWriter:
        return CookieWriter(
            path=mount_path(scope) or "/",
            domain=None,
            secure=self._secure,
            same_site=self._same_site,
            max_age=self.login_ttl,
        )
