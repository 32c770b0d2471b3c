"""ID token verification (OIDC Core §3.1.3.7) with PyJWT, against the provider's JWKS.

PyJWT, because it is the most used maintained JOSE library in Python, its ``decode`` checks
signature, ``iss`` and ``aud`` in one call with an explicit algorithm list, and it reads JWKs
into keys (``PyJWK``) without a second library. Time comes from the injected clock, so the
``exp``/``iat`` checks are ours (with a small leeway), not PyJWT's wall clock.

Only asymmetric algorithms are accepted, chosen from the token's header and checked against
the key's type: never ``none``, never HMAC (which would let anyone holding the provider's
*public* key forge tokens). Keys are cached by ``kid``; an unknown ``kid`` refetches the JWKS,
at most once per ``refetch_interval``, so a stream of forged tokens cannot hammer the provider.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._clock import Clock
from ._errors import ConfigurationError, LoginFailed, RefreshUnavailable
from ._oauth_messages import DEFAULT_RETRY_AFTER
from ._per_loop import PerLoop

if TYPE_CHECKING:
    from ._oauth import OAuth2Client

__all__ = ["ALGORITHMS", "IdTokenVerifier"]

#: Asymmetric JWS algorithms an ID token may be signed with.
ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class IdTokenVerifier:
    """Verifies the ID tokens one client receives from its provider."""

    def __init__(
        self,
        client: OAuth2Client,
        *,
        leeway: float = 60.0,
        refetch_interval: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        try:
            import jwt  # noqa: F401 - say what is missing at construction, not at login
        except ImportError:  # pragma: no cover - depends on the installation
            raise ConfigurationError(
                "verifying ID tokens needs PyJWT: pip install 'asgi-token-refresh[oidc]'"
            ) from None
        self.client = client
        self.leeway = leeway
        self.refetch_interval = refetch_interval
        self.clock = clock or client.clock
        self._keys: dict[str | None, Any] = {}  # kid -> jwt.PyJWK
        self._fetched_at: float | None = None  # monotonic
        # One JWKS fetch at a time on each loop (a lock belongs to one loop, like a pool).
        self._fetching: PerLoop[asyncio.Lock] = PerLoop(asyncio.Lock)

    async def verify(self, id_token: str, *, nonce: str | None) -> dict[str, Any]:
        """The verified claims, or :class:`LoginFailed` saying what is wrong (never echoing the
        token). :class:`RefreshUnavailable` if the JWKS cannot be fetched."""
        import jwt

        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise LoginFailed("the ID token is not a signed JWT") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise LoginFailed(f"the ID token's algorithm {str(algorithm)[:16]!r} is not allowed")
        key = await self._key(header.get("kid"), algorithm)
        metadata = await self.client.metadata()
        issuer = metadata.issuer or self.client.issuer
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key=key,
                algorithms=[algorithm],
                audience=self.client.client_id,
                issuer=issuer,
                options={
                    "require": ["iss", "sub", "aud", "exp", "iat"],
                    "verify_exp": False,  # checked below against the injected clock
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise LoginFailed("the ID token's signature does not verify") from None
        except jwt.InvalidIssuerError:
            raise LoginFailed("the ID token was issued by another issuer") from None
        except jwt.InvalidAudienceError:
            raise LoginFailed("the ID token was issued for another client") from None
        except jwt.MissingRequiredClaimError as exc:
            raise LoginFailed(f"the ID token has no {exc.claim} claim") from None
        except jwt.PyJWTError:
            raise LoginFailed("the ID token is malformed") from None
        self._check_times(claims)
        self._check_party(claims)
        if nonce is not None and not hmac.compare_digest(
            str(claims.get("nonce", "")).encode(), nonce.encode()
        ):
            raise LoginFailed("the ID token's nonce does not match this login")
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self.clock.time()
        for name in ("exp", "iat"):
            if isinstance(claims[name], bool) or not isinstance(claims[name], int | float):
                raise LoginFailed(f"the ID token's {name} is not a number")
        if claims["exp"] + self.leeway < now:
            raise LoginFailed("the ID token has expired")
        if claims["iat"] - self.leeway > now:
            raise LoginFailed("the ID token was issued in the future")
        not_before = claims.get("nbf")
        if isinstance(not_before, int | float) and not_before - self.leeway > now:
            raise LoginFailed("the ID token is not valid yet")

    def _check_party(self, claims: Mapping[str, Any]) -> None:
        audience = claims["aud"]
        azp = claims.get("azp")
        if azp is not None and azp != self.client.client_id:
            raise LoginFailed("the ID token was authorized for another client")
        if isinstance(audience, list) and len(audience) > 1 and azp is None:
            raise LoginFailed("the ID token names several audiences and no authorized party")

    async def _key(self, kid: Any, algorithm: str) -> Any:
        import jwt

        kid = kid if isinstance(kid, str) else None
        key = self._pick(kid)
        if key is None:
            async with self._fetching.get():
                key = self._pick(kid)
                now = self.clock.monotonic()
                recent = self._fetched_at is not None and (
                    now - self._fetched_at < self.refetch_interval
                )
                if key is None and not recent:  # an unknown kid: the provider rotated, maybe
                    await self._fetch()
                    key = self._pick(kid)
        if key is None:
            raise LoginFailed("the ID token is signed with a key the provider does not publish")
        if key.get("alg") not in (None, algorithm):
            raise LoginFailed("the ID token's algorithm is not its key's")
        try:
            return jwt.PyJWK(key, algorithm=algorithm)
        except jwt.PyJWTError:
            raise LoginFailed("the ID token's algorithm does not fit its key") from None

    def _pick(self, kid: str | None) -> Any:
        if kid is not None:
            return self._keys.get(kid)
        keys = list(self._keys.values())
        return keys[0] if len(keys) == 1 else None  # no kid: only an unambiguous single key

    async def _fetch(self) -> None:
        self._fetched_at = self.clock.monotonic()
        try:
            document = await self.client.jwks()
            keys = document.get("keys") if isinstance(document, Mapping) else None
        except (ValueError, RecursionError):
            keys = None
        if not isinstance(keys, list):
            raise RefreshUnavailable(
                "provider_error",
                retry_after=DEFAULT_RETRY_AFTER,
                detail="the JWKS is not a JWK Set",
            )
        self._keys = {
            key.get("kid") if isinstance(key.get("kid"), str) else None: key
            for key in keys
            if isinstance(key, Mapping) and key.get("use", "sig") == "sig"
        }
