"""FakeIdP as an OpenID Provider: signed ID tokens, JWKS, key rotation, deliberately bad ID
tokens, RFC 8414 metadata and RP-Initiated Logout. Verified with PyJWT, as a relying party does.
"""

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

from asgi_token_refresh.testing import FakeClock, FakeIdP, serve

ISSUER = "https://idp.test"
REDIRECT = "https://app.test/callback"
BYE = "https://app.test/signed-out"
APP = ("app", "app-secret")
NONCE = "n-0S6_WzA2Mj"
# What a relying party must insist on (PyJWT requires none of them by default).
REQUIRED = ["iss", "sub", "aud", "exp", "iat"]


def run_with(idp: FakeIdP, test: Callable[[httpx.AsyncClient], Any], base: str = ISSUER) -> Any:
    async def main() -> Any:
        async with httpx.AsyncClient(transport=idp.transport(), base_url=base) as client:
            return await test(client)

    return asyncio.run(main())


async def login(client: httpx.AsyncClient, *, nonce: str = NONCE) -> dict[str, Any]:
    """/authorize then the code exchange; the token endpoint's answer."""
    query = {
        "response_type": "code",
        "client_id": "app",
        "redirect_uri": REDIRECT,
        "scope": "openid offline_access",
        "prompt": "consent",
        "nonce": nonce,
    }
    redirect = await client.get("/authorize", params=query)
    code = httpx.URL(redirect.headers["location"]).params["code"]
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    response = await client.post("/token", data=data, auth=APP)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def jwks_of(idp: FakeIdP, base: str = ISSUER) -> dict[str, Any]:
    async def fetch(client: httpx.AsyncClient) -> dict[str, Any]:
        jwks_uri = (await client.get("/.well-known/openid-configuration")).json()["jwks_uri"]
        response = await client.get(jwks_uri)
        assert response.status_code == 200
        jwks: dict[str, Any] = response.json()
        return jwks

    jwks: dict[str, Any] = run_with(idp, fetch, base)
    return jwks


