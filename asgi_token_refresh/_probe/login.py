"""``probe``'s browser login: authorization code with PKCE S256, ``state`` and ``nonce``, to a
loopback redirect the command serves itself (RFC 8252 §7.3), as CLI logins do.

The server is a few lines of asyncio on ``127.0.0.1``: it answers ``GET /callback`` (and a
plain 404 to anything else, such as a browser's favicon request) until one callback with this
login's ``state`` arrives, then stops. The authorization URL is printed, not opened: the
person running the probe picks the browser (and the throwaway account).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

from .._oauth_messages import AuthorizationRequest, new_authorization_request
from .provider import ProbeError, ProbeProvider, TokenAnswer

__all__ = ["SCOPE", "browser_login"]

#: What the probe's login asks for: an ID token and a refresh token (with prompt=consent,
#: which OIDC Core §11 needs before a provider grants offline_access).
SCOPE = "openid offline_access"
CALLBACK_PATH = "/callback"
_MAX_REQUEST = 16 * 1024
_PAGE = (
    "<!doctype html><title>asgi-token-refresh probe</title>"
    "<p>{message}</p><p>You can close this tab.</p>"
)
# Errors a login answers that say the provider's configuration or the user refused: exit 2.
_TRANSIENT_LOGIN_ERRORS = frozenset({"server_error", "temporarily_unavailable"})


async def browser_login(
    provider: ProbeProvider, *, port: int, patience: float, say: Callable[[str], None]
) -> TokenAnswer:
    """Log in through the browser; the code exchange's answer, with a refresh token."""
    endpoint = provider.endpoints.urls["authorization"]
    if endpoint is None:
        raise ProbeError(
            "the provider publishes no authorization_endpoint: pass --refresh-token instead",
            exit_code=2,
        )
    callback: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    login: AuthorizationRequest | None = None  # made once the port is known

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            assert login is not None  # made before the first await after listening
            await _answer(reader, writer, login.state, provider.issuer, callback)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a broken browser connection: the login may still come on another one
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(handle, "127.0.0.1", port, limit=_MAX_REQUEST)
    except OSError as exc:
        raise ProbeError(
            f"cannot listen on 127.0.0.1:{port} for the login's redirect ({exc.strerror}): "
            "pass another --redirect-port",
            exit_code=2,
        ) from None
    bound = server.sockets[0].getsockname()[1]
    redirect_uri = f"http://127.0.0.1:{bound}{CALLBACK_PATH}"
    login = new_authorization_request(
        endpoint, client_id=provider.client_id, redirect_uri=redirect_uri, scope=SCOPE
    )
    provider.remember_secret(login.code_verifier)
    say(
        "Log in with a throwaway account: open this URL in a browser (the redirect URI "
        f"{redirect_uri} must be registered for the client):\n\n    {login.url}\n\n"
        f"Waiting up to {patience:g} s for the redirect..."
    )
    async with server:
        try:
            params = await asyncio.wait_for(callback, patience)
        except TimeoutError:
            raise ProbeError(
                f"no login came back to {redirect_uri} within {patience:g} s (is that redirect "
                "URI registered for the client? --login-timeout waits longer)",
                exit_code=2,
            ) from None
    if "error" in params:
        raise _login_refused(params["error"])
    provider.remember_secret(params["code"])
    answer = await provider.token(
        {
            "grant_type": "authorization_code",
            "code": params["code"],
            "redirect_uri": redirect_uri,
            "code_verifier": login.code_verifier,
        }
    )
    if not answer.ok:
        exit_code = 2 if answer.error in ("invalid_client", "unauthorized_client") else 1
        raise ProbeError(
            f"the provider refused the login's code (HTTP {answer.status} {answer.error})",
            exit_code=exit_code,
        )
    if answer.refresh_token is None:
        raise ProbeError(
            "the login issued no refresh token: offline_access was not granted (allow the "
            "refresh_token grant and the offline_access scope for this client)",
            exit_code=2,
        )
    return answer


async def _answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    state: str,
    issuer: str,
    callback: asyncio.Future[dict[str, str]],
) -> None:
    """Read one request; answer it; resolve ``callback`` with this login's parameters."""
    head = await reader.readuntil(b"\r\n\r\n")
    method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    parts = urlsplit(target)
    params = dict(parse_qsl(parts.query))
    if method != "GET" or parts.path != CALLBACK_PATH:
        status, message = "404 Not Found", "Not the probe's callback."
    elif params.get("state") != state or params.get("iss", issuer).rstrip("/") != issuer:
        # Another login's redirect, or a forged one: refused, and the probe keeps waiting.
        status, message = "400 Bad Request", "This redirect is not the probe's login."
    elif "error" not in params and "code" not in params:
        status, message = "400 Bad Request", "The redirect carries neither a code nor an error."
    else:
        refused = "error" in params
        status = "200 OK"
        message = "The provider refused the login." if refused else "Login received: probing."
        if not callback.done():
            callback.set_result(params)
    page = _PAGE.format(message=message).encode()
    response = (
        f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(page)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    writer.write(response.encode() + page)
    with contextlib.suppress(OSError):
        await writer.drain()


def _login_refused(error: str) -> ProbeError:
    # The error code only: its description is the provider's text, shown in the browser.
    plain = error.isascii() and error.replace("_", "").isalnum() and len(error) <= 64
    code = error if plain else "invalid"
    if code == "invalid_scope":
        hint = (
            ": the client may not ask for offline_access (allow it, with the refresh_token "
            "grant, in the provider's client settings)"
        )
    elif code == "access_denied":
        hint = ": the login or the consent was declined"
    else:
        hint = ""
    exit_code = 1 if code in _TRANSIENT_LOGIN_ERRORS else 2
    return ProbeError(f"the provider refused the login ({code}){hint}", exit_code=exit_code)
