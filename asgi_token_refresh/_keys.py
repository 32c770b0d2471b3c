"""Cache and flight keys: keyed hashes, so that no cache, log line or metric holds a token.

A key hashes (grant type, token endpoint's provider, client id, request parameters, refresh
token) under a per-process secret (invariant 6): two requests share a flight only if all of
them are equal. Coordinators name grants across processes with their own shared secret.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

__all__ = ["KeyMaker", "TokenParams"]

_PROCESS_SECRET = secrets.token_bytes(32)


@dataclass(frozen=True, slots=True)
class TokenParams:
    """Request parameters that make two token requests different (RFC 8707 ``resource``,
    the de-facto ``audience``). Never coalesce requests whose parameters differ."""

    scope: str | None = None
    resource: str | None = None
    audience: str | None = None


NO_PARAMS = TokenParams()


def _framed(*parts: str | None) -> bytes:
    """``parts`` encoded unambiguously (length-prefixed; ``None`` differs from ``""``)."""
    out = bytearray()
    for part in parts:
        if part is None:
            out += b"\x00"
        else:
            raw = part.encode()
            out += b"\x01" + len(raw).to_bytes(4, "big") + raw
    return bytes(out)


class KeyMaker:
    """Keys for one (provider, client). The hash of everything but the token is computed once
    per parameter set; a key then costs one ``copy`` and one ``update`` (a storm computes one
    per caller). The refresh token goes last, so it needs no framing."""

    __slots__ = ("_client", "_prefixes")

    def __init__(self, provider_url: str, client_id: str) -> None:
        self._client = _framed(provider_url, client_id)
        self._prefixes: dict[tuple[str, TokenParams], hashlib.blake2b] = {}

    def _prefix(self, grant: str, params: TokenParams) -> hashlib.blake2b:
        prefix = self._prefixes.get((grant, params))
        if prefix is None:
            prefix = hashlib.blake2b(digest_size=16, key=_PROCESS_SECRET)
            prefix.update(_framed(grant) + self._client)
            prefix.update(_framed(params.scope, params.resource, params.audience))
            if len(self._prefixes) < 1024:  # parameter sets are few; never grow unbounded
                self._prefixes[(grant, params)] = prefix
        return prefix

    def refresh_token(self, refresh_token: str, params: TokenParams) -> bytes:
        digest = self._prefix("refresh_token", params).copy()
        digest.update(refresh_token.encode())
        return digest.digest()

    def client_credentials(self, params: TokenParams) -> bytes:
        return self._prefix("client_credentials", params).copy().digest()