def verify(
    token: str,
    jwks: dict[str, Any],
    *,
    issuer: str = ISSUER,
    audience: str = "app",
    options: dict[str, Any] | None = None,
    leeway: float = 0,
) -> dict[str, Any]:
    """What a relying party does: the key by kid, a fixed algorithm list, every claim checked."""
    options = {"require": REQUIRED} | (options or {})
    key: jwt.PyJWK | str = ""
    if options.get("verify_signature", True):
        key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["RS256", "ES256"],
        audience=audience,
        issuer=issuer,
        options=options,  # type: ignore[arg-type]  # PyJWT's Options is a TypedDict
        leeway=leeway,
    )
    return claims


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def decode(part: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return data

    header, claims, _ = token.split(".")
    return decode(header), decode(claims)


# -- signed ID tokens and the JWKS -----------------------------------------------------------


@pytest.mark.parametrize(("alg", "kty"), [("RS256", "RSA"), ("ES256", "EC")])
def test_id_tokens_are_signed_with_a_key_the_served_jwks_publishes(alg: str, kty: str) -> None:
    issuer = "https://idp.test/realms/demo"
    idp = FakeIdP(issuer=issuer, id_token_alg=alg)

    async def test(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
        # base_url is the issuer, so "/authorize" is /realms/demo/authorize
        meta = (await client.get("/.well-known/openid-configuration")).json()
        assert meta["jwks_uri"] == f"{issuer}/jwks"
        assert alg in meta["id_token_signing_alg_values_supported"]
        assert "HS256" not in meta["id_token_signing_alg_values_supported"]
        return await login(client), (await client.get(meta["jwks_uri"])).json()

    tokens, jwks = run_with(idp, test, issuer)
    [jwk] = jwks["keys"]
    assert (jwk["kty"], jwk["alg"], jwk["use"]) == (kty, alg, "sig")
    assert "d" not in jwk  # public parts only
    header, _ = segments(tokens["id_token"])
    assert (header["alg"], header["kid"]) == (alg, jwk["kid"])

    claims = verify(tokens["id_token"], jwks, issuer=issuer)
    assert (claims["sub"], claims["aud"], claims["azp"], claims["nonce"]) == (
        "alice",
        "app",
        "app",
        NONCE,
    )
    assert claims["iat"] <= claims["auth_time"] + 1
    assert claims["exp"] - claims["iat"] == 300
    assert claims["sid"]
    assert idp.calls("jwks") == 1


def test_a_refreshed_id_token_keeps_the_login_claims_but_not_the_nonce() -> None:
    clock = FakeClock()
    idp = FakeIdP(clock=clock)

    async def test(client: httpx.AsyncClient) -> tuple[str, str]:
        first = await login(client)
        clock.advance(120)
        data = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
        second = (await client.post("/token", data=data, auth=APP)).json()
        return first["id_token"], second["id_token"]

    at_login, refreshed = run_with(idp, test)
    jwks = jwks_of(idp)
    # The fake clock is in the past: check the signature and claims as of that clock.
    as_of_clock = {"verify_exp": False, "verify_iat": False}
    before = verify(at_login, jwks, options=as_of_clock)
    after = verify(refreshed, jwks, options=as_of_clock)
    assert before["nonce"] == NONCE
    assert "nonce" not in after  # OIDC Core §12.2
    assert after["iat"] == before["iat"] + 120
    assert after["exp"] == int(clock.time()) + 300
    for name in ("iss", "sub", "aud", "azp", "auth_time", "sid"):
        assert after[name] == before[name], name


def test_rotation_keeps_tokens_signed_before_it_verifiable_until_the_old_key_is_dropped() -> None:
    idp = FakeIdP()
    before = idp.issue()["id_token"]
    new_kid = idp.rotate_signing_key()
    after = idp.issue()["id_token"]
    assert segments(after)[0]["kid"] == new_kid != segments(before)[0]["kid"]

    jwks = jwks_of(idp)
    assert [key["kid"] for key in jwks["keys"]] == [new_kid, segments(before)[0]["kid"]]
    verify(before, jwks)
    verify(after, jwks)

    es_kid = idp.rotate_signing_key("ES256", drop_old=True)
    latest = idp.issue()["id_token"]
    jwks = jwks_of(idp)
    assert [(key["kid"], key["alg"]) for key in jwks["keys"]] == [(es_kid, "ES256")]
    verify(latest, jwks)
    for dropped in (before, after):
        with pytest.raises(KeyError):  # no key for that kid any more: a refetch will not help
            verify(dropped, jwks)
    assert idp.calls("jwks") == 2


def test_unsupported_signing_algorithms_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="id_token_alg"):
        FakeIdP(id_token_alg="HS256")
    with pytest.raises(ValueError, match="alg must be"):
        FakeIdP().rotate_signing_key("none")
    with pytest.raises(ValueError, match="unknown tamper kind"):
        FakeIdP().tamper_next_id_token("slightly_off")


def test_a_relying_party_fetching_the_jwks_over_real_sockets_verifies_the_id_token() -> None:
    idp = FakeIdP(issuer=None, id_token_alg="ES256")
    with serve(idp) as base_url:
        tokens = run_with(idp, login, base_url)
        jwks_uri = httpx.get(f"{base_url}/.well-known/openid-configuration").json()["jwks_uri"]
        client = jwt.PyJWKClient(jwks_uri, cache_keys=True)
        key = client.get_signing_key_from_jwt(tokens["id_token"])
        claims = jwt.decode(
            tokens["id_token"],
            key.key,
            algorithms=["RS256", "ES256"],
            audience="app",
            issuer=base_url,
            options={"require": REQUIRED},
        )
    assert claims["nonce"] == NONCE
    assert idp.calls("jwks") == 1


# -- deliberately bad ID tokens --------------------------------------------------------------

# Each kind, what a strict relying party's check raises, and the one check that, relaxed,
# lets the token through: proof that the token is bad in that one way only.
CHECKS_BUT_SIGNATURE = {"verify_exp": True, "verify_iat": True, "verify_aud": True}
UNSIGNED = {"options": {"verify_signature": False, "verify_iss": True, **CHECKS_BUT_SIGNATURE}}
TAMPERED: dict[str, tuple[type[Exception] | None, dict[str, Any]]] = {
    "bad_signature": (jwt.InvalidSignatureError, UNSIGNED),
    "unknown_kid": (KeyError, UNSIGNED),  # a JWKS refetch finds no such kid either
    "wrong_issuer": (jwt.InvalidIssuerError, {"issuer": "https://attacker.test"}),
    "wrong_audience": (jwt.InvalidAudienceError, {"audience": "another-client"}),
    "expired": (jwt.ExpiredSignatureError, {"leeway": 3660}),  # expired an hour ago
    "nonce_mismatch": (None, {}),
    "alg_none": (jwt.InvalidAlgorithmError, UNSIGNED),
    "hs256_with_public_key": (jwt.InvalidAlgorithmError, UNSIGNED),
    "missing_exp": (jwt.MissingRequiredClaimError, {"options": {"require": ["iss", "aud"]}}),
}


@pytest.mark.parametrize("kind", sorted(TAMPERED))
def test_each_tampered_id_token_fails_exactly_one_relying_party_check(kind: str) -> None:
    idp = FakeIdP()
    idp.tamper_next_id_token(kind)

    async def test(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
        tampered = await login(client)
        return tampered, await login(client)

    tampered, next_login = run_with(idp, test)
    jwks = jwks_of(idp)
    token = tampered["id_token"]
    error, relaxed = TAMPERED[kind]
    if error is None:
        assert verify(token, jwks)["nonce"] != NONCE
    else:
        with pytest.raises(error):
            verify(token, jwks)
    assert verify(token, jwks, **relaxed)["sub"] == "alice"
    # The rest of the answer is as usual, and the next login is untouched.
    assert tampered["access_token"]
    assert tampered["refresh_token"]
    assert verify(next_login["id_token"], jwks)["nonce"] == NONCE


def test_the_key_confusion_token_is_what_a_naive_hmac_verifier_would_accept() -> None:
    idp = FakeIdP()
    idp.tamper_next_id_token("hs256_with_public_key")
    token = run_with(idp, login)["id_token"]
    [jwk] = jwks_of(idp)["keys"]
    header, _ = segments(token)
    assert (header["alg"], header["kid"]) == ("HS256", jwk["kid"])
    public = jwt.PyJWK(jwk).key
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input, _, signature = token.rpartition(".")
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64encode(mac).rstrip(b"=").decode() == signature


def test_alg_none_and_unknown_kid_tokens_look_as_an_attacker_would_make_them() -> None:
    idp = FakeIdP()
    idp.tamper_next_id_token("alg_none")
    idp.tamper_next_id_token("unknown_kid")  # tampers queue: one per code exchange

    async def test(client: httpx.AsyncClient) -> list[str]:
        return [(await login(client))["id_token"] for _ in "ab"]

    unsigned, stranger = run_with(idp, test)
    kids = {key["kid"] for key in jwks_of(idp)["keys"]}
    assert unsigned.endswith(".")
    assert segments(unsigned)[0]["alg"] == "none"
    assert segments(unsigned)[0]["kid"] in kids
    assert segments(stranger)[0]["kid"] not in kids


def test_tampering_spares_refreshes_and_issue() -> None:
    idp = FakeIdP()
    idp.tamper_next_id_token("wrong_audience")
    issued = idp.issue()

    async def test(client: httpx.AsyncClient) -> tuple[str, str]:
        data = {"grant_type": "refresh_token", "refresh_token": issued["refresh_token"]}
        refreshed = (await client.post("/token", data=data, auth=APP)).json()
        return refreshed["id_token"], (await login(client))["id_token"]

    refreshed, at_login = run_with(idp, test)
    jwks = jwks_of(idp)
    verify(issued["id_token"], jwks)
    verify(refreshed, jwks)
    with pytest.raises(jwt.InvalidAudienceError):
        verify(at_login, jwks)


# -- RFC 8414 metadata -----------------------------------------------------------------------


def test_oauth_metadata_is_served_where_rfc_8414_puts_it_for_an_issuer_with_a_path() -> None:
    issuer = "https://idp.test/tenant"
    idp = FakeIdP(issuer=issuer, revocation_in_oauth_metadata_only=True)

    async def test(client: httpx.AsyncClient) -> None:
        compliant = await client.get("/.well-known/oauth-authorization-server/tenant")
        assert compliant.status_code == 200
        meta = compliant.json()
        assert meta["issuer"] == issuer
        assert meta["token_endpoint"] == f"{issuer}/token"
        assert meta["revocation_endpoint"] == f"{issuer}/revoke"
        assert meta["jwks_uri"] == f"{issuer}/jwks"
        assert "client_secret_basic" in meta["revocation_endpoint_auth_methods_supported"]
        # Also under the issuer's path, as several providers serve it.
        appended = await client.get("/tenant/.well-known/oauth-authorization-server")
        assert appended.json() == meta
        assert (await client.get("/.well-known/oauth-authorization-server")).status_code == 404
        assert (await client.get("/.well-known/oauth-authorization-server/x")).status_code == 404

        discovery = (await client.get("/tenant/.well-known/openid-configuration")).json()
        assert "revocation_endpoint" not in discovery
        assert "revocation_endpoint_auth_methods_supported" not in discovery
        assert discovery["end_session_endpoint"] == f"{issuer}/logout"
        assert (
            await client.post(meta["revocation_endpoint"], data={"token": "x"}, auth=APP)
        ).status_code == 200

    run_with(idp, test)
    assert idp.calls("oauth_metadata") == 2
    assert idp.calls("discovery") == 1


def test_oauth_metadata_for_a_host_only_issuer_and_both_documents_by_default() -> None:
    idp = FakeIdP()

    async def test(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
        oauth = (await client.get("/.well-known/oauth-authorization-server")).json()
        oidc = (await client.get("/.well-known/openid-configuration")).json()
        return oauth, oidc

    oauth, oidc = run_with(idp, test)
    assert oauth["issuer"] == oidc["issuer"] == ISSUER
    assert oauth["revocation_endpoint"] == oidc["revocation_endpoint"] == f"{ISSUER}/revoke"
    assert "userinfo_endpoint" not in oauth  # OIDC-only fields stay in OIDC discovery
    assert oidc["userinfo_endpoint"] == f"{ISSUER}/userinfo"


# -- RP-Initiated Logout ---------------------------------------------------------------------


def test_logout_with_an_id_token_hint_ends_the_session_and_redirects_with_state() -> None:
    idp = FakeIdP()

    async def test(client: httpx.AsyncClient) -> None:
        tokens = await login(client)
        endpoint = (await client.get("/.well-known/openid-configuration")).json()[
            "end_session_endpoint"
        ]
        params = {
            "id_token_hint": tokens["id_token"],
            "post_logout_redirect_uri": BYE,
            "state": "x y",
        }
        response = await client.get(endpoint, params=params)
        assert response.status_code == 302
        assert response.headers["location"] == f"{BYE}?state=x+y"
        assert idp.sessions_ended == 1
        # Again: nothing left to end, same answer.
        assert (await client.get(endpoint, params=params)).status_code == 302
        # Refresh tokens outlive the provider session; /revoke is what ends them.
        data = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        assert (await client.post("/token", data=data, auth=APP)).status_code == 200

    run_with(idp, test)
    assert idp.sessions_ended == 1
    assert idp.calls("end_session") == 2


def test_logout_without_a_redirect_says_signed_out_and_accepts_a_form_post() -> None:
    clock = FakeClock()
    idp = FakeIdP(clock=clock)

    async def test(client: httpx.AsyncClient) -> None:
        first, second = await login(client), await login(client)
        clock.advance(3600)  # an expired ID token is still a good hint
        plain = await client.get("/logout", params={"id_token_hint": first["id_token"]})
        assert (plain.status_code, plain.text) == (200, "signed out")
        form = {"id_token_hint": second["id_token"], "client_id": "app"}
        posted = await client.post("/logout", data=form)
        assert posted.status_code == 200
        assert (await client.get("/logout")).status_code == 200  # nothing to end

    run_with(idp, test)
    assert idp.sessions_ended == 2
    assert idp.calls("end_session") == 3


def test_logout_refuses_hints_and_redirects_it_cannot_trust() -> None:
    idp = FakeIdP(clients={"app": "app-secret", "other": "other-secret"})
    stranger = FakeIdP()  # same issuer, other keys
    foreign = stranger.issue()["id_token"]
    idp.tamper_next_id_token("bad_signature")
    idp.tamper_next_id_token("wrong_issuer")

    async def test(client: httpx.AsyncClient) -> list[tuple[int, str]]:
        forged, misissued, good = [(await login(client))["id_token"] for _ in "abc"]
        cases = [
            {"id_token_hint": forged},
            {"id_token_hint": misissued},
            {"id_token_hint": foreign},
            {"id_token_hint": "not-a-jwt"},
            {"id_token_hint": good, "client_id": "other"},
            {"client_id": "nobody"},
            {"post_logout_redirect_uri": BYE},  # which client is asking?
            {"id_token_hint": good, "post_logout_redirect_uri": "javascript:alert(1)"},
            {"client_id": "app", "post_logout_redirect_uri": "/relative"},
        ]
        answers = []
        for params in cases:
            response = await client.get("/logout", params=params)
            assert "location" not in response.headers
            answers.append((response.status_code, response.json()["error"]))
        ok = await client.get(
            "/logout", params={"client_id": "app", "post_logout_redirect_uri": BYE}
        )
        assert ok.headers["location"] == BYE
        return answers

    assert run_with(idp, test) == [(400, "invalid_request")] * 9
    assert idp.sessions_ended == 0


def test_a_hint_signed_by_a_rotated_out_key_is_accepted_until_that_key_is_dropped() -> None:
    idp = FakeIdP()
    before_rotation = idp.issue()["id_token"]
    idp.rotate_signing_key()
    before_drop = idp.issue()["id_token"]

    async def test(client: httpx.AsyncClient) -> list[int]:
        kept = await client.get("/logout", params={"id_token_hint": before_rotation})
        idp.rotate_signing_key(drop_old=True)
        dropped = await client.get("/logout", params={"id_token_hint": before_drop})
        return [kept.status_code, dropped.status_code]

    assert run_with(idp, test) == [200, 400]
    assert idp.sessions_ended == 1
