"""The app each worker process runs: a session whose tokens are refreshed through a coordinator.

    python -m uvicorn --factory tests.workers.app:create_app --port 8001

Configured only by the environment, so that every worker is the same app:

``ATR_WORKER_IDP``          the FakeIdP's URL (its issuer)
``ATR_WORKER_COORDINATOR``  ``redis``, ``file`` or ``none`` (each worker refreshes on its own)
``ATR_WORKER_STORE``        ``cookie`` (the default) or ``redis`` (sessions shared in Redis)
``ATR_WORKER_REDIS_URL``    for ``redis``
``ATR_WORKER_DIRECTORY``    for ``file``
``ATR_WORKER_SECRET``       seals the session cookie and the published outcomes (all workers)
``ATR_WORKER_TIMEOUT``      the refresher's ``timeout`` (seconds; a Redis lease lives 5 s more)
``ATR_WORKER_CLOCK``        the file holding the wall time, which only the test moves (``clock.py``)
``ATR_WORKER_ID``           echoed in every answer

Routes: ``POST /login`` starts a session from a token-endpoint response (JSON body),
``GET /token`` answers ``{"access_token": ..., "worker": ...}``, ``GET /healthz`` says ready,
``GET /duplicates`` the worker's ``refresh.duplicates`` count by how each was detected.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_token_refresh import (
    CookieSessionStore,
    FileCoordinator,
    OAuth2Client,
    Refresher,
    TokenAccessor,
    TokenRefreshMiddleware,
)
from asgi_token_refresh._telemetry import DETECTED_BY, DUPLICATES
from asgi_token_refresh.redis import RedisCoordinator, RedisSessionStore
from asgi_token_refresh.testing import capture_telemetry

from .clock import SharedClock


def create_app() -> Starlette:
    env = os.environ
    worker = env.get("ATR_WORKER_ID", str(os.getpid()))
    secret = env["ATR_WORKER_SECRET"]
    coordinator: RedisCoordinator | FileCoordinator | None = None
    if env["ATR_WORKER_COORDINATOR"] == "redis":
        coordinator = RedisCoordinator(
            env["ATR_WORKER_REDIS_URL"], secret_keys=[secret], poll_interval=0.05
        )
    elif env["ATR_WORKER_COORDINATOR"] == "file":
        coordinator = FileCoordinator(env["ATR_WORKER_DIRECTORY"], secret_keys=[secret])
    captured = capture_telemetry()
    # Tokens are issued, and fall due, on the test's wall time: never in the middle of a round.
    client = OAuth2Client.from_discovery(
        env["ATR_WORKER_IDP"],
        client_id="app",
        client_secret="app-secret",
        clock=SharedClock(env["ATR_WORKER_CLOCK"]),
        telemetry=captured.telemetry,
    )
    refresher = Refresher(
        client,
        jitter=0.0,
        timeout=float(env.get("ATR_WORKER_TIMEOUT", "2")),
        coordinator=coordinator,
    )
    store: CookieSessionStore | RedisSessionStore
    if env.get("ATR_WORKER_STORE", "cookie") == "redis":
        store = RedisSessionStore(env["ATR_WORKER_REDIS_URL"], secret_keys=[secret], secure=False)
    else:
        store = CookieSessionStore([secret], secure=False)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse(worker)

    async def login(request: Request) -> Response:
        token: TokenAccessor = request.state.token
        await token.login(await request.body())
        return JSONResponse({"worker": worker})

    async def access_token(request: Request) -> Response:
        token: TokenAccessor = request.state.token
        return JSONResponse({"access_token": await token.get(), "worker": worker})

    async def duplicates(request: Request) -> Response:
        counts: dict[str, int] = {}
        for attributes, point in captured.points(DUPLICATES):
            counts[attributes[DETECTED_BY]] = int(point.value)
        return JSONResponse(counts)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if coordinator is not None:
            await coordinator.aclose()
        if isinstance(store, RedisSessionStore):
            await store.aclose()
        await client.aclose()

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/login", login, methods=["POST"]),
            Route("/token", access_token),
            Route("/duplicates", duplicates),
        ],
        middleware=[
            Middleware(TokenRefreshMiddleware, refresher=refresher, store=store, on_terminal="401")
        ],
        lifespan=lifespan,
    )
