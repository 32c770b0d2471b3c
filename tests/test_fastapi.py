"""FastAPI: ``Token`` is a documented security dependency; the middleware's answers are in /docs."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.testclient import TestClient

from asgi_token_refresh import MemorySessionStore, OAuth2Client, TokenRefreshMiddleware
from asgi_token_refresh.fastapi import RESPONSES, Token


def test_routes_that_take_a_token_are_documented_as_protected_with_their_401_and_503() -> None:
    app = FastAPI(responses=RESPONSES)

    @app.get("/me")
    async def me(token: Token) -> dict[str, str]:
        return {}

    @app.get("/public")
    async def public() -> dict[str, str]:
        return {}

    spec = app.openapi()
    scheme = spec["components"]["securitySchemes"]["TokenRefreshSession"]
    assert (scheme["type"], scheme["in"]) == ("apiKey", "cookie")
    assert spec["paths"]["/me"]["get"]["security"] == [{"TokenRefreshSession": []}]
    assert "security" not in spec["paths"]["/public"]["get"]
    responses = spec["paths"]["/me"]["get"]["responses"]
    assert "reauthentication_required" in responses["401"]["description"]
    assert "Retry-After" in responses["503"]["headers"]


def test_token_finds_the_accessor_under_the_middlewares_own_state_key() -> None:
    app = FastAPI()

    @app.get("/signed-in")
    async def signed_in(token: Token) -> dict[str, bool]:
        return {"signed_in": await token.is_authenticated()}

    client = OAuth2Client(
        client_id="app", client_secret="s", token_endpoint="https://idp.test/token"
    )
    wrapped = TokenRefreshMiddleware(
        app, client=client, store=MemorySessionStore(secure=False), state_key="tokens"
    )
    with TestClient(wrapped) as browser:
        response = browser.get("/signed-in")
    assert (response.status_code, response.json()) == (200, {"signed_in": False})
