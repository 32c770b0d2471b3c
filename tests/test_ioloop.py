"""Invariant 8: nothing loop-bound at import or construction; callers on any loop or thread."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from asgi_token_refresh import Refresher, TokenSet
from asgi_token_refresh.testing import FakeClock, FakeIdP

from .helpers import login


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_importing_and_constructing_start_no_thread_and_no_loop() -> None:
    result = run_python(
        """
        import asyncio, threading
        from asgi_token_refresh import OAuth2Client, Refresher
        client = OAuth2Client.from_discovery("https://idp.test", client_id="a", client_secret="s")
        Refresher.shared(client)
        assert threading.active_count() == 1, threading.enumerate()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            print("ok")
        """
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_a_forked_child_refreshes_on_its_own_io_loop() -> None:
    result = run_python(
        """
        import asyncio, os
        from asgi_token_refresh import OAuth2Client, Refresher, TokenSet
        from asgi_token_refresh.testing import FakeClock, FakeIdP

        clock = FakeClock()
        idp = FakeIdP(clock=clock)
        client = OAuth2Client(client_id="app", client_secret="app-secret",
                              token_endpoint="https://idp.test/token",
                              transport=idp.transport(), clock=clock)
        refresher = Refresher(client, jitter=0)

        def session(user):
            return TokenSet.from_token_response(idp.issue(user), issued_at=clock.time(),
                                                default_lifetime=60)

        first, second = session("parent"), session("child")
        clock.advance(300)
        asyncio.run(refresher.ensure_fresh(first))      # the parent's I/O loop is running
        pid = os.fork()
        if pid == 0:
            new = asyncio.run(refresher.ensure_fresh(second))
            os._exit(0 if new.refresh_token != second.refresh_token else 3)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
        """
    )
    assert result.stdout.strip() == "child exit 0", result.stderr


def test_testclient_requests_on_fresh_loops_and_sync_endpoints_share_the_refresher(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    sessions: dict[str, TokenSet] = {"alice": login(idp, clock)}

    async def async_endpoint(request: Request) -> JSONResponse:
        token_set = await refresher.ensure_fresh(sessions["alice"])
        sessions["alice"] = token_set
        return JSONResponse({"token": token_set.access_token})

    def sync_endpoint(request: Request) -> JSONResponse:  # runs in Starlette's threadpool
        token_set = refresher.sync.ensure_fresh(sessions["alice"])
        sessions["alice"] = token_set
        return JSONResponse({"token": token_set.access_token})

    app = Starlette(routes=[Route("/async", async_endpoint), Route("/sync", sync_endpoint)])
    browser = TestClient(app)  # not a context manager: a new event loop per request
    seen = []
    for path in ["/async", "/sync", "/async", "/sync"]:
        clock.advance(300)
        response = browser.get(path)
        assert response.status_code == 200
        seen.append(response.json()["token"])
    assert len(set(seen)) == 4
    assert idp.token_calls("refresh_token", "success") == 4
    assert idp.grants_revoked == 0
