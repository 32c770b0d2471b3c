"""FastAPI integration: the accessor as a typed dependency.

    from asgi_token_refresh.fastapi import Token

    @app.get("/me")
    async def me(token: Token) -> dict[str, str]:
        return {"authorization": (await token.headers())["Authorization"][:10] + "..."}

``Token`` is ``Annotated[TokenAccessor, Depends(token_accessor)]``; the middleware must be
installed (``app.add_middleware(TokenRefreshMiddleware, ...)``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from ._accessor import TokenAccessor
from ._errors import ConfigurationError

__all__ = ["Token", "token_accessor"]


def token_accessor(connection: HTTPConnection) -> TokenAccessor:
    """The request's :class:`TokenAccessor` (HTTP and WebSocket endpoints alike)."""
    accessor = connection.scope.get("state", {}).get("token")
    if not isinstance(accessor, TokenAccessor):
        raise ConfigurationError("request.state.token is missing: add TokenRefreshMiddleware")
    return accessor


Token = Annotated[TokenAccessor, Depends(token_accessor)]
