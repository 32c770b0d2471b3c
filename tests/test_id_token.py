"""ID tokens are verified (signature against the JWKS, iss, aud, azp, exp/iat, nonce, an
asymmetric algorithm only), and a login only ever returns to a path on this site."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from asgi_token_refresh import LoginFailed, OAuth2Client
from asgi_token_refresh._id_token import IdTokenVerifier
from asgi_token_refresh._login_http import safe_return_path
from asgi_token_refresh.testing import FakeClock

pytestmark = pytest.mark.anyio

ISSUER = "https://idp.test"
NOW = 1_700_000_000


class Keys:
    """A provider's signing keys and the JWKS endpoint that serves them (counting fetches)."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.published = [self.jwk(self.rsa, "rsa-1", "RS256"), self.jwk(self.ec, "ec-1", "ES256")]
        self.fetches = 0

    @staticmethod
    def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(alg)
        return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "alg": alg}

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(
                200,
                json={
                    "issuer": ISSUER,
                    "token_endpoint": f"{ISSUER}/token",
                    "jwks_uri": f"{ISSUER}/jwks",
                },
            )
        if request.url.path == "/jwks":
            self.fetches += 1
            return httpx.Response(200, json={"keys": self.published})
        return httpx.Response(404)


def claims(**changes: Any) -> dict[str, Any]:
    base = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": "app",
        "exp": NOW + 300,
        "iat": NOW,
        "nonce": "n1",
    }
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def verify(keys: Keys) -> Callable[..., Any]:
    clock = FakeClock(float(NOW))
    client = OAuth2Client.from_discovery(
        ISSUER,
        client_id="app",
        client_secret="s",
        transport=httpx.MockTransport(keys.handle),
        clock=clock,
    )
    verifier = IdTokenVerifier(client)

    async def run(token: str, nonce: str | None = "n1") -> dict[str, Any]:
        return await verifier.verify(token, nonce=nonce)

    return run


