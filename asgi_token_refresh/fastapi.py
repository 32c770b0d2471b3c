"""FastAPI integration: the accessor as a typed dependency, documented in OpenAPI.

    from asgi_token_refresh.fastapi import RESPONSES, Token

    app = FastAPI(responses=RESPONSES)          # the 401 and 503 answers appear in /docs
    app.add_middleware(TokenRefreshMiddleware, client=client, store=store)

    @app.get("/me")
    async def me(token: Token) -> dict[str, str]:
        return (await token.claims()) or {}

``Token`` is ``Annotated[TokenAccessor, Depends(token_accessor)]``. Every operation that uses
it declares the session cookie as its security scheme, so ``/docs`` shows it as protected.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends
from fastapi.openapi.models import APIKey, APIKeyIn
from fastapi.security.base import SecurityBase
from starlette.requests import HTTPConnection

from ._accessor import TokenAccessor
from ._errors import ConfigurationError
from ._middleware import TERMINAL_ERROR_CODE, UNAVAILABLE_ERROR_CODE

__all__ = ["RESPONSES", "Token", "token_accessor"]


class _SessionCookie(SecurityBase):
    """The session cookie TokenRefreshMiddleware's store sets at login, as an OpenAPI scheme."""

    def __init__(self) -> None:
        self.model = APIKey(
            **{"in": APIKeyIn.cookie},  # type: ignore[arg-type]
            name="atr_session",
            description=(
                "The session cookie set at login (named by the session store: atr_session "
                "for cookie sessions, atr_sid for server-side ones)."
            ),
        )
        self.scheme_name = "TokenRefreshSession"

    async def __call__(self, connection: HTTPConnection) -> None:
        return None  # the middleware reads the cookie; this only documents it


_session_cookie = _SessionCookie()


def token_accessor(
    connection: HTTPConnection, _scheme: Annotated[None, Depends(_session_cookie)] = None
) -> TokenAccessor:
    """The request's :class:`TokenAccessor` (HTTP and WebSocket endpoints alike), under
    ``request.state.token`` or whatever ``state_key`` the middleware was given."""
    state = connection.scope.get("state", {})
    accessor = state.get("token")
    if isinstance(accessor, TokenAccessor):
        return accessor
    for value in state.values():  # TokenRefreshMiddleware(state_key=...)
        if isinstance(value, TokenAccessor):
            return value
    raise ConfigurationError("request.state.token is missing: add TokenRefreshMiddleware")


Token = Annotated[TokenAccessor, Depends(token_accessor)]

_ERROR_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "reason": {"type": "string"}},
}

#: The answers TokenRefreshMiddleware gives for any route that needs a token, for OpenAPI:
#: ``FastAPI(responses=RESPONSES)`` or ``@app.get(..., responses=RESPONSES)``.
RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "description": f"The session is missing or dead: log in again ({TERMINAL_ERROR_CODE})",
        "content": {"application/json": {"schema": _ERROR_BODY}},
    },
    503: {
        "description": (
            f"The login provider or the session store is unavailable; the session is kept "
            f"and Retry-After says when to try again ({UNAVAILABLE_ERROR_CODE})"
        ),
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": _ERROR_BODY}},
    },
}
