"""The public test helpers: FakeClock, FakeIdP (with faults and the pause gate) and serve()."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from asgi_token_refresh.testing import FakeClock, FakeIdP, Fault, serve

ISSUER = "https://idp.test"
REDIRECT = "https://app.test/callback"
APP = ("app", "app-secret")


@contextlib.asynccontextmanager
async def client_for(idp: FakeIdP, base_url: str = ISSUER) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=idp.transport(), base_url=base_url) as client:
        yield client


def run_with(idp: FakeIdP, test: Callable[[httpx.AsyncClient], Any]) -> Any:
    """Run ``await test(client)`` in a fresh event loop with a client wired to ``idp``."""

    async def main() -> Any:
        async with client_for(idp) as client:
            return await test(client)

    return asyncio.run(main())


async def refresh(
    client: httpx.AsyncClient, refresh_token: str, *, auth: tuple[str, str] = APP, **extra: str
) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}
    return await client.post("/token", data=data, auth=auth)


async def userinfo(client: httpx.AsyncClient, access_token: str) -> httpx.Response:
    return await client.get("/userinfo", headers={"Authorization": f"Bearer {access_token}"})


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def authorize(client: httpx.AsyncClient, **params: str) -> dict[str, str]:
    """Run /authorize and return the query parameters of the redirect."""
    query = {
        "response_type": "code",
        "client_id": "app",
        "redirect_uri": REDIRECT,
        "scope": "openid offline_access",
        "state": "st4te",
        **params,
    }
    response = await client.get("/authorize", params=query)
    assert response.status_code == 302
    location = httpx.URL(response.headers["location"])
    assert str(location.copy_with(query=None)) == REDIRECT
    return dict(location.params)


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    def decode(part: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return data

    header, payload, signature = token.split(".")
    return decode(header), decode(payload), signature


# -- FakeClock -------------------------------------------------------------------------------


def test_fake_clock_moves_wall_and_monotonic_time_together_and_never_backwards() -> None:
    clock = FakeClock(start=100.0)
    wall, mono = clock.time(), clock.monotonic()
    clock.advance(2.5)
    assert (clock.time() - wall, clock.monotonic() - mono) == (2.5, 2.5)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)
    assert clock.time() == 102.5


# -- discovery and routing -------------------------------------------------------------------


def test_discovery_lists_every_endpoint_under_the_issuer_path() -> None:
    idp = FakeIdP(issuer="https://idp.test/realms/demo")

    async def test(client: httpx.AsyncClient) -> None:
        response = await client.get("/realms/demo/.well-known/openid-configuration")
        assert response.status_code == 200
        meta = response.json()
        assert meta["issuer"] == "https://idp.test/realms/demo"
        assert meta["token_endpoint"] == "https://idp.test/realms/demo/token"
        assert meta["revocation_endpoint"] == "https://idp.test/realms/demo/revoke"
        assert meta["code_challenge_methods_supported"] == ["S256"]
        assert "none" in meta["token_endpoint_auth_methods_supported"]
        assert "offline_access" in meta["scopes_supported"]
        assert (await client.get("/.well-known/openid-configuration")).status_code == 404
        assert (await client.get("/realms/demo/token")).status_code == 405

    run_with(idp, test)
    assert idp.calls("discovery") == 1


def test_over_real_sockets_discovery_names_the_real_port_and_the_flow_works() -> None:
    idp = FakeIdP(issuer=None)
    with serve(idp) as base_url, httpx.Client(base_url=base_url) as client:
        assert base_url.startswith("http://127.0.0.1:")
        meta = client.get("/.well-known/openid-configuration").json()
        assert meta["issuer"] == base_url
        assert meta["token_endpoint"] == f"{base_url}/token"

        tokens = idp.issue()
        response = client.post(
            meta["token_endpoint"],
            data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            auth=APP,
        )
        assert response.status_code == 200
        assert jwt_parts(response.json()["id_token"])[1]["iss"] == base_url
    assert idp.issuer == base_url


def test_unknown_paths_answer_404() -> None:
    async def test(client: httpx.AsyncClient) -> int:
        return (await client.get("/nope")).status_code

    assert run_with(FakeIdP(), test) == 404


# -- /authorize and the authorization_code grant ----------------------------------------------


def test_authorization_code_flow_with_pkce_yields_tokens_and_a_signed_id_token() -> None:
    idp = FakeIdP()
    verifier, challenge = pkce_pair()

    async def test(client: httpx.AsyncClient) -> dict[str, Any]:
        redirect = await authorize(
            client,
            code_challenge=challenge,
            code_challenge_method="S256",
            nonce="n-0S6",
            prompt="consent",
            login_hint="bob",
        )
        assert redirect["state"] == "st4te"
        data = {
            "grant_type": "authorization_code",
            "code": redirect["code"],
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        }
        response = await client.post("/token", data=data, auth=APP)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        body: dict[str, Any] = response.json()
        assert (await userinfo(client, body["access_token"])).json()["sub"] == "bob"
        return body

    body = run_with(idp, test)
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "openid offline_access"
    assert body["refresh_token"]
    header, claims, _ = jwt_parts(body["id_token"])
    assert header["alg"] == "RS256"  # verified against the JWKS in test_testing_oidc.py
    assert claims["iss"] == ISSUER
    assert (claims["sub"], claims["aud"], claims["nonce"]) == ("bob", "app", "n-0S6")
    assert claims["exp"] - claims["iat"] == 300


def test_wrong_pkce_verifier_is_rejected_and_a_replayed_code_revokes_its_tokens() -> None:
    idp = FakeIdP()
    verifier, challenge = pkce_pair()

    async def test(client: httpx.AsyncClient) -> None:
        redirect = await authorize(
            client, code_challenge=challenge, code_challenge_method="S256", prompt="consent"
        )
        data = {
            "grant_type": "authorization_code",
            "code": redirect["code"],
            "redirect_uri": REDIRECT,
        }
        wrong = await client.post("/token", data={**data, "code_verifier": "x" * 43}, auth=APP)
        assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_grant")
        missing = await client.post("/token", data=data, auth=APP)
        assert missing.json()["error"] == "invalid_grant"
        other_uri = {**data, "code_verifier": verifier, "redirect_uri": "https://evil.test/"}
        assert (await client.post("/token", data=other_uri, auth=APP)).status_code == 400

        good = await client.post("/token", data={**data, "code_verifier": verifier}, auth=APP)
        assert good.status_code == 200
        replay = await client.post("/token", data={**data, "code_verifier": verifier}, auth=APP)
        assert replay.json()["error"] == "invalid_grant"
        # RFC 6749 §4.1.2: tokens issued from a replayed code are revoked.
        assert (await userinfo(client, good.json()["access_token"])).status_code == 401
        assert not idp.is_grant_active(good.json()["refresh_token"])

    run_with(idp, test)
    assert idp.token_calls("authorization_code", "invalid_grant") == 3
    assert idp.token_calls("authorization_code", "reuse_revoked") == 1


@pytest.mark.parametrize(
    "verifier", ["x" * 42, "x" * 129, "x" * 42 + "!", "y" * 20], ids=["42", "129", "bad-char", "20"]
)
def test_a_verifier_outside_rfc_7636s_alphabet_or_length_is_an_invalid_request(
    verifier: str,
) -> None:
    """RFC 7636 §4.1: 43 to 128 unreserved characters. Real providers refuse anything else
    (node oidc-provider caught a 32-character verifier of ours that this fake let through)."""

    async def test(client: httpx.AsyncClient) -> tuple[int, str]:
        digest = hashlib.sha256(verifier.encode()).digest()
        challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        redirect = await authorize(
            client, code_challenge=challenge, code_challenge_method="S256", prompt="consent"
        )
        data = {
            "grant_type": "authorization_code",
            "code": redirect["code"],
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        }
        response = await client.post("/token", data=data, auth=APP)
        return response.status_code, response.json()["error"]

    assert run_with(FakeIdP(), test) == (400, "invalid_request")


def test_a_verifier_is_refused_when_the_authorization_request_had_no_challenge() -> None:
    async def test(client: httpx.AsyncClient) -> str:
        code = (await authorize(client))["code"]
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": pkce_pair()[0],
        }
        error: str = (await client.post("/token", data=data, auth=APP)).json()["error"]
        return error

    assert run_with(FakeIdP(), test) == "invalid_grant"


def test_public_clients_must_use_pkce_and_get_a_signed_id_token_too() -> None:
    idp = FakeIdP(clients={"spa": None})
    verifier, challenge = pkce_pair()

    async def test(client: httpx.AsyncClient) -> dict[str, Any]:
        refused = await authorize(client, client_id="spa")
        assert refused["error"] == "invalid_request"
        assert refused["state"] == "st4te"
        plain = await authorize(
            client, client_id="spa", code_challenge=verifier, code_challenge_method="plain"
        )
        assert plain["error"] == "invalid_request"

        redirect = await authorize(
            client, client_id="spa", code_challenge=challenge, code_challenge_method="S256"
        )
        data = {
            "grant_type": "authorization_code",
            "client_id": "spa",
            "code": redirect["code"],
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        }
        with_secret = await client.post("/token", data={**data, "client_secret": "guess"})
        assert with_secret.status_code == 401
        response = await client.post("/token", data=data)
        assert response.status_code == 200
        cc = {"grant_type": "client_credentials", "client_id": "spa"}
        assert (await client.post("/token", data=cc)).json()["error"] == "unauthorized_client"
        body: dict[str, Any] = response.json()
        return body

    body = run_with(idp, test)
    header, claims, signature = jwt_parts(body["id_token"])
    assert (header["alg"], claims["aud"]) == ("RS256", "spa")
    assert signature
    assert "refresh_token" not in body  # no prompt=consent, so no offline_access


def test_authorize_errors_redirect_when_the_redirect_uri_is_usable_else_answer_400() -> None:
    async def test(client: httpx.AsyncClient) -> None:
        redirect = await authorize(client, response_type="token")
        assert redirect["error"] == "unsupported_response_type"
        assert "code" not in redirect
        for bad in ({"client_id": "nobody"}, {"redirect_uri": "not a uri"}):
            query = {"response_type": "code", "client_id": "app", "redirect_uri": REDIRECT, **bad}
            response = await client.get("/authorize", params=query)
            assert (response.status_code, response.json()["error"]) == (400, "invalid_request")

    run_with(FakeIdP(), test)


@pytest.mark.parametrize(
    ("prompt", "requires_consent", "gets_refresh_token"),
    [("consent", True, True), ("login", True, False), ("", False, True)],
)
def test_offline_access_is_granted_only_with_prompt_consent_unless_configured_otherwise(
    prompt: str, requires_consent: bool, gets_refresh_token: bool
) -> None:
    idp = FakeIdP(offline_access_requires_consent=requires_consent)

    async def test(client: httpx.AsyncClient) -> dict[str, Any]:
        code = (await authorize(client, prompt=prompt))["code"]
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
        body: dict[str, Any] = (await client.post("/token", data=data, auth=APP)).json()
        return body

    body = run_with(idp, test)
    assert ("refresh_token" in body) is gets_refresh_token
    assert ("offline_access" in body["scope"].split()) is gets_refresh_token


# -- refresh_token grant: rotation and reuse ---------------------------------------------------


def test_refresh_rotates_the_refresh_token_and_issues_a_new_access_token() -> None:
    idp = FakeIdP()
    first = idp.issue()

    async def test(client: httpx.AsyncClient) -> dict[str, Any]:
        response = await refresh(client, first["refresh_token"])
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        assert (await userinfo(client, body["access_token"])).status_code == 200
        return body

    second = run_with(idp, test)
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert "id_token" in second
    assert idp.token_calls("refresh_token", "success") == 1
    assert idp.is_grant_active(second["refresh_token"])


def test_reuse_of_rotated_refresh_token_revokes_the_whole_grant() -> None:
    idp = FakeIdP()
    first = idp.issue()

    async def test(client: httpx.AsyncClient) -> None:
        newest = (await refresh(client, first["refresh_token"])).json()
        reuse = await refresh(client, first["refresh_token"])
        assert (reuse.status_code, reuse.json()["error"]) == (400, "invalid_grant")
        # The whole family dies: the newest tokens too.
        denied = await userinfo(client, newest["access_token"])
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert (await refresh(client, newest["refresh_token"])).status_code == 400

    run_with(idp, test)
    assert idp.grants_revoked == 1
    assert not idp.is_grant_active(first["refresh_token"])
    assert idp.token_calls("refresh_token", "reuse_revoked") == 1
    assert idp.token_calls("refresh_token", "invalid_grant") == 1


def test_reuse_without_revoke_on_reuse_fails_only_that_request() -> None:
    idp = FakeIdP(revoke_on_reuse=False)
    first = idp.issue()

    async def test(client: httpx.AsyncClient) -> None:
        newest = (await refresh(client, first["refresh_token"])).json()
        assert (await refresh(client, first["refresh_token"])).json()["error"] == "invalid_grant"
        assert (await refresh(client, newest["refresh_token"])).status_code == 200

    run_with(idp, test)
    assert idp.grants_revoked == 0
    assert idp.token_calls(outcome="invalid_grant") == 1


def test_reuse_grace_accepts_the_old_token_inside_the_window_and_revokes_after_it() -> None:
    clock = FakeClock()
    idp = FakeIdP(clock=clock, reuse_grace=30.0)
    first = idp.issue()

    async def test(client: httpx.AsyncClient) -> None:
        newest = (await refresh(client, first["refresh_token"])).json()
        clock.advance(29)
        again = await refresh(client, first["refresh_token"])
        assert again.status_code == 200
        # Answered with the grant's current refresh token, not a new branch of the family.
        assert again.json()["refresh_token"] == newest["refresh_token"]
        assert again.json()["access_token"] != newest["access_token"]
        clock.advance(1)
        assert (await refresh(client, first["refresh_token"])).status_code == 400

    run_with(idp, test)
    assert idp.token_calls(outcome="reuse_allowed") == 1
    assert idp.token_calls(outcome="reuse_revoked") == 1
    assert not idp.is_grant_active(first["refresh_token"])


def test_reuse_count_accepts_a_consumed_token_that_many_extra_times() -> None:
    idp = FakeIdP(reuse_count=2)
    first = idp.issue()

    async def test(client: httpx.AsyncClient) -> list[int]:
        return [(await refresh(client, first["refresh_token"])).status_code for _ in range(4)]

    assert run_with(idp, test) == [200, 200, 200, 400]
    assert idp.token_calls(outcome="reuse_allowed") == 2
    assert idp.grants_revoked == 1


def test_without_rotation_the_refresh_token_stays_valid_and_is_not_returned() -> None:
    idp = FakeIdP(rotate_refresh_tokens=False)
    first = idp.issue()

    async def test(client: httpx.AsyncClient) -> None:
        for _ in range(3):
            response = await refresh(client, first["refresh_token"])
            assert response.status_code == 200
            assert "refresh_token" not in response.json()

    run_with(idp, test)
    assert idp.token_calls("refresh_token", "success") == 3
    assert idp.is_grant_active(first["refresh_token"])


def test_refresh_scope_may_narrow_the_grant_but_never_widen_it() -> None:
    idp = FakeIdP(rotate_refresh_tokens=False)
    tokens = idp.issue(scope="openid profile offline_access")

    async def test(client: httpx.AsyncClient) -> None:
        narrow = await refresh(client, tokens["refresh_token"], scope="profile")
        assert narrow.json()["scope"] == "profile"
        assert "id_token" not in narrow.json()
        wide = await refresh(client, tokens["refresh_token"], scope="profile admin")
        assert (wide.status_code, wide.json()["error"]) == (400, "invalid_scope")

    run_with(idp, test)


def test_unknown_or_foreign_refresh_tokens_are_invalid_grant() -> None:
    idp = FakeIdP(clients={"app": "app-secret", "other": "other-secret"})
    tokens = idp.issue()

    async def test(client: httpx.AsyncClient) -> list[str]:
        unknown = await refresh(client, "rt_made_up")
        foreign = await refresh(client, tokens["refresh_token"], auth=("other", "other-secret"))
        return [unknown.json()["error"], foreign.json()["error"]]

    assert run_with(idp, test) == ["invalid_grant", "invalid_grant"]
    assert idp.is_grant_active(tokens["refresh_token"])
    assert not idp.is_grant_active("rt_made_up")


def test_issue_creates_a_grant_without_a_request_and_refuses_unknown_clients() -> None:
    idp = FakeIdP()
    plain = idp.issue("carol", scope="profile")
    assert set(plain) == {"access_token", "token_type", "expires_in", "scope"}
    assert idp.token_calls() == 0
    with pytest.raises(ValueError, match="unknown client_id"):
        idp.issue(client_id="nobody")


# -- client authentication and other grants --------------------------------------------------


def test_clients_authenticate_with_basic_or_post_and_bad_secrets_get_401() -> None:
    idp = FakeIdP(clients={"app": "app-secret", "my app": "s3:cr/t+="}, rotate_refresh_tokens=False)
    tokens = idp.issue()
    odd = idp.issue(client_id="my app")

    async def test(client: httpx.AsyncClient) -> None:
        rt = tokens["refresh_token"]
        assert (await refresh(client, rt)).status_code == 200  # client_secret_basic
        post = {"client_id": "app", "client_secret": "app-secret"}
        assert (await client.post("/token", data=post | _grant(rt))).status_code == 200
        # RFC 6749 §2.3.1: Basic carries the form-urlencoded id and secret.
        basic = base64.b64encode(b"my+app:s3%3Acr%2Ft%2B%3D").decode()
        encoded = await client.post(
            "/token", data=_grant(odd["refresh_token"]), headers={"Authorization": f"Basic {basic}"}
        )
        assert encoded.status_code == 200

        failures = [
            await refresh(client, rt, auth=("app", "wrong")),
            await client.post(
                "/token", data={"client_id": "app", "client_secret": "x"} | _grant(rt)
            ),
            await client.post("/token", data={"client_id": "app"} | _grant(rt)),
            await client.post("/token", data=_grant(rt)),
            await refresh(client, rt, auth=("nobody", "app-secret")),
            await client.post("/token", data=_grant(rt), headers={"Authorization": "Basic !!"}),
        ]
        for response in failures:
            assert response.status_code == 401
            assert response.json()["error"] == "invalid_client"
            assert response.headers["www-authenticate"].startswith("Basic")
            assert "app-secret" not in response.text
        both = await refresh(client, rt, client_secret="app-secret")
        assert both.json()["error"] == "invalid_request"

    run_with(idp, test)
    assert idp.token_calls(outcome="invalid_client") == 6
    assert idp.token_calls(outcome="invalid_request") == 1


def _grant(refresh_token: str) -> dict[str, str]:
    return {"grant_type": "refresh_token", "refresh_token": refresh_token}


def test_client_credentials_gives_an_access_token_without_a_refresh_token() -> None:
    idp = FakeIdP()

    async def test(client: httpx.AsyncClient) -> dict[str, Any]:
        data = {"grant_type": "client_credentials", "scope": "reports:read"}
        response = await client.post("/token", data=data, auth=APP)
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        assert (await userinfo(client, body["access_token"])).json()["sub"] == "app"
        return body

    body = run_with(idp, test)
    assert body["scope"] == "reports:read"
    assert "refresh_token" not in body
    assert "id_token" not in body
    assert idp.token_calls("client_credentials", "success") == 1


def test_unsupported_grant_types_and_malformed_requests_are_refused() -> None:
    idp = FakeIdP()

    async def test(client: httpx.AsyncClient) -> list[tuple[int, str]]:
        responses = [
            await client.post("/token", data={"grant_type": "password"}, auth=APP),
            await client.post("/token", data={}, auth=APP),
            await client.post("/token", json={"grant_type": "client_credentials"}, auth=APP),
            await client.post("/token", content=b"grant_type=a&grant_type=b", auth=APP),
        ]
        return [(r.status_code, r.json()["error"]) for r in responses]

    assert run_with(idp, test) == [
        (400, "unsupported_grant_type"),
        (400, "invalid_request"),
        (400, "invalid_request"),
        (400, "invalid_request"),
    ]
    assert idp.token_calls("password", "unsupported_grant_type") == 1


# -- /userinfo and /revoke ----------------------------------------------------------------------


def test_userinfo_accepts_an_access_token_until_the_clock_passes_its_expiry() -> None:
    clock = FakeClock()
    idp = FakeIdP(clock=clock, access_token_lifetime=60)
    tokens = idp.issue("dana")

    async def test(client: httpx.AsyncClient) -> None:
        ok = await userinfo(client, tokens["access_token"])
        assert ok.json() == {"sub": "dana", "name": "Dana", "email": "dana@example.com"}
        posted = await client.post(
            "/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"}
        )
        assert posted.status_code == 200
        clock.advance(59)
        assert (await userinfo(client, tokens["access_token"])).status_code == 200
        clock.advance(1)
        expired = await userinfo(client, tokens["access_token"])
        assert expired.status_code == 401
        assert expired.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert (await client.get("/userinfo")).status_code == 401

    run_with(idp, test)
    assert idp.calls("userinfo") == 5


def test_revoking_a_refresh_token_kills_its_grant_and_every_access_token() -> None:
    idp = FakeIdP()
    first = idp.issue()

    async def test(client: httpx.AsyncClient) -> None:
        newest = (await refresh(client, first["refresh_token"])).json()
        data = {"token": newest["refresh_token"], "token_type_hint": "refresh_token"}
        assert (await client.post("/revoke", data=data, auth=APP)).status_code == 200
        assert (await userinfo(client, first["access_token"])).status_code == 401
        assert (await userinfo(client, newest["access_token"])).status_code == 401
        assert (await refresh(client, newest["refresh_token"])).json()["error"] == "invalid_grant"

    run_with(idp, test)
    assert idp.grants_revoked == 1
    assert idp.calls("revoke") == 1
    assert idp.token_calls("refresh_token", "invalid_grant") == 1


def test_revoking_an_access_token_kills_only_that_token_and_unknown_tokens_get_200() -> None:
    idp = FakeIdP(clients={"app": "app-secret", "other": "other-secret"})
    one, two = idp.issue(), idp.issue()

    async def test(client: httpx.AsyncClient) -> None:
        revoke = await client.post("/revoke", data={"token": one["access_token"]}, auth=APP)
        assert revoke.status_code == 200
        assert (await userinfo(client, one["access_token"])).status_code == 401
        assert (await userinfo(client, two["access_token"])).status_code == 200
        assert (await refresh(client, one["refresh_token"])).status_code == 200
        unknown = await client.post("/revoke", data={"token": "at_nope"}, auth=APP)
        assert unknown.status_code == 200
        # Another client's token: 200 as well, but nothing is revoked.
        other = ("other", "other-secret")
        foreign = await client.post("/revoke", data={"token": two["access_token"]}, auth=other)
        assert foreign.status_code == 200
        assert (await userinfo(client, two["access_token"])).status_code == 200
        bad = await client.post("/revoke", data={"token": "x"}, auth=("app", "wrong"))
        assert bad.status_code == 401
        missing = await client.post("/revoke", data={}, auth=APP)
        assert missing.json()["error"] == "invalid_request"

    run_with(idp, test)
    assert idp.grants_revoked == 0


# -- scripted faults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "retry_after", "error"),
    [
        (Fault.server_error(), 500, None, None),
        (Fault.server_error(status=502), 502, None, None),
        (Fault.unavailable(retry_after=7), 503, "7", None),
        (Fault.rate_limited(retry_after=3), 429, "3", None),
        (Fault.invalid_grant(), 400, None, "invalid_grant"),
        (Fault.invalid_grant(status=403), 403, None, "invalid_grant"),
        (Fault.invalid_client(), 401, None, "invalid_client"),
        (Fault.malformed(), 200, None, None),
    ],
    ids=lambda value: value.name if isinstance(value, Fault) else None,
)
def test_each_fault_answers_one_token_request_and_leaves_the_refresh_token_unused(
    fault: Fault, status: int, retry_after: str | None, error: str | None
) -> None:
    idp = FakeIdP()
    tokens = idp.issue()
    idp.script(fault)

    async def test(client: httpx.AsyncClient) -> None:
        response = await refresh(client, tokens["refresh_token"])
        assert response.status_code == status
        assert response.headers.get("retry-after") == retry_after
        if error is not None:
            assert response.json()["error"] == error
        else:
            with pytest.raises(json.JSONDecodeError):
                response.json()
        # The fault was consumed and the token untouched: the next call simply succeeds.
        assert (await refresh(client, tokens["refresh_token"])).status_code == 200

    run_with(idp, test)
    assert idp.token_calls("refresh_token", f"fault:{fault.name}") == 1
    assert idp.token_calls("refresh_token", "success") == 1


def test_faults_are_consumed_in_order_one_per_token_request() -> None:
    idp = FakeIdP()
    tokens = idp.issue()
    idp.script(Fault.unavailable(), Fault.rate_limited())
    idp.script(Fault.server_error())

    async def test(client: httpx.AsyncClient) -> list[int]:
        return [(await refresh(client, tokens["refresh_token"])).status_code for _ in range(4)]

    assert run_with(idp, test) == [503, 429, 500, 200]


def test_fault_constructors_refuse_statuses_their_kind_never_has() -> None:
    with pytest.raises(ValueError, match="400 or 403"):
        Fault.invalid_grant(status=401)
    with pytest.raises(ValueError, match="5xx"):
        Fault.server_error(status=404)


def test_hang_answers_nothing_until_close_and_leaves_the_refresh_token_unused() -> None:
    idp = FakeIdP()
    tokens = idp.issue()
    idp.script(Fault.hang())

    async def test(client: httpx.AsyncClient) -> None:
        pending = asyncio.ensure_future(refresh(client, tokens["refresh_token"]))
        done, _ = await asyncio.wait({pending}, timeout=0.05)
        assert not done
        assert idp.token_calls(outcome="fault:hang") == 1
        idp.close()
        response = await pending
        assert (response.status_code, response.json()["error"]) == (503, "temporarily_unavailable")
        assert (await refresh(client, tokens["refresh_token"])).status_code == 200

    run_with(idp, test)
    assert idp.token_calls(outcome="success") == 1


def test_a_client_timeout_on_a_hung_request_cancels_it_in_process() -> None:
    idp = FakeIdP()
    tokens = idp.issue()
    idp.script(Fault.hang(), Fault.hang())

    async def test(client: httpx.AsyncClient) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(refresh(client, tokens["refresh_token"]), timeout=0.05)
        idp.close()
        # After close() a scripted hang answers at once.
        assert (await refresh(client, tokens["refresh_token"])).status_code == 503
        assert (await refresh(client, tokens["refresh_token"])).status_code == 200

    run_with(idp, test)


def test_hang_after_consuming_rotates_the_token_and_then_loses_the_answer() -> None:
    idp = FakeIdP()
    tokens = idp.issue()
    idp.script(Fault.hang_after_consuming())

    async def test(client: httpx.AsyncClient) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(refresh(client, tokens["refresh_token"]), timeout=0.05)
        idp.close()
        # The client never saw the rotated token, so its retry is a reuse: the grant dies.
        retry = await refresh(client, tokens["refresh_token"])
        assert retry.json()["error"] == "invalid_grant"

    run_with(idp, test)
    assert idp.token_calls(outcome="fault:hang_after_consuming") == 1
    assert idp.token_calls(outcome="reuse_revoked") == 1
    assert not idp.is_grant_active(tokens["refresh_token"])


def test_hang_trips_an_httpx_read_timeout_over_real_sockets() -> None:
    idp = FakeIdP(issuer=None)
    tokens = idp.issue()
    idp.script(Fault.hang())
    with (
        serve(idp) as base_url,
        httpx.Client(base_url=base_url, timeout=httpx.Timeout(10, read=0.2)) as client,
    ):
        try:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/token", data=_grant(tokens["refresh_token"]), auth=APP)
        finally:
            idp.close()  # lets the parked request finish, so the server stops promptly
        response = client.post("/token", data=_grant(tokens["refresh_token"]), auth=APP)
        assert response.status_code == 200


# -- the pause gate ----------------------------------------------------------------------------


def test_pause_gate_parks_refreshes_from_several_threads_and_event_loops_until_released() -> None:
    idp = FakeIdP()
    tokens = idp.issue()
    gate = idp.pause_token_endpoint()

    def refresh_in_own_loop() -> int:
        async def test(client: httpx.AsyncClient) -> int:
            return (await refresh(client, tokens["refresh_token"])).status_code

        status: int = run_with(idp, test)
        return status

    with ThreadPoolExecutor(max_workers=5) as pool:
        try:
            results = [pool.submit(refresh_in_own_loop) for _ in range(5)]
            gate.wait_arrived(5)
            assert idp.token_calls() == 5
            assert idp.token_calls(outcome="success") == 0  # all parked, none decided
        finally:
            gate.release()
        statuses = sorted(result.result(timeout=10) for result in results)

    # A refresh storm against a rotating provider: one winner, one reuse kills the family.
    assert statuses == [200, 400, 400, 400, 400]
    assert idp.token_calls("refresh_token", "success") == 1
    assert idp.token_calls("refresh_token", "reuse_revoked") == 1
    assert idp.token_calls("refresh_token", "invalid_grant") == 3
    assert idp.grants_revoked == 1


def test_pause_gate_over_real_sockets_is_released_from_the_test_thread() -> None:
    idp = FakeIdP(issuer=None, rotate_refresh_tokens=False)
    tokens = idp.issue()
    gate = idp.pause_token_endpoint()
    with serve(idp) as base_url, httpx.Client(base_url=base_url, timeout=10) as client:

        def call() -> int:
            data = _grant(tokens["refresh_token"])
            return client.post("/token", data=data, auth=APP).status_code

        with ThreadPoolExecutor(max_workers=3) as pool:
            try:
                results = [pool.submit(call) for _ in range(3)]
                gate.wait_arrived(3)
            finally:
                gate.release()
            assert [result.result(timeout=10) for result in results] == [200, 200, 200]
        # Once released the gate stays open.
        assert call() == 200


def test_pause_gate_async_arrived_waits_in_the_same_event_loop() -> None:
    idp = FakeIdP(rotate_refresh_tokens=False)
    tokens = idp.issue()

    async def test(client: httpx.AsyncClient) -> list[int]:
        gate = idp.pause_token_endpoint()
        pending = [asyncio.ensure_future(refresh(client, tokens["refresh_token"])) for _ in "ab"]
        await gate.arrived(2)
        await gate.arrived(1)  # already satisfied: returns at once
        with pytest.raises(TimeoutError, match="2 of 3"):
            await gate.arrived(3, timeout=0.01)
        gate.release()
        return [response.status_code for response in await asyncio.gather(*pending)]

    assert run_with(idp, test) == [200, 200]


def test_wait_arrived_raises_timeout_error_when_too_few_requests_arrive() -> None:
    gate = FakeIdP().pause_token_endpoint()
    with pytest.raises(TimeoutError, match="0 of 1"):
        gate.wait_arrived(1, timeout=0.01)


def test_a_new_gate_releases_the_previous_one_and_close_releases_the_current() -> None:
    idp = FakeIdP()
    first = idp.pause_token_endpoint()
    second = idp.pause_token_endpoint()
    assert first.released
    assert not second.released
    idp.close()
    assert second.released


# -- introspection ---------------------------------------------------------------------------


def test_counters_count_every_endpoint_and_token_outcome() -> None:
    idp = FakeIdP()
    tokens = idp.issue()
    idp.script(Fault.server_error())

    async def test(client: httpx.AsyncClient) -> None:
        await client.get("/.well-known/openid-configuration")
        await authorize(client)
        await refresh(client, tokens["refresh_token"])
        await refresh(client, tokens["refresh_token"])
        await refresh(client, tokens["refresh_token"], auth=("app", "nope"))
        await client.post("/token", data={"grant_type": "client_credentials"}, auth=APP)
        await userinfo(client, tokens["access_token"])
        await client.post("/revoke", data={"token": "unknown"}, auth=APP)

    run_with(idp, test)
    calls = {name: idp.calls(name) for name in ("discovery", "authorize", "userinfo", "revoke")}
    assert calls == {"discovery": 1, "authorize": 1, "userinfo": 1, "revoke": 1}
    assert idp.calls("token") == idp.token_calls() == 4
    assert idp.token_calls("refresh_token") == 3
    assert idp.token_calls("refresh_token", "fault:server_error") == 1
    assert idp.token_calls(outcome="success") == 2
    assert idp.token_calls("client_credentials", "success") == 1
    assert idp.token_calls(outcome="invalid_client") == 1


def test_repr_never_shows_tokens_or_secrets() -> None:
    idp = FakeIdP(clients={"app": "app-secret"})
    tokens = idp.issue()
    gate = idp.pause_token_endpoint()
    text = repr(idp) + repr(gate) + repr(Fault.invalid_client()) + repr(FakeClock())
    assert "app-secret" not in text
    assert all(value not in text for value in tokens.values() if isinstance(value, str))
    assert "FakeIdP(issuer='https://idp.test'" in text
    assert "active_grants=1" in text


def test_the_idp_runs_from_several_threads_at_once_without_losing_counts() -> None:
    idp = FakeIdP(rotate_refresh_tokens=False)
    tokens = idp.issue()
    start = threading.Barrier(4)

    def worker() -> list[int]:
        async def test(client: httpx.AsyncClient) -> list[int]:
            start.wait(timeout=5)
            return [(await refresh(client, tokens["refresh_token"])).status_code for _ in "abcde"]

        statuses: list[int] = run_with(idp, test)
        return statuses

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [pool.submit(worker) for _ in range(4)]
        statuses = [status for result in results for status in result.result(timeout=10)]
    assert statuses == [200] * 20
    assert idp.token_calls("refresh_token", "success") == 20


@pytest.mark.parametrize("status", [400, 401, 403])
def test_dead_refresh_tokens_are_answered_with_the_chosen_status(status: int) -> None:
    idp = FakeIdP(dead_token_status=status)
    first = idp.issue()

    async def test(client: httpx.AsyncClient) -> list[tuple[int, str]]:
        answers = [
            await refresh(client, first["refresh_token"]),  # rotates
            await refresh(client, first["refresh_token"]),  # reused: the grant dies
            await refresh(client, "rt_never_issued"),
        ]
        return [(a.status_code, a.json().get("error", "")) for a in answers]

    assert run_with(idp, test) == [(200, ""), (status, "invalid_grant"), (status, "invalid_grant")]
    assert idp.token_calls(outcome="reuse_revoked") == 1


def test_dead_token_status_is_400_401_or_403() -> None:
    with pytest.raises(ValueError, match="dead_token_status must be one of"):
        FakeIdP(dead_token_status=500)
