"""TokenSet: what a token endpoint returned, and when it stops being fresh."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import TokenEndpointError

__all__ = ["TokenSet"]

# Fields of an RFC 6749 §5.1 response that TokenSet models itself; the rest go to ``extra``.
_KNOWN_FIELDS = frozenset(
    {"access_token", "refresh_token", "id_token", "token_type", "expires_in", "scope"}
)


# Not a secret: every process must derive the same fraction. The key only separates this use
# of the hash from any other.
_JITTER_KEY = b"asgi-token-refresh/jitter/v1"


def _invalid(description: str) -> TokenEndpointError:
    return TokenEndpointError("invalid_response", error_description=description)


@dataclass(frozen=True, slots=True, repr=False)
class TokenSet:
    """An immutable set of tokens with its expiry, in wall-clock seconds since the epoch.

    ``generation`` counts the refreshes since login (a refresh is its predecessor's plus one):
    it orders the token sets of one session, so that a slower writer never moves a session
    back, whatever the clocks say. ``repr`` shows which tokens are present, never their values.
    """

    access_token: str
    expires_at: float
    issued_at: float
    refresh_token: str | None = None
    id_token: str | None = None
    token_type: str = "Bearer"
    scope: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)
    #: The ID token's claims, as verified at login (signature, issuer, audience, expiry,
    #: nonce); kept through refreshes. ``None`` for sessions that did not log in through OIDC.
    claims: Mapping[str, Any] | None = field(default=None, hash=False)
    #: Refreshes since login: 0 for a login's tokens (or tokens of unknown lineage).
    generation: int = 0
    # Cache of jitter_fraction (-1: not computed yet); not part of the value.
    _jitter: float = field(default=-1.0, init=False, repr=False, compare=False, hash=False)

    @property
    def lifetime(self) -> float:
        """Seconds between issue and expiry."""
        return self.expires_at - self.issued_at

    def newer_than(self, other: TokenSet) -> bool:
        """Whether this is a later generation of ``other``'s session: more refreshes since
        login, or, for token sets of unknown lineage (both generation 0), issued later."""
        if self.generation != other.generation:
            return self.generation > other.generation
        return self.generation == 0 and self.issued_at > other.issued_at

    @property
    def jitter_fraction(self) -> float:
        """A number in [0, 1) fixed by this generation's refresh token (its access token when
        there is none): the same in every process and on every host, so workers agree when a
        session is due, yet different between sessions, so their refreshes spread apart."""
        fraction = self._jitter
        if fraction < 0:
            secret = (self.refresh_token or self.access_token).encode()
            digest = hashlib.blake2b(secret, digest_size=2, key=_JITTER_KEY).digest()
            fraction = int.from_bytes(digest, "big") / 65536.0
            object.__setattr__(self, "_jitter", fraction)
        return fraction

    @classmethod
    def from_token_response(
        cls,
        body: bytes | str | Mapping[str, Any],
        *,
        issued_at: float,
        default_lifetime: float,
        previous: TokenSet | None = None,
    ) -> TokenSet:
        """Parse a successful RFC 6749 §5.1 response.

        A missing ``expires_in`` means ``default_lifetime``. When refreshing (``previous`` given),
        a provider that does not rotate keeps the old refresh token, and an omitted ``id_token``
        or ``scope`` keeps the old one. Garbage raises :class:`TokenEndpointError`
        (``invalid_response``) naming what is wrong, never echoing values.
        """
        payload: Any = body
        if isinstance(body, bytes | str):
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError):  # also: bad UTF-8, 4,300+ digits, deep nesting
                raise _invalid("token response is not JSON") from None
        if not isinstance(payload, Mapping):
            raise _invalid("token response is not a JSON object")
        if "error" in payload:
            raise _invalid("a successful token response carries an error")

        access_token = payload.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise _invalid("token response has no access_token")

        lifetime = _parse_expires_in(payload.get("expires_in"), default_lifetime)
        refresh_token = _optional_str(payload, "refresh_token")
        id_token = _optional_str(payload, "id_token")
        scope = _optional_str(payload, "scope")
        token_type = _optional_str(payload, "token_type") or "Bearer"
        if token_type.lower() == "bearer":
            token_type = "Bearer"
        claims = None
        if previous is not None:
            refresh_token = refresh_token or previous.refresh_token
            id_token = id_token or previous.id_token
            scope = scope or previous.scope
            claims = previous.claims
        return cls(
            access_token=access_token,
            refresh_token=refresh_token,
            id_token=id_token,
            token_type=token_type,
            expires_at=issued_at + lifetime,
            issued_at=issued_at,
            scope=scope,
            extra={k: v for k, v in payload.items() if k not in _KNOWN_FIELDS},
            claims=claims,
            generation=0 if previous is None else previous.generation + 1,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form, for session stores."""
        data: dict[str, Any] = {
            "access_token": self.access_token,
            "expires_at": self.expires_at,
            "issued_at": self.issued_at,
            "token_type": self.token_type,
        }
        for name in ("refresh_token", "id_token", "scope"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        if self.extra:
            data["extra"] = dict(self.extra)
        if self.claims is not None:
            data["claims"] = dict(self.claims)
        if self.generation:
            data["generation"] = self.generation
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenSet:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on a malformed mapping."""
        try:
            access_token = data["access_token"]
            expires_at = float(data["expires_at"])
            issued_at = float(data["issued_at"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("not a serialised TokenSet") from None
        extra = data.get("extra", {})
        claims = data.get("claims")
        optional = [data.get(k) for k in ("refresh_token", "id_token", "scope")]
        token_type = data.get("token_type", "Bearer")
        generation = data.get("generation", 0)
        if (
            type(generation) is not int  # (not a bool, not a float)
            or generation < 0
            or not isinstance(access_token, str)
            or not isinstance(extra, Mapping)
            or not (claims is None or isinstance(claims, Mapping))
            or not isinstance(token_type, str)
            or not all(v is None or isinstance(v, str) for v in optional)
            or not (math.isfinite(expires_at) and math.isfinite(issued_at))
        ):
            raise ValueError("not a serialised TokenSet")
        refresh_token, id_token, scope = optional
        return cls(
            access_token=access_token,
            expires_at=expires_at,
            issued_at=issued_at,
            refresh_token=refresh_token,
            id_token=id_token,
            token_type=token_type,
            scope=scope,
            extra=dict(extra),
            claims=None if claims is None else dict(claims),
            generation=generation,
        )

    def __repr__(self) -> str:
        present = [n for n in ("refresh_token", "id_token") if getattr(self, n) is not None]
        return (
            f"TokenSet(token_type={self.token_type!r}, expires_at={self.expires_at:.0f}, "
            f"scope={self.scope!r}, has={present!r})"
        )


def _optional_str(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _invalid(f"token response field {name} is not a string")
    return value


def _parse_expires_in(value: Any, default: float) -> float:
    if value is None:
        return default
    # Some providers send "3600" as a string; booleans are ints in Python but not numbers here.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _invalid("token response expires_in is not a number")
    try:
        seconds = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond any float
        raise _invalid("token response expires_in is not a number") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise _invalid("token response expires_in is not a non-negative number")
    return seconds
