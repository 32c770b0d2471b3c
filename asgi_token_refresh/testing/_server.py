"""Any ASGI app on a real loopback socket, for tests that need real HTTP between the parts."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from ._http import ASGIApp


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
