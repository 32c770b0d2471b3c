"""The small pieces of HTTP that the login routes need: reading a request, answering it.

Plain ASGI, no framework: what the login routes read (cookies, host, origin) and send
(redirects, plain-text answers, a 503 with ``Retry-After``), and the one rule for where a
browser may be sent back to.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote, urlsplit

from ._errors import RefreshUnavailable
from ._oauth_messages import MAX_RETRY_AFTER

__all__ = [
    "Receive",
    "Scope",
    "Send",
    "mount_path",
    "origin",
    "redirect",
    "route_path",
    "safe_return_path",
    "same_origin",
    "text",
    "unavailable",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def safe_return_path(value: str | None) -> str:
    """``value`` if it is a path on this site, else ``/``: never ``//host``, ``/\\host``, a
    scheme, or any of those once percent-decoded (an open redirect otherwise)."""
    if not value:
        return "/"
    decoded = value
    for _ in range(3):  # nested encodings: %252F...
        if not decoded.startswith("/") or decoded.startswith(("//", "/\\")):
            return "/"
        if "\\" in decoded or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
            return "/"
        once = unquote(decoded)
        if once == decoded:
            return value
        decoded = once
    return "/"


def route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def mount_path(scope: Scope) -> str:
    root: str = scope.get("root_path", "")
    return root.rstrip("/")


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers", ())}


def origin(scope: Scope) -> str:
    host = _headers(scope).get(b"host", b"").decode("latin-1")
    if not host and scope.get("server"):
        server_host, port = scope["server"]
        host = f"{server_host}:{port}"
    return f"{scope.get('scheme', 'http')}://{host}"


def same_origin(scope: Scope) -> bool:
    """A browser says where a request comes from: ``Sec-Fetch-Site`` (every current browser),
    else ``Origin`` (sent with every cross-origin POST). A request with neither is not a
    browser's cross-site request."""
    headers = _headers(scope)
    site = headers.get(b"sec-fetch-site")
    if site is not None:
        return site in (b"same-origin", b"none")
    origin = headers.get(b"origin")
    if origin is None:
        return True
    # The host, not the scheme: behind a TLS proxy the app may see http for an https page. No
    # Host to compare with: refused, or ``Origin: null`` (no netloc either) would pass.
    host = headers.get(b"host", b"").decode("latin-1")
    return bool(host) and urlsplit(origin.decode("latin-1")).netloc == host


async def redirect(send: Send, location: str, cookies: list[str]) -> None:
    headers = [(b"location", location.encode("latin-1")), (b"cache-control", b"no-store")]
    headers += [(b"set-cookie", c.encode("latin-1")) for c in cookies]
    headers.append((b"content-length", b"0"))
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def text(
    send: Send,
    status: int,
    text: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    cookies: list[str] | None = None,
) -> None:
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *(extra or []),
        *((b"set-cookie", c.encode("latin-1")) for c in cookies or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def unavailable(
    send: Send, exc: RefreshUnavailable, cookies: list[str] | None = None
) -> None:
    retry_after = str(min(int(MAX_RETRY_AFTER), max(1, math.ceil(exc.retry_after))))
    await text(
        send,
        503,
        "The login provider is unavailable. Please try again shortly.",
        [(b"retry-after", retry_after.encode())],
        cookies=cookies,
    )
