"""The fake provider's HTTP over ASGI: bodies, forms, client authentication, errors, responses.

Standard library only; no framework, so the fake provider runs wherever the library does.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[_Message]]
Send = Callable[[_Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Reject(Exception):
    """An OAuth error answer (RFC 6749 §5.2), raised while handling a request."""

    def __init__(
        self, error: str, description: str, *, status: int = 400, outcome: str = ""
    ) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status
        self.outcome = outcome or error


def invalid_client() -> Reject:
    return Reject("invalid_client", "client authentication failed", status=401)


def authenticate_client(
    clients: Mapping[str, str | None], form: Mapping[str, str], headers: Mapping[str, str]
) -> str:
    """The authenticated client_id (RFC 6749 §2.3.1), or raise ``invalid_client``."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise invalid_client()
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            raise invalid_client() from None
        raw_id, colon, raw_secret = decoded.partition(":")
        if not colon:
            raise invalid_client()
        # §2.3.1: id and secret are form-urlencoded before being put into Basic.
        client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        if "client_secret" in form:
            raise Reject("invalid_request", "more than one client authentication method")
        if form.get("client_id", client_id) != client_id:
            raise invalid_client()
    else:
        client_id = form.get("client_id", "")
        secret = form.get("client_secret", "")
    if client_id not in clients:
        raise invalid_client()
    expected = clients[client_id]
    ok = not secret if expected is None else hmac.compare_digest(secret.encode(), expected.encode())
    if not ok:
        raise invalid_client()
    return client_id


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "text/plain"


def json_response(status: int, payload: Mapping[str, Any], *headers: tuple[str, str]) -> Response:
    # RFC 6749 §5.1: token answers must not be cached; harmless on the other endpoints.
    headers = (("cache-control", "no-store"), ("pragma", "no-cache"), *headers)
    return Response(status, json.dumps(payload).encode(), headers, "application/json")


def error_response(reject: Reject) -> Response:
    extra = [("www-authenticate", 'Basic realm="fake-idp"')] if reject.status == 401 else []
    body = {"error": reject.error, "error_description": reject.description}
    return json_response(reject.status, body, *extra)


def parse_form(headers: Mapping[str, str], body: bytes) -> dict[str, str] | None:
    """A form body as a dict; None when it is not one or repeats a parameter (RFC 6749 §3.1)."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        return None
    form = dict(pairs)
    return form if len(form) == len(pairs) else None


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def send_response(send: Send, response: Response) -> None:
    headers = [(b"content-type", response.content_type.encode())]
    headers += [(k.encode(), v.encode("latin-1")) for k, v in response.headers]
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
