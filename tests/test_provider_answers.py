"""Every token-endpoint answer has a defined outcome: terminal, or transient with the session kept.

A terminal answer (``invalid_grant``, ``invalid_client``, ``unauthorized_client``) ends the
session; anything else a provider can send, however broken, is ``RefreshUnavailable`` (503
with a clamped ``Retry-After``), never another exception, and never text that carries a token
or the client secret.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_token_refresh import (
    MemorySessionStore,
    OAuth2Client,
    ReauthenticationRequired,
    Refresher,
    RefreshUnavailable,
    TokenRefreshMiddleware,
    TokenSet,
)
from asgi_token_refresh.testing import FakeClock

pytestmark = pytest.mark.anyio

REFRESH_TOKEN = "rt-" + "s" * 40
CLIENT_SECRET = "client-secret-" + "x" * 20
NOW = 1_700_000_000.0

Answer = Callable[[], httpx.Response]


def json_answer(status: int, payload: object, **headers: str) -> Answer:
    return lambda: httpx.Response(status, content=json.dumps(payload).encode(), headers=headers)


def raw_answer(status: int, body: bytes, **headers: str) -> Answer:
    return lambda: httpx.Response(status, content=body, headers=headers)


class Provider:
    """A token endpoint that gives one scripted answer to every request, and counts them."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.calls = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return self.answer()


def refresher_for(provider: Provider, clock: FakeClock) -> Refresher:
    client = OAuth2Client(
        client_id="app",
        client_secret=CLIENT_SECRET,
        token_endpoint="https://idp.test/token",
        transport=httpx.MockTransport(provider.handle),
        clock=clock,
        max_response_bytes=64 * 1024,
    )
    return Refresher(client, jitter=0)


def expired_session(clock: FakeClock) -> TokenSet:
    return TokenSet("old-access", clock.time() - 10, clock.time() - 310, REFRESH_TOKEN)


def gzip_bomb() -> bytes:
    return gzip.compress(b"0" * (8 * 1024 * 1024))  # ~8 KB on the wire, 8 MB decoded


TRANSIENT: dict[str, Answer] = {
    "invalid_request": json_answer(400, {"error": "invalid_request"}),
    "invalid_scope": json_answer(400, {"error": "invalid_scope"}),
    "unsupported_grant_type": json_answer(400, {"error": "unsupported_grant_type"}),
    "non-JSON 400": raw_answer(400, b"<html>bad request</html>"),
    "302 to a login page": raw_answer(302, b"", location="https://idp.test/login"),
    "404": raw_answer(404, b"not found"),
    "405": raw_answer(405, b""),
    "500": raw_answer(500, b"oops"),
    "429 Retry-After 3": raw_answer(429, b"", **{"retry-after": "3"}),
    "200 without access_token": json_answer(200, {"token_type": "Bearer"}),
    "200 with a numeric access_token": json_answer(200, {"access_token": 7}),
    "200 expires_in text": json_answer(200, {"access_token": "a", "expires_in": "soon"}),
    "200 expires_in negative": json_answer(200, {"access_token": "a", "expires_in": -1}),
    "200 expires_in true": json_answer(200, {"access_token": "a", "expires_in": True}),
    "200 expires_in 1e309": raw_answer(200, b'{"access_token": "a", "expires_in": 1e309}'),
    "200 expires_in 400 digits": raw_answer(
        200, b'{"access_token": "a", "expires_in": ' + b"9" * 400 + b"}"
    ),
    "200 expires_in 4,300 digits": raw_answer(
        200, b'{"access_token": "a", "expires_in": ' + b"9" * 4300 + b"}"
    ),
    "200 nested 100,000 deep": raw_answer(200, b"[" * 100_000 + b"]" * 100_000),
    "200 with an error": json_answer(200, {"access_token": "a", "error": "invalid_grant"}),
    "200 invalid UTF-8": raw_answer(200, b'{"access_token": "\xff\xfe"}'),
    "204": raw_answer(204, b""),
    "Retry-After: superscript two": lambda: httpx.Response(
        503,
        headers=[(b"retry-after", "²".encode())],  # "²".isdigit() is True
    ),
    "Retry-After: 400 nines": raw_answer(503, b"", **{"retry-after": "9" * 400}),
    "gzip that is not gzip": raw_answer(200, b"plain text", **{"content-encoding": "gzip"}),
    "gzip bomb": raw_answer(200, gzip_bomb(), **{"content-encoding": "gzip"}),
    "1 MB body": raw_answer(200, b'{"access_token": "' + b"a" * 1_000_000 + b'"}'),
}