async def test_rs256_and_es256_tokens_verify_and_give_their_claims(
    keys: Keys, verify: Callable[..., Any]
) -> None:
    rs = jwt.encode(claims(), keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
    es = jwt.encode(claims(email="a@x"), keys.ec, algorithm="ES256", headers={"kid": "ec-1"})
    assert (await verify(rs))["sub"] == "alice"
    assert (await verify(es))["email"] == "a@x"
    assert keys.fetches == 1  # the JWKS is cached


def _unsigned(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def _hmac_with_public_key(keys: Keys) -> str:
    """The key-confusion attack: HS256 'signed' with the provider's public key."""
    public = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","kid":"rsa-1"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    signature = hmac.new(public, header + b"." + body, hashlib.sha256).digest()
    return (header + b"." + body + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


BAD: dict[str, tuple[Callable[[Keys], str], str]] = {
    "bad signature": (
        lambda k: jwt.encode(
            claims(),
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            algorithm="RS256",
            headers={"kid": "rsa-1"},
        ),
        "signature does not verify",
    ),
    "unknown key": (
        lambda k: jwt.encode(claims(), k.rsa, algorithm="RS256", headers={"kid": "elsewhere"}),
        "key the provider does not publish",
    ),
    "wrong issuer": (
        lambda k: jwt.encode(
            claims(iss="https://evil.test"), k.rsa, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "another issuer",
    ),
    "wrong audience": (
        lambda k: jwt.encode(
            claims(aud="someone-else"), k.rsa, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "another client",
    ),
    "another authorized party": (
        lambda k: jwt.encode(
            claims(azp="someone-else"), k.rsa, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "authorized for another client",
    ),
    "expired": (
        lambda k: jwt.encode(
            claims(exp=NOW - 120, iat=NOW - 420), k.rsa, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "expired",
    ),
    "issued in the future": (
        lambda k: jwt.encode(
            claims(iat=NOW + 600, exp=NOW + 900), k.rsa, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "in the future",
    ),
    "no exp": (
        lambda k: jwt.encode(claims(exp=None), k.rsa, algorithm="RS256", headers={"kid": "rsa-1"}),
        "no exp claim",
    ),
    "nonce mismatch": (
        lambda k: jwt.encode(
            claims(nonce="other"), k.rsa, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "nonce does not match",
    ),
    "alg none": (lambda k: _unsigned(claims()), "not allowed"),
    "HMAC with the public key": (_hmac_with_public_key, "not allowed"),
    "RS256 header on the EC key": (
        lambda k: jwt.encode(claims(), k.rsa, algorithm="RS256", headers={"kid": "ec-1"}),
        "algorithm is not its key's",
    ),
    "garbage": (lambda k: "not.a.jwt", "not a signed JWT"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_every_bad_id_token_is_refused_with_a_plain_reason(
    keys: Keys, verify: Callable[..., Any], case: str
) -> None:
    make, reason = BAD[case]
    token = make(keys)
    with pytest.raises(LoginFailed) as caught:
        await verify(token)
    assert reason in caught.value.reason
    assert token not in str(caught.value)


async def test_unknown_keys_refetch_the_jwks_at_most_once_a_minute(
    keys: Keys, verify: Callable[..., Any]
) -> None:
    forged = jwt.encode(claims(), keys.rsa, algorithm="RS256", headers={"kid": "nope"})
    for _ in range(20):
        with pytest.raises(LoginFailed):
            await verify(forged)
    assert keys.fetches == 1


async def test_a_rotated_key_is_fetched_when_a_token_names_it(keys: Keys) -> None:
    clock = FakeClock(float(NOW))
    client = OAuth2Client.from_discovery(
        ISSUER,
        client_id="app",
        client_secret="s",
        transport=httpx.MockTransport(keys.handle),
        clock=clock,
    )
    verifier = IdTokenVerifier(client)
    first = jwt.encode(claims(), keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
    await verifier.verify(first, nonce="n1")
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys.published.append(Keys.jwk(rotated, "rsa-2", "RS256"))
    clock.advance(61)  # past the refetch interval
    second = jwt.encode(claims(), rotated, algorithm="RS256", headers={"kid": "rsa-2"})
    assert (await verifier.verify(second, nonce="n1"))["sub"] == "alice"
    assert keys.fetches == 2


class _Yielding(httpx.AsyncBaseTransport):
    """``keys`` served after a turn of the loop, so concurrent verifications meet at the lock."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)
        return self.keys.handle(request)


def test_one_verifier_fetches_keys_on_any_loop_when_logins_meet(keys: Keys) -> None:
    clock = FakeClock(float(NOW))
    client = OAuth2Client.from_discovery(
        ISSUER, client_id="app", client_secret="s", transport=_Yielding(keys), clock=clock
    )
    verifier = IdTokenVerifier(client)

    async def two_logins(kid: str, key: Any) -> None:
        token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": kid})
        both = [verifier.verify(token, nonce="n1") for _ in range(2)]
        assert [c["sub"] for c in await asyncio.gather(*both)] == ["alice", "alice"]

    asyncio.run(two_logins("rsa-1", keys.rsa))  # e.g. a TestClient's loop per request
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys.published.append(Keys.jwk(rotated, "rsa-2", "RS256"))
    clock.advance(61)
    asyncio.run(two_logins("rsa-2", rotated))
    assert keys.fetches == 2


@pytest.mark.parametrize(
    ("asked", "safe"),
    [
        ("/orders/7?tab=2", "/orders/7?tab=2"),
        (None, "/"),
        ("", "/"),
        ("orders", "/"),
        ("//evil.test", "/"),
        ("https://evil.test", "/"),
        ("/\\evil.test", "/"),
        ("/%2F/evil.test", "/"),
        ("/%2f%2fevil.test", "/"),
        ("/%5Cevil.test", "/"),
        ("/%252F%252Fevil.test", "/"),
        ("/ok\r\nSet-Cookie: x=1", "/"),
        ("javascript:alert(1)", "/"),
    ],
)
def test_return_to_only_ever_leads_to_a_path_on_this_site(asked: str | None, safe: str) -> None:
    assert safe_return_path(asked) == safe
