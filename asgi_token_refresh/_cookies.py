"""Cookie mechanics shared by every store: parsing ``Cookie``, writing ``Set-Cookie``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

from ._errors import ConfigurationError
from ._tokens import TokenSet

__all__ = [
    "CookieWriter",
    "SameSite",
    "parse_cookie_header",
    "request_cookies",
    "session_max_age",
    "validate_cookie_options",
]

SameSite = Literal["lax", "strict", "none"]
#: How long a session cookie lives when the provider does not say (30 days).
DEFAULT_MAX_AGE = 30 * 24 * 3600


def request_cookies(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The cookies of an ASGI request's ``headers``. HTTP/2 may split them over several
    ``cookie`` headers: parsed as one, in order (the first value of a name wins), in linear
    time however many there are."""
    header: bytes | None = None
    more: list[bytes] | None = None
    for name, value in headers:
        if name == b"cookie":
            if header is None:
                header = value
            elif more is None:
                more = [header, value]
            else:
                more.append(value)
    if more is not None:
        header = b"; ".join(more)
    return parse_cookie_header(header.decode("latin-1")) if header else {}


def parse_cookie_header(header: str) -> dict[str, str]:
    """Parse a ``Cookie`` request header; malformed pairs are skipped, the first value wins."""
    cookies: dict[str, str] = {}
    for pair in header.split(";"):
        name, sep, value = pair.partition("=")
        name = name.strip()
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


def validate_cookie_options(name: str, same_site: str, secure: bool, max_age: float) -> None:
    if not name or any(c in name for c in ' ;,="\t\r\n'):
        raise ConfigurationError(f"cookie name {name!r} is not a valid cookie name")
    if same_site not in ("lax", "strict", "none"):
        raise ConfigurationError("same_site must be 'lax', 'strict' or 'none'")
    if same_site == "none" and not secure:
        raise ConfigurationError("browsers reject SameSite=None cookies without Secure")
    if max_age <= 0:
        raise ConfigurationError("max_age must be a positive number of seconds")


class CookieWriter:
    """Builds ``Set-Cookie`` values with one set of attributes."""

    def __init__(
        self, *, path: str, domain: str | None, secure: bool, same_site: SameSite, max_age: float
    ) -> None:
        attributes = [f"Path={path}"]
        if domain:
            attributes.append(f"Domain={domain}")
        attributes.append("HttpOnly")
        if secure:
            attributes.append("Secure")
        attributes.append(f"SameSite={same_site.capitalize()}")
        self._attributes = "; ".join(attributes)
        self.max_age = max_age

    def set(self, name: str, value: str, max_age: float | None = None) -> str:
        # Rounded up, never to 0: Max-Age=0 deletes the cookie that was just set.
        seconds = max(1, math.ceil(self.max_age if max_age is None else max_age))
        return f"{name}={value}; Max-Age={seconds}; {self._attributes}"

    def delete(self, name: str) -> str:
        return f"{name}=; Max-Age=0; {self._attributes}"


def session_max_age(token_set: TokenSet, default: float) -> float:
    # Keycloak and others say how long the refresh token lives; the cookie should not outlive it.
    seconds = token_set.extra.get("refresh_expires_in")
    if (
        isinstance(seconds, int | float)
        and not isinstance(seconds, bool)
        and 0 < seconds < math.inf  # float("inf") and 1e999 are no lifetimes
    ):
        return min(float(seconds), default)
    return default
