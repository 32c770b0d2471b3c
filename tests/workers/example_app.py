"""An example app (``examples/``) as a worker process, on the test's wall time.

    ATR_EXAMPLE=starlette ATR_WORKER_CLOCK=/path/to/wall-time \
        python -m uvicorn --factory tests.workers.example_app:create_app --workers 4

``ATR_EXAMPLE`` is ``starlette`` or ``fastapi``; ``ATR_WORKER_CLOCK`` the file holding the wall
time, which only the test moves (``clock.py``). Everything else is the example's own
configuration from the environment (``OIDC_ISSUER``, ``SESSION_SECRET``, ``REDIS_URL``,
``ATR_COORDINATOR``...), as in production. ``GET /healthz`` answers the worker's PID, so that
the test knows when every worker of a server is up.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse

from examples import fastapi_app, starlette_app

from .clock import SharedClock

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def create_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    clock = SharedClock(os.environ["ATR_WORKER_CLOCK"])
    app: Starlette
    if os.environ["ATR_EXAMPLE"] == "fastapi":
        app = fastapi_app.create_app(clock=clock)
    else:
        app = starlette_app.create_app(clock=clock)
    health = PlainTextResponse(str(os.getpid()))

    async def worker(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/healthz":
            await health(scope, receive, send)
        else:
            await app(scope, receive, send)

    return worker
