"""What the Starlette and FastAPI examples share: their configuration, from the environment.

See examples/README.md for the variables. With ``OIDC_ISSUER`` unset, a FakeIdP stands in for
the provider: the app mounts it at ``/idp`` (the browser logs in at ``/idp/authorize``) and
its own calls reach it in process, without a socket.

Several workers (``uvicorn --workers N``) must share the sessions and the refresh flights:
``REDIS_URL`` puts both in Redis, ``ATR_COORDINATOR=file`` keeps sessions in encrypted cookies
and coordinates through files on this host. Logins in progress need nothing shared but
``SESSION_SECRET``: ``OIDCLogin`` seals each one into a cookie that any worker can open.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from asgi_token_refresh import (
    Clock,
    CookieSessionStore,
    Coordinator,
    FileCoordinator,
    MemorySessionStore,
    OAuth2Client,
    Refresher,
    SessionStore,
    SystemClock,
)
from asgi_token_refresh.testing import FakeIdP

logger = logging.getLogger("examples")


def fake_idp() -> FakeIdP:
    """A FakeIdP of its own, for several workers to share (each one's in-process FakeIdP would
    know only its own logins): ``uvicorn --factory examples._common:fake_idp --port 9000``,
    then ``OIDC_ISSUER=http://127.0.0.1:9000 OIDC_CLIENT_ID=app OIDC_CLIENT_SECRET=app-secret``.
    Strict: refresh tokens rotate and a reused one revokes the grant."""
    return FakeIdP(issuer=None)  # the issuer is the URL it is served at


@dataclass
class Config:
    """Everything one app instance needs; build it with :meth:`from_env`."""

    client: OAuth2Client
    refresher: Refresher
    store: SessionStore
    secret_keys: list[str]  # seal the logins in progress (and cookie sessions, if any)
    scope: str
    redirect_uri: str | None  # None: OIDCLogin derives it from the request
    after_logout_uri: str | None  # where the provider sends the browser after logout
    secure: bool  # Secure cookies: off only for plain-http development
    idp: FakeIdP | None  # the stand-in provider, to mount at /idp
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def provider_transport(self) -> httpx.AsyncBaseTransport | None:
        """How the app's own requests reach the provider: in process for the stand-in,
        otherwise the shared connection pool (None)."""
        return self.idp.transport() if self.idp is not None else None

    @classmethod
    def from_env(cls, clock: Clock | None = None) -> Config:
        env, clock = os.environ, clock or SystemClock()
        base_url = (env.get("APP_BASE_URL") or "").rstrip("/")
        secure = base_url.startswith("https://")
        keys = [key for key in (env.get("SESSION_SECRET") or "").split(",") if key]  # first seals
        redis_url = env.get("REDIS_URL") or None
        mode = (env.get("ATR_COORDINATOR") or ("redis" if redis_url else "local")).strip().lower()
        if mode not in ("local", "redis", "file"):
            raise RuntimeError(f"ATR_COORDINATOR must be local, redis or file, not {mode!r}")
        if mode == "redis" and redis_url is None:
            raise RuntimeError("ATR_COORDINATOR=redis needs REDIS_URL")
        if not keys and (redis_url is not None or mode == "file"):
            raise RuntimeError(
                ("REDIS_URL is set" if redis_url else "ATR_COORDINATOR=file is set")
                + ", so SESSION_SECRET must be set too (at least 32 characters, the same in "
                "every worker): it seals the sessions, the shared refresh results and the "
                "logins in progress. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )

        issuer = env.get("OIDC_ISSUER")
        idp = None
        if issuer:
            client_id, secret = env.get("OIDC_CLIENT_ID"), env.get("OIDC_CLIENT_SECRET")
            if not client_id:
                raise RuntimeError("OIDC_ISSUER is set, so OIDC_CLIENT_ID must be set too")
        else:
            issuer = (base_url or "http://127.0.0.1:8000") + "/idp"
            idp = FakeIdP(issuer=issuer, clock=clock)
            client_id, secret = "app", "app-secret"
            logger.warning("OIDC_ISSUER is not set: using the in-process FakeIdP at %s", issuer)
            if mode != "local":
                logger.warning(
                    "the in-process FakeIdP knows only this worker's logins: with --workers N, "
                    "serve one (uvicorn --factory examples._common:fake_idp) and set OIDC_ISSUER"
                )
        client = OAuth2Client.from_discovery(
            issuer,
            client_id=client_id,
            client_secret=secret or None,
            auth_method="client_secret_basic" if secret else "none",
            transport=idp.transport() if idp is not None else None,
            clock=clock,
        )
        closers: list[Callable[[], Awaitable[None]]] = [client.aclose]

        store: SessionStore
        if redis_url is not None:
            from asgi_token_refresh.redis import RedisSessionStore

            redis_store = RedisSessionStore(redis_url, secret_keys=keys, secure=secure)
            closers.append(redis_store.aclose)
            store = redis_store
        elif keys:
            store = CookieSessionStore(keys, secure=secure)
        else:
            logger.warning(
                "SESSION_SECRET is not set: sessions live in this process's memory (lost on "
                "restart, not shared between workers), sealed logins with a key of its own"
            )
            store = MemorySessionStore(secure=secure, clock=clock)
            keys = [secrets.token_urlsafe(32)]

        coordinator: Coordinator | None = None  # None: this process only
        if mode == "redis" and redis_url is not None:
            from asgi_token_refresh.redis import RedisCoordinator

            redis_coordinator = RedisCoordinator(redis_url, secret_keys=keys)
            closers.append(redis_coordinator.aclose)
            coordinator = redis_coordinator
        elif mode == "file":
            file_coordinator = FileCoordinator(secret_keys=keys)
            closers.append(file_coordinator.aclose)
            coordinator = file_coordinator

        return cls(
            client=client,
            # One refresher per app. Refresher.shared() (what client= in the middleware uses)
            # keys a process-wide registry by issuer URL and client id only: a second
            # create_app() in this process would get the first app's client and clock.
            refresher=Refresher(client, coordinator=coordinator),
            store=store,
            secret_keys=keys,
            scope=env.get("OIDC_SCOPE") or "openid offline_access",
            redirect_uri=base_url + "/auth/callback" if base_url else None,
            after_logout_uri=base_url + "/" if base_url else None,
            secure=secure,
            idp=idp,
            closers=closers,
        )

    async def aclose(self) -> None:
        for close in self.closers:
            await close()
        if self.idp is not None:
            self.idp.close()
