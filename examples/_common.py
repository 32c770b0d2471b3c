"""What the Starlette and FastAPI examples share: configuration and the OIDC login steps.

Configuration comes only from the environment (see examples/README.md). With ``OIDC_ISSUER``
unset, an in-process FakeIdP stands in for the provider: the app mounts it at ``/idp`` so the
browser can reach ``/idp/authorize``, and server-side calls reach it without a socket.

Several workers (``uvicorn --workers N``) need three things shared between them: the sessions,
the refresh flights, and the logins in progress (the callback may land on another worker than
``/login``). With ``REDIS_URL`` all three live in Redis; with ``ATR_COORDINATOR=file`` the
sessions are encrypted cookies and the other two are files on this host. Either way every
value is sealed with ``SESSION_SECRET``, which every worker must share.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from cachetools import TTLCache
from starlette.responses import HTMLResponse, JSONResponse

from asgi_token_refresh import (
    AuthorizationRequest,
    Clock,
    CookieSessionStore,
    Coordinator,
    MemorySessionStore,
    OAuth2Client,
    ReauthenticationRequired,
    Refresher,
    SessionStore,
    SystemClock,
    TokenAccessor,
    TokenEndpointError,
    TokenSet,
)
from asgi_token_refresh.kit import Sealer
from asgi_token_refresh.testing import FakeIdP

logger = logging.getLogger("examples")

#: Binds a login to the browser that started it (no login CSRF); scoped to the callback path.
LOGIN_COOKIE = "oidc_login"
LOGIN_TTL = 600  # seconds a started login may take


class LoginError(Exception):
    """The callback cannot finish the login; the message is safe to show (as plain text)."""


def fake_idp() -> FakeIdP:
    """A FakeIdP of its own, for several workers to share (each one's in-process FakeIdP would
    know only its own logins): ``uvicorn --factory examples._common:fake_idp --port 9000``,
    then ``OIDC_ISSUER=http://127.0.0.1:9000 OIDC_CLIENT_ID=app OIDC_CLIENT_SECRET=app-secret``.
    Strict: refresh tokens rotate and a reused one revokes the grant."""
    return FakeIdP(issuer=None)  # the issuer is the URL it is served at


# -- logins in progress ---------------------------------------------------------------------------


class PendingLogins(Protocol):
    """Logins started by ``/login`` and not finished yet, by ``state``; each taken once."""

    async def put(self, request: AuthorizationRequest) -> None: ...

    async def take(self, state: str) -> AuthorizationRequest | None: ...

    async def aclose(self) -> None: ...


class MemoryPendingLogins:
    """In this process: enough for one worker. Used from the event loop only (cachetools is not
    thread-safe)."""

    def __init__(self, clock: Clock) -> None:
        self._pending: TTLCache[str, AuthorizationRequest] = TTLCache(
            maxsize=10_000, ttl=LOGIN_TTL, timer=clock.monotonic
        )

    async def put(self, request: AuthorizationRequest) -> None:
        self._pending[request.state] = request

    async def take(self, state: str) -> AuthorizationRequest | None:
        return self._pending.pop(state, None)

    async def aclose(self) -> None:
        return None


class _Sealed:
    """Seals a pending login (its ``code_verifier`` is a secret) with the session keys, bound to
    where it is stored, and refuses one older than LOGIN_TTL whatever the storage says."""

    def __init__(self, secret_keys: Sequence[str], clock: Clock) -> None:
        self._sealer = Sealer(secret_keys, purpose="atr-example-login", extra="cookies")
        self._clock = clock

    def name(self, state: str) -> str:
        return self._sealer.name("login", state)  # a keyed hash: the state is not in the name

    def seal(self, request: AuthorizationRequest, where: str) -> bytes:
        document = {
            "url": request.url,
            "state": request.state,
            "nonce": request.nonce,
            "code_verifier": request.code_verifier,
            "redirect_uri": request.redirect_uri,
            "started": self._clock.time(),
        }
        return self._sealer.seal(json.dumps(document).encode(), where.encode())

    def open(self, blob: bytes, where: str, state: str) -> AuthorizationRequest | None:
        try:
            document = json.loads(self._sealer.open(blob, where.encode()))
            request = AuthorizationRequest(
                url=document["url"],
                state=document["state"],
                nonce=document["nonce"],
                code_verifier=document["code_verifier"],
                redirect_uri=document["redirect_uri"],
            )
            started = float(document["started"])
        except (ValueError, KeyError, TypeError):
            logger.warning("discarded a pending login that does not authenticate")
            return None
        if request.state != state or not 0 <= self._clock.time() - started <= LOGIN_TTL:
            return None
        return request


class RedisPendingLogins:
    """In Redis, sealed, for LOGIN_TTL; ``take`` is one GETDEL, so a login finishes once.

    The redis-py client belongs to the event loop that first uses it: the server's.
    """

    def __init__(self, url: str, secret_keys: Sequence[str], clock: Clock) -> None:
        import redis.asyncio

        self._sealed = _Sealed(secret_keys, clock)
        self._redis = redis.asyncio.Redis.from_url(url)

    def _key(self, state: str) -> str:
        return f"atr-example:login:{self._sealed.name(state)}"

    async def put(self, request: AuthorizationRequest) -> None:
        key = self._key(request.state)
        await self._redis.set(key, self._sealed.seal(request, key), px=LOGIN_TTL * 1000)

    async def take(self, state: str) -> AuthorizationRequest | None:
        key = self._key(state)
        blob = await self._redis.getdel(key)
        return self._sealed.open(blob, key, state) if isinstance(blob, bytes) else None

    async def aclose(self) -> None:
        await self._redis.aclose()


class FilePendingLogins:
    """Sealed files in a private directory of this host (next to the file coordinator's);
    ``take`` claims a file by renaming it, which only one worker can do."""

    def __init__(self, directory: Path, secret_keys: Sequence[str], clock: Clock) -> None:
        directory.mkdir(mode=0o700, exist_ok=True)
        info = directory.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise RuntimeError(f"{directory} must be private to this user (mode 0700)")
        self._directory = directory
        self._sealed = _Sealed(secret_keys, clock)

    async def put(self, request: AuthorizationRequest) -> None:
        await asyncio.to_thread(self._put, request)

    async def take(self, state: str) -> AuthorizationRequest | None:
        return await asyncio.to_thread(self._take, state)

    async def aclose(self) -> None:
        return None

    def _put(self, request: AuthorizationRequest) -> None:
        name = self._sealed.name(request.state)
        temporary = self._directory / f"{name}.{secrets.token_hex(8)}.tmp"
        temporary.write_bytes(self._sealed.seal(request, name))
        temporary.replace(self._directory / f"{name}.login")
        self._sweep()

    def _take(self, state: str) -> AuthorizationRequest | None:
        name = self._sealed.name(state)
        claimed = self._directory / f"{name}.{secrets.token_hex(8)}.taken"
        try:
            (self._directory / f"{name}.login").rename(claimed)  # atomic: one worker wins
        except FileNotFoundError:
            return None
        try:
            return self._sealed.open(claimed.read_bytes(), name, state)
        finally:
            claimed.unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Delete logins nobody finished (by file age, on the real clock)."""
        horizon = time.time() - 2 * LOGIN_TTL
        for path in self._directory.iterdir():
            try:
                if path.stat().st_mtime < horizon:
                    path.unlink(missing_ok=True)
            except OSError:
                continue


@dataclass
class _Shared:
    """What the workers share, chosen by REDIS_URL, ATR_COORDINATOR and SESSION_SECRET."""

    store: SessionStore
    coordinator: Coordinator | None  # None: this process only (the Refresher's default)
    pending: PendingLogins
    closers: list[Callable[[], Awaitable[None]]]

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, secure: bool, clock: Clock) -> _Shared:
        redis_url = env.get("REDIS_URL") or None
        mode = env.get("ATR_COORDINATOR", "redis" if redis_url else "local").strip().lower()
        if mode not in ("local", "redis", "file"):
            raise RuntimeError(f"ATR_COORDINATOR must be local, redis or file, not {mode!r}")
        if mode == "redis" and redis_url is None:
            raise RuntimeError("ATR_COORDINATOR=redis needs REDIS_URL")
        session_secret = env.get("SESSION_SECRET")
        # Comma-separated to rotate keys: the first one encrypts.
        keys = [k for k in session_secret.split(",") if k] if session_secret else []
        if not keys and (redis_url is not None or mode == "file"):
            raise RuntimeError(
                ("REDIS_URL is set" if redis_url else "ATR_COORDINATOR=file is set")
                + ", so SESSION_SECRET must be set too (at least 32 characters, the same in "
                "every worker): it seals the sessions, the shared refresh results and the "
                "logins in progress. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        closers: list[Callable[[], Awaitable[None]]] = []
        store: SessionStore
        pending: PendingLogins
        if redis_url is not None:
            from asgi_token_refresh.redis import RedisSessionStore

            redis_store = RedisSessionStore(redis_url, secret_keys=keys, secure=secure)
            closers.append(redis_store.aclose)
            store = redis_store
            pending = RedisPendingLogins(redis_url, keys, clock)
        elif keys:
            store = CookieSessionStore(secret_keys=keys, secure=secure)
            pending = MemoryPendingLogins(clock)
        else:
            logger.warning(
                "SESSION_SECRET is not set: sessions live in this process's memory "
                "(lost on restart, not shared between workers)"
            )
            store = MemorySessionStore(secure=secure, clock=clock)
            pending = MemoryPendingLogins(clock)
        coordinator: Coordinator | None = None
        if mode == "redis":
            from asgi_token_refresh.redis import RedisCoordinator

            assert redis_url is not None
            redis_coordinator = RedisCoordinator(redis_url, secret_keys=keys)
            closers.append(redis_coordinator.aclose)
            coordinator = redis_coordinator
        elif mode == "file":
            # Imported here: only this mode needs it.
            from asgi_token_refresh import FileCoordinator

            file_coordinator = FileCoordinator(secret_keys=keys)
            closers.append(file_coordinator.aclose)
            coordinator = file_coordinator
            if redis_url is None:
                pending = FilePendingLogins(file_coordinator.directory / "logins", keys, clock)
        return cls(store, coordinator, pending, closers)


@dataclass
class OIDC:
    """Everything one app instance needs; build it with :meth:`from_env`."""

    redirect_uri: str
    scope: str
    secure_cookies: bool
    client: OAuth2Client
    refresher: Refresher
    store: SessionStore
    http: httpx.AsyncClient  # for userinfo (and the APIs you call with the user's token)
    idp: FakeIdP | None
    # Logins started here and not finished yet, by state: in this process's memory, or shared
    # by every worker (Redis, or files with ATR_COORDINATOR=file).
    pending: PendingLogins
    # What to close at shutdown besides the HTTP clients (Redis pools, coordinator files).
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @classmethod
    def from_env(cls, clock: Clock | None = None) -> OIDC:
        env = os.environ
        base_url = env.get("APP_BASE_URL", "http://127.0.0.1:8000").rstrip("/")
        secure = base_url.startswith("https")
        clock = clock or SystemClock()
        issuer = env.get("OIDC_ISSUER")
        idp: FakeIdP | None = None
        transport: httpx.AsyncBaseTransport | None = None
        if issuer:
            client_id, secret = env.get("OIDC_CLIENT_ID"), env.get("OIDC_CLIENT_SECRET")
            if not client_id:
                raise RuntimeError("OIDC_ISSUER is set, so OIDC_CLIENT_ID must be set too")
        else:
            issuer = base_url + "/idp"
            idp = FakeIdP(issuer=issuer, clock=clock)
            transport = httpx.ASGITransport(app=idp)
            client_id, secret = "app", "app-secret"
            logger.warning("OIDC_ISSUER is not set: using the in-process FakeIdP at %s", issuer)
        client = OAuth2Client.from_discovery(
            issuer,
            client_id=client_id,
            client_secret=secret or None,
            auth_method="client_secret_basic" if secret else "none",
            transport=transport,
            clock=clock,
        )
        shared = _Shared.from_env(env, secure=secure, clock=clock)
        if idp is not None and shared.coordinator is not None:
            logger.warning(
                "the in-process FakeIdP knows only this worker's logins: with --workers N, "
                "serve one (uvicorn --factory examples._common:fake_idp) and set OIDC_ISSUER"
            )
        return cls(
            redirect_uri=base_url + "/callback",
            scope=env.get("OIDC_SCOPE", "openid offline_access"),
            secure_cookies=secure,
            client=client,
            # One refresher per app. Refresher.shared() (what client= in the middleware uses)
            # keys a process-wide registry by issuer URL and client id only: a second
            # create_app() in this process would get the first app's client, transport and clock.
            refresher=Refresher(client, coordinator=shared.coordinator),
            store=shared.store,
            # An in-process FakeIdP is reached through the same ASGI transport; otherwise the
            # client keeps its own connection pool, bound to the server's event loop.
            http=httpx.AsyncClient(transport=transport, timeout=10.0),
            idp=idp,
            pending=shared.pending,
            closers=shared.closers,
        )

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.client.aclose()
        await self.pending.aclose()
        for close in self.closers:
            await close()
        if self.idp is not None:
            self.idp.close()

    # -- the login ---------------------------------------------------------------------------

    async def start_login(self) -> AuthorizationRequest:
        """Authorization code + PKCE S256, fresh state and nonce (``prompt=consent`` is added
        for ``offline_access``). Redirect the browser to ``.url``; set LOGIN_COOKIE to
        ``.state``."""
        request = await self.client.authorization_url(self.redirect_uri, scope=self.scope)
        await self.pending.put(request)
        return request

    async def finish_login(self, query: Mapping[str, str], login_cookie: str | None) -> TokenSet:
        """Check the callback and redeem its code; raises :class:`LoginError`.

        A provider outage raises RefreshUnavailable, which the middleware answers with 503.
        """
        if "error" in query:
            detail = query.get("error_description", "")
            raise LoginError(f"the provider refused the login: {query['error']} {detail}")
        code, state = query.get("code"), query.get("state")
        if not code or not state:
            raise LoginError("the callback needs both code and state")
        pending = await self.pending.take(state)  # single use
        if pending is None:
            raise LoginError("unknown or expired login; please log in again")
        if not secrets.compare_digest(state.encode(), (login_cookie or "").encode()):
            raise LoginError("this login was started in another browser; please log in again")
        try:
            token_set = await self.client.exchange_code(
                code, redirect_uri=pending.redirect_uri, code_verifier=pending.code_verifier
            )
        except TokenEndpointError as exc:
            raise LoginError(f"the provider refused the authorization code: {exc.error}") from exc
        # The ID token came straight from the token endpoint over TLS (OIDC Core §3.1.3.7), so
        # this checks only that it answers this login. Use an OIDC library to verify it fully.
        id_token, nonce = token_set.id_token, pending.nonce
        if id_token is not None and nonce is not None and _claims(id_token).get("nonce") != nonce:
            raise LoginError("the ID token does not belong to this login (nonce)")
        if token_set.refresh_token is None:
            logger.warning("no refresh token: enable offline_access/refresh tokens for the client")
        return token_set

    # -- calling an API with the user's token ------------------------------------------------

    async def userinfo(self, token: TokenAccessor) -> JSONResponse:
        """The provider's userinfo for the session: one refresh-and-retry on a 401."""
        endpoint = (await self.client.metadata()).userinfo_endpoint
        if endpoint is None:
            return JSONResponse({"error": "provider has no userinfo endpoint"}, status_code=501)
        try:
            headers = await token.headers()
            response = await self.http.get(endpoint, headers=headers)
            if response.status_code == 401:  # revoked early, or our clock is off
                failed = headers["Authorization"].partition(" ")[2]
                await token.renew(failed_access_token=failed)
                response = await self.http.get(endpoint, headers=await token.headers())
                if response.status_code == 401:
                    raise ReauthenticationRequired("downstream_401")  # the middleware: 401
            response.raise_for_status()
            return JSONResponse(response.json())
        except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": "userinfo request failed"}, status_code=502)


def _claims(jwt: str) -> dict[str, Any]:
    try:
        payload = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        raise LoginError("the provider sent a malformed ID token") from None
    return claims if isinstance(claims, dict) else {}


def home_page(authenticated: bool) -> HTMLResponse:
    if authenticated:
        body = 'Logged in. <a href="/api/me">/api/me</a> | <a href="/logout">log out</a>'
    else:
        body = 'Not logged in. <a href="/login">Log in</a>'
    return HTMLResponse(f"<!doctype html><title>asgi-token-refresh</title><p>{body}</p>")