@pytest.mark.parametrize("name", list(TRANSIENT))
async def test_every_non_terminal_answer_is_transient_and_bounded(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock(NOW)
    provider = Provider(TRANSIENT[name])
    refresher = refresher_for(provider, clock)
    with pytest.raises(RefreshUnavailable) as caught:
        await refresher.ensure_fresh(expired_session(clock))
    error = caught.value
    assert error.reason in ("provider_error", "network_error")
    assert 0 <= error.retry_after <= 120
    rendered = f"{error!s} {error!r} {error.__cause__!r} {vars(error)} {caplog.text}"
    assert REFRESH_TOKEN not in rendered
    assert CLIENT_SECRET not in rendered
    # Remembered for its Retry-After, capped: the provider is not asked again at once.
    with pytest.raises(RefreshUnavailable):
        await refresher.ensure_fresh(expired_session(clock))
    assert provider.calls == 1


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (json_answer(400, {"error": "invalid_grant"}), "invalid_grant"),
        (json_answer(403, {"error": "invalid_grant"}), "invalid_grant"),
        (json_answer(401, {"error": "invalid_client"}), "invalid_client"),
        (json_answer(400, {"error": "unauthorized_client"}), "unauthorized_client"),
    ],
)
async def test_only_the_three_terminal_codes_end_the_session(answer: Answer, reason: str) -> None:
    clock = FakeClock(NOW)
    refresher = refresher_for(Provider(answer), clock)
    with pytest.raises(ReauthenticationRequired) as caught:
        await refresher.ensure_fresh(expired_session(clock))
    assert caught.value.reason == reason


async def test_tokens_the_provider_echoes_are_redacted_everywhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock(NOW)
    echo = f"refresh token {REFRESH_TOKEN} with secret {CLIENT_SECRET} is not acceptable"
    for answer in (
        json_answer(400, {"error": "invalid_request", "error_description": echo}),
        json_answer(400, {"error": "invalid_grant", "error_description": echo}),
        json_answer(400, {"error": "invalid_request", "error_uri": echo}),
    ):
        refresher = refresher_for(Provider(answer), clock)
        with pytest.raises((RefreshUnavailable, ReauthenticationRequired)) as caught:
            await refresher.ensure_fresh(expired_session(clock))
        cause = caught.value.__cause__
        rendered = f"{caught.value!s} {cause!s} {cause!r} {vars(cause or caught.value)}"
        rendered += caplog.text
        assert REFRESH_TOKEN not in rendered
        assert CLIENT_SECRET not in rendered


async def test_a_provider_that_issues_expired_tokens_costs_one_call_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(NOW)
    counter = iter(range(1000))

    def expired_at_once() -> httpx.Response:
        n = next(counter)
        payload = {"access_token": f"at{n}", "refresh_token": f"rt-{n}-" + "z" * 30}
        return httpx.Response(200, json={**payload, "expires_in": 0})

    provider = Provider(expired_at_once)
    refresher = refresher_for(provider, clock)
    session = expired_session(clock)
    for request in range(1, 6):
        session = await refresher.ensure_fresh(session)
        assert provider.calls == request
    assert caplog.text.count("already due") == 1  # said once, not at request rate


async def test_the_browser_is_never_told_to_wait_longer_than_two_minutes() -> None:
    clock = FakeClock(NOW)
    refresher = refresher_for(
        Provider(raw_answer(503, b"", **{"retry-after": "99999999999"})), clock
    )
    store = MemorySessionStore(secure=False, clock=clock)

    async def login(request: Request) -> PlainTextResponse:
        await request.state.token.login(expired_session(clock))
        return PlainTextResponse("in")

    async def api(request: Request) -> PlainTextResponse:
        return PlainTextResponse(await request.state.token.get())

    app = Starlette(
        routes=[Route("/login", login), Route("/api", api)],
        middleware=[Middleware(TokenRefreshMiddleware, refresher=refresher, store=store)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as browser:
        await browser.get("/login")
        response = await browser.get("/api")
        again = await browser.get("/api")
    assert response.status_code == again.status_code == 503
    assert response.headers["retry-after"] == "120"
    assert len(store) == 1  # the session is kept
