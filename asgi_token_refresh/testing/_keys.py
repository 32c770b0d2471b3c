"""The fake provider's signing keys: ID tokens, the JWK Set, rotation and deliberately bad tokens.

Real keys from ``cryptography`` and real JWTs from PyJWT, so a relying party verifies FakeIdP's
ID tokens exactly as it verifies a real provider's. Both come with the ``oidc`` extra; this
module is imported only once an ID token, the JWKS or a logout needs a key. Not thread-safe:
FakeIdP holds its lock around every call.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

# What tamper_next_id_token() accepts; each one is a check a relying party must not skip.
TAMPER_KINDS = (
    "bad_signature",  # the current kid, a signature that does not verify
    "unknown_kid",  # signed by a key the JWKS never published, under a kid it does not have
    "wrong_issuer",
    "wrong_audience",
    "expired",  # an hour past exp: beyond any sane leeway
    "nonce_mismatch",  # a nonce other than the one the authorization request sent
    "alg_none",  # unsigned (RFC 7519 §6), with the current kid
    "hs256_with_public_key",  # key confusion: HMAC keyed with the public key's PEM
    "missing_exp",
)
_ATTACKER = "https://attacker.test"


def check_tamper_kind(kind: str) -> str:
    if kind not in TAMPER_KINDS:
        raise ValueError(f"unknown tamper kind {kind!r}; expected one of {TAMPER_KINDS}")
    return kind


@dataclass(frozen=True, eq=False)
class _SigningKey:
    kid: str
    alg: str
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, alg: str) -> _SigningKey:
        private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if alg == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            private = ec.generate_private_key(ec.SECP256R1())
        return cls("k-" + secrets.token_urlsafe(9), alg, private)

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self.private, algorithm=self.alg, headers={"kid": self.kid})

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            fields = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            fields = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**fields, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class KeyRing:
    """One current signing key and every key the JWKS still publishes (newest first)."""

    def __init__(self, alg: str) -> None:
        self._alg = alg  # checked by FakeIdP: "RS256" or "ES256"
        self._published: list[_SigningKey] = []  # created on first use: RSA takes ~50 ms

    @property
    def current(self) -> _SigningKey:
        if not self._published:
            self._published.append(_SigningKey.generate(self._alg))
        return self._published[0]

    def rotate(self, alg: str | None, *, drop_old: bool) -> str:
        """A new current key; the old ones stay published unless ``drop_old``."""
        self._alg = alg if alg is not None else self._alg
        key = _SigningKey.generate(self._alg)
        self._published = [key] if drop_old else [key, *self._published]
        return key.kid

    def jwks(self) -> dict[str, Any]:
        self.current  # noqa: B018 -- a JWKS always has the key the next token will use
        return {"keys": [key.jwk() for key in self._published]}

    def sign(self, claims: Mapping[str, Any], tamper: str | None = None) -> str:
        """A signed JWT, or one that fails verification in the way ``tamper`` names."""
        if tamper is None:
            return self.current.sign(claims)
        claims = dict(claims)
        key = self.current
        if tamper == "wrong_issuer":
            claims["iss"] = _ATTACKER
        elif tamper == "wrong_audience":
            claims["aud"] = claims["azp"] = "another-client"
        elif tamper == "expired":
            iat = int(claims["iat"]) - 7200
            claims.update(iat=iat, exp=iat + 3600, auth_time=min(claims["auth_time"], iat))
        elif tamper == "nonce_mismatch":
            claims["nonce"] = "n-" + secrets.token_urlsafe(12)
        elif tamper == "missing_exp":
            del claims["exp"]
        elif tamper == "alg_none":
            return _compact({"alg": "none", "typ": "JWT", "kid": key.kid}, claims, b"")
        elif tamper == "hs256_with_public_key":
            # A verifier that picks the algorithm from the header and feeds the key it holds
            # (the public PEM) to HMAC would accept this.
            header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
            signing_input = _compact(header, claims, None)
            mac = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
            return signing_input + "." + _b64url(mac)
        elif tamper == "bad_signature":
            head, payload, signature = key.sign(claims).split(".")
            raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
            raw[0] ^= 0x01  # flipped in the bytes, not the text: base64 has padding bits
            return f"{head}.{payload}.{_b64url(bytes(raw))}"
        elif tamper == "unknown_kid":
            return _SigningKey.generate(key.alg).sign(claims)
        return key.sign(claims)

    def verify(self, token: str, *, issuer: str) -> dict[str, Any] | None:
        """The claims of a token signed by a published key and naming ``issuer``, else None.

        ``exp`` is not checked: an expired ID token is still a good ``id_token_hint``
        (RP-Initiated Logout §2).
        """
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = next((k for k in self._published if k.kid == kid), None)
            if key is None:
                return None
            claims: dict[str, Any] = jwt.decode(
                token,
                key.private.public_key(),
                algorithms=[key.alg],
                issuer=issuer,
                options={
                    "verify_exp": False,  # RP-Initiated Logout accepts expired hints
                    "verify_iat": False,  # and the provider runs on its own clock
                    "verify_aud": False,
                    "require": ["iss", "aud"],
                },
            )
        except jwt.InvalidTokenError:
            return None
        return claims


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _compact(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes | None) -> str:
    """``header.claims`` (the signing input), plus ``.signature`` unless it is None."""
    parts = [_b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)]
    if signature is not None:
        parts.append(_b64url(signature))
    return ".".join(parts)
