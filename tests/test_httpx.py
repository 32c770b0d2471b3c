"""TokenAuth and per-request clients: bearer injection, one 401 → one refresh → one retry."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_token_refresh import (
    ConfigurationError,
    MachineTokens,
    MemorySessionStore,
    ReauthenticationRequired,
    Refresher,
    SessionTokens,
    TokenAuth,
    TokenParams,
    TokenRefreshMiddleware,
)
from asgi_token_refresh.testing import FakeClock, FakeIdP, Fault, serve

from .helpers import ISSUER, login

pytestmark = pytest.mark.anyio
EXPIRED = 300.0


class RecordingAPI:
    """An ASGI API in front of the provider's userinfo: records what it was sent and can
    reject the first ``reject`` calls with 401 or echo request bodies."""

    def __init__(self, idp: FakeIdP, reject: int = 0, always_401: bool = False) -> None:
        self.idp = idp
        self.reject = reject
        self.always_401 = always_401
        self.seen: list[tuple[str, bytes]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode()
        self.seen.append((authorization, body))
        if self.always_401 or len(self.seen) <= self.reject:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        scope = {**scope, "path": "/userinfo", "method": "GET"}
        await self.idp(scope, _empty_body, send)


async def _empty_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


@pytest.fixture
def api(idp: FakeIdP) -> RecordingAPI:
    return RecordingAPI(idp)


def api_client(api: RecordingAPI, auth: httpx.Auth) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url=ISSUER, auth=auth)


async def test_bearer_is_injected_from_the_session(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, api: RecordingAPI
) -> None:
    session = login(idp, clock)
    async with api_client(api, TokenAuth(SessionTokens(refresher, session))) as client:
        response = await client.get("/me")
    assert response.json()["sub"] == "alice"
    assert api.seen == [(f"Bearer {session.access_token}", b"")]
    assert idp.calls("token") == 0


async def test_a_401_refreshes_once_and_retries_once_with_the_new_token_and_body(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    api = RecordingAPI(idp, reject=1)
    session = login(idp, clock)
    source = SessionTokens(refresher, session)
    async with api_client(api, TokenAuth(source)) as client:
        response = await client.post("/me", content=b'{"x": 1}')
    assert response.status_code == 200
    assert idp.token_calls("refresh_token") == 1
    (first, first_body), (second, second_body) = api.seen
    assert first == f"Bearer {session.access_token}"
    assert second == f"Bearer {source.token_set.access_token}" != first
    assert first_body == second_body == b'{"x": 1}'


async def test_a_second_401_raises_reauthentication_required(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    api = RecordingAPI(idp, always_401=True)
    async with api_client(api, TokenAuth(SessionTokens(refresher, login(idp, clock)))) as client:
        with pytest.raises(ReauthenticationRequired) as caught:
            await client.get("/me")
    assert caught.value.reason == "downstream_401"
    assert len(api.seen) == 2
    assert idp.token_calls("refresh_token") == 1


async def test_a_second_401_can_be_returned_instead(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    api = RecordingAPI(idp, always_401=True)
    auth = TokenAuth(SessionTokens(refresher, login(idp, clock)), on_terminal="response")
    async with api_client(api, auth) as client:
        response = await client.get("/me")
    assert response.status_code == 401
    assert len(api.seen) == 2


async def test_a_token_endpoint_refusal_is_never_retried(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, api: RecordingAPI
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    idp.script(Fault.invalid_grant(status=403))
    async with api_client(api, TokenAuth(SessionTokens(refresher, session))) as client:
        with pytest.raises(ReauthenticationRequired) as caught:
            await client.get("/me")
    assert caught.value.reason == "invalid_grant"
    assert api.seen == []
    assert idp.calls("token") == 1


async def test_streamed_bodies_are_not_replayed_when_buffering_is_off(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    api = RecordingAPI(idp, reject=1)

    async def upload() -> AsyncIterator[bytes]:
        yield b"chunk-1 "
        yield b"chunk-2"

    auth = TokenAuth(SessionTokens(refresher, login(idp, clock)), replay_body=False)
    async with api_client(api, auth) as client:
        response = await client.post("/me", content=upload())
    assert response.status_code == 401  # returned as is: the stream was consumed
    assert len(api.seen) == 1
    assert idp.calls("token") == 0


async def test_a_401_on_a_streamed_upload_is_refreshed_and_retried_once_with_the_whole_body(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    api = RecordingAPI(idp, reject=1)

    async def upload() -> AsyncIterator[bytes]:
        yield b"chunk-1 "
        yield b"chunk-2"

    session = login(idp, clock)
    auth = TokenAuth(SessionTokens(refresher, session))  # replay_body=True, the default
    async with api_client(api, auth) as client:
        response = await client.post("/me", content=upload())
    assert response.status_code == 200
    assert [body for _, body in api.seen] == [b"chunk-1 chunk-2"] * 2
    first, second = (authorization for authorization, _ in api.seen)
    assert first == f"Bearer {session.access_token}"
    assert second != first
    assert idp.token_calls("refresh_token") == 1


def test_a_401_on_a_sync_streamed_upload_is_retried_once_with_the_whole_body(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    seen: list[tuple[str, bytes]] = []

    class API(httpx.BaseTransport):  # reads the body off the wire, as a real transport does
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            stream = request.stream
            assert isinstance(stream, httpx.SyncByteStream)
            seen.append((request.headers["authorization"], b"".join(stream)))
            return httpx.Response(401 if len(seen) == 1 else 200)

    def upload() -> Iterator[bytes]:
        yield b"part-1 "
        yield b"part-2"

    auth = TokenAuth(SessionTokens(refresher, login(idp, clock)).sync)
    with httpx.Client(transport=API(), auth=auth) as client:
        response = client.post("https://api.test/upload", content=upload())
    assert response.status_code == 200
    assert [body for _, body in seen] == [b"part-1 part-2"] * 2
    assert idp.token_calls("refresh_token") == 1


async def test_machine_tokens_refresh_a_rejected_token_once(
    refresher: Refresher, idp: FakeIdP
) -> None:
    api = RecordingAPI(idp, reject=1)
    async with api_client(api, TokenAuth(MachineTokens(refresher, TokenParams(scope="api")))) as c:
        response = await c.get("/me")
    assert response.status_code == 200
    assert idp.token_calls("client_credentials") == 2
    assert api.seen[0][0] != api.seen[1][0]


async def test_no_session_continues_anonymously_when_asked(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, api: RecordingAPI
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    idp.script(Fault.invalid_grant())
    auth = TokenAuth(SessionTokens(refresher, session), anonymous=MachineTokens(refresher))
    async with api_client(api, auth) as client:
        response = await client.get("/me")
    assert response.status_code == 200
    assert response.json()["sub"] == "app"  # the client itself, not alice
    assert idp.token_calls("client_credentials") == 1


def test_a_sync_client_needs_a_sync_source(refresher: Refresher) -> None:
    auth = TokenAuth(MachineTokens(refresher))
    with (
        httpx.Client(auth=auth, base_url=ISSUER) as client,
        pytest.raises(ConfigurationError, match=r"use \.sync"),
    ):
        client.get("/me")


async def test_an_async_client_needs_an_async_source(refresher: Refresher, idp: FakeIdP) -> None:
    machine = MachineTokens(refresher)
    async with api_client(RecordingAPI(idp), TokenAuth(machine.sync)) as client:
        with pytest.raises(ConfigurationError, match="async token source"):
            await client.get("/me")


def test_sync_clients_in_worker_threads_share_the_flight(
    refresher: Refresher, clock: FakeClock, idp: FakeIdP
) -> None:
    # The API: the provider's own userinfo over real sockets; a sync httpx.Client per thread.
    with serve(idp) as base_url:
        session = login(idp, clock)
        clock.advance(EXPIRED)
        subjects: list[str] = []

        def job() -> None:
            auth = TokenAuth(SessionTokens(refresher, session).sync)
            with httpx.Client(base_url=base_url, auth=auth) as client:
                subjects.append(client.get("/userinfo").json()["sub"])

        threads = [threading.Thread(target=job) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert subjects == ["alice"] * 8
    assert idp.token_calls("refresh_token") == 1


# -- request.state.token.client() -----------------------------------------------------------


async def test_per_request_clients_never_mix_users(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    api = RecordingAPI(idp)

    async def login_route(request: Request) -> JSONResponse:
        await request.state.token.login(idp.issue(request.query_params["user"]))
        return JSONResponse({})

    async def me(request: Request) -> JSONResponse:
        async with request.state.token.client(base_url=ISSUER, transport=api_transport) as http:
            response = await http.get("/me")
        return JSONResponse(response.json())

    api_transport = httpx.ASGITransport(app=api)
    app = Starlette(
        routes=[Route("/login", login_route), Route("/me", me)],
        middleware=[
            Middleware(TokenRefreshMiddleware, refresher=refresher, store=MemorySessionStore())
        ],
    )
    users = [f"user{i}" for i in range(10)]
    browsers = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://app.test")
        for _ in users
    ]
    for user, browser in zip(users, browsers, strict=True):
        await browser.get("/login", params={"user": user})
    clock.advance(EXPIRED)  # everyone refreshes inside the storm below
    answers = await asyncio.gather(*(b.get("/me") for b in browsers for _ in range(5)))
    for browser in browsers:
        await browser.aclose()
    assert [a.json()["sub"] for a in answers] == [u for u in users for _ in range(5)]
    assert idp.token_calls("refresh_token") == 10


async def test_the_per_request_client_refuses_a_second_auth(
    refresher: Refresher, idp: FakeIdP
) -> None:
    async def endpoint(request: Request) -> JSONResponse:
        with pytest.raises(ConfigurationError, match="no auth="):
            request.state.token.client(auth=("u", "p"))
        return JSONResponse({})

    app = TokenRefreshMiddleware(
        Starlette(routes=[Route("/", endpoint)]), refresher=refresher, store=MemorySessionStore()
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://a") as b:
        assert (await b.get("/")).status_code == 200


def test_auth_repr_names_no_token(refresher: Refresher, idp: FakeIdP, clock: FakeClock) -> None:
    session = login(idp, clock)
    text = repr(TokenAuth(SessionTokens(refresher, session)))
    assert session.access_token not in text
    assert (session.refresh_token or "-") not in text
