import asyncio
import base64
import socket
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from asgi_token_refresh import (
    ConfigurationError,
    OAuth2Client,
    ProviderMetadata,
    RefreshUnavailable,
    TokenEndpointError,
)
from asgi_token_refresh._oauth_messages import (
    build_authorization_url,
    build_token_request,
    new_authorization_request,
    pkce_challenge,
    raise_for_token_response,
    request_secrets,
    retry_after_seconds,
    token_error,
)
from asgi_token_refresh.testing import FakeClock, FakeIdP, Fault, serve

from .helpers import ISSUER, login

pytestmark = pytest.mark.anyio
NOW = 1_700_000_000.0

# -- pure request building and response parsing -----------------------------------------------


def test_client_secret_basic_form_encodes_id_and_secret_before_base64() -> None:
    request = build_token_request(
        "https://idp/token",
        {"grant_type": "refresh_token", "refresh_token": "rt", "scope": None},
        client_id="my app",
        client_secret="s:e%cret",
        auth_method="client_secret_basic",
    )
    scheme, encoded = request.headers["Authorization"].split()
    assert scheme == "Basic"
    assert base64.b64decode(encoded) == b"my+app:s%3Ae%25cret"
    assert request.form == {"grant_type": "refresh_token", "refresh_token": "rt"}


def test_client_secret_post_puts_credentials_in_the_form() -> None:
    request = build_token_request(
        "https://idp/token",
        {"grant_type": "client_credentials"},
        client_id="app",
        client_secret="shh",
        auth_method="client_secret_post",
    )
    assert "Authorization" not in request.headers
    assert request.form == {
        "grant_type": "client_credentials",
        "client_id": "app",
        "client_secret": "shh",
    }


def test_public_clients_send_only_their_id() -> None:
    request = build_token_request(
        "https://idp/token",
        {"grant_type": "x"},
        client_id="spa",
        client_secret=None,
        auth_method="none",
    )
    assert request.form == {"grant_type": "x", "client_id": "spa"}
    assert "Authorization" not in request.headers


def test_token_request_repr_shows_field_names_only() -> None:
    request = build_token_request(
        "https://idp/token",
        {"refresh_token": "RT-VALUE"},
        client_id="app",
        client_secret="SECRET-VALUE",
        auth_method="client_secret_post",
    )
    assert "VALUE" not in repr(request)
    assert "refresh_token" in repr(request)


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_authorization_url_carries_pkce_state_nonce_and_prompt() -> None:
    url = build_authorization_url(
        "https://idp/authorize?tenant=x",
        client_id="app",
        redirect_uri="https://app/callback",
        scope="openid offline_access",
        state="st",
        code_verifier="v" * 43,
        nonce="n",
        prompt="consent",
    )
    query = parse_qs(urlsplit(url).query)
    assert query["tenant"] == ["x"]
    assert query["code_challenge"] == [pkce_challenge("v" * 43)]
    assert query["code_challenge_method"] == ["S256"]
    assert (query["state"], query["nonce"], query["prompt"]) == (["st"], ["n"], ["consent"])


def test_a_new_login_has_its_own_verifier_state_and_nonce_and_asks_consent_for_offline() -> None:
    first, second = (
        new_authorization_request(
            "https://idp/authorize",
            client_id="app",
            redirect_uri="https://app/callback",
            scope="openid offline_access",
        )
        for _ in range(2)
    )
    query = parse_qs(urlsplit(first.url).query)
    assert 43 <= len(first.code_verifier) <= 128  # RFC 7636 §4.1
    assert query["code_challenge"] == [pkce_challenge(first.code_verifier)]
    assert (query["state"], query["nonce"]) == ([first.state], [first.nonce])
    assert query["prompt"] == ["consent"]  # OIDC Core §11
    assert first.code_verifier != second.code_verifier
    assert (first.state, first.nonce) != (second.state, second.nonce)
    plain = new_authorization_request(
        "https://idp/authorize", client_id="app", redirect_uri="https://app/cb", scope="api"
    )
    assert plain.nonce is None
    assert "prompt" not in parse_qs(urlsplit(plain.url).query)


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert retry_after_seconds("7", now=NOW) == 7.0
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:40 GMT", now=NOW) == 20.0
    assert retry_after_seconds("soon", now=NOW) is None
    assert retry_after_seconds(None, now=NOW) is None


@pytest.mark.parametrize("status", [400, 401, 403])
@pytest.mark.parametrize("error", ["invalid_grant", "invalid_client", "unauthorized_client"])
def test_terminal_oauth_errors_are_classified_by_the_error_field_not_the_status(
    status: int, error: str
) -> None:
    body = f'{{"error": "{error}", "error_description": "d", "error_uri": "https://e"}}'.encode()
    with pytest.raises(TokenEndpointError) as caught:
        raise_for_token_response(status, {}, body, now=NOW)
    assert (caught.value.error, caught.value.status) == (error, status)
    assert (caught.value.error_description, caught.value.error_uri) == ("d", "https://e")


@pytest.mark.parametrize("status", [400, 401, 403])
@pytest.mark.parametrize(
    "error", ["invalid_request", "invalid_scope", "unsupported_grant_type", "access_denied"]
)
def test_every_other_oauth_error_is_the_provider_misbehaving_not_a_dead_session(
    status: int, error: str
) -> None:
    body = f'{{"error": "{error}", "error_description": "d"}}'.encode()
    with pytest.raises(RefreshUnavailable) as caught:
        raise_for_token_response(status, {}, body, now=NOW)
    assert caught.value.reason == "provider_error"
    assert caught.value.retry_after == 5.0
    assert isinstance(caught.value.__cause__, TokenEndpointError)
    assert caught.value.__cause__.error == error


@pytest.mark.parametrize(
    ("status", "headers", "body", "retry_after"),
    [
        (500, {}, b"oops", 5.0),
        (503, {"retry-after": "7"}, b"", 7.0),
        (429, {"retry-after": "3"}, b'{"error": "slow_down"}', 3.0),
        (400, {}, b'{"error": "temporarily_unavailable"}', 5.0),
    ],
)
def test_provider_trouble_is_transient(
    status: int, headers: dict[str, str], body: bytes, retry_after: float
) -> None:
    with pytest.raises(RefreshUnavailable) as caught:
        raise_for_token_response(status, headers, body, now=NOW)
    assert caught.value.reason == "provider_error"
    assert caught.value.retry_after == retry_after
    assert isinstance(caught.value.__cause__, TokenEndpointError)


def test_a_non_oauth_error_body_is_an_invalid_response_and_transient() -> None:
    with pytest.raises(RefreshUnavailable) as caught:
        raise_for_token_response(404, {}, b"<html>not found</html>", now=NOW)
    cause = caught.value.__cause__
    assert isinstance(cause, TokenEndpointError)
    assert (cause.error, cause.status) == ("invalid_response", 404)
    assert "HTTP 404 invalid_response" in str(caught.value)


def test_a_refusal_read_unclassified_says_what_the_provider_said_without_its_echoes() -> None:
    request = build_token_request(
        "https://idp/token",
        {"grant_type": "refresh_token", "refresh_token": "rt-secret"},
        client_id="app",
        client_secret="client-secret",
        auth_method="client_secret_basic",
    )
    basic = request.headers["Authorization"].removeprefix("Basic ")
    assert set(request_secrets(request, "client-secret")) == {"rt-secret", "client-secret", basic}
    body = (
        b'{"error": "invalid_grant", "error_description": "rt-secret for client-secret (%s)"}'
        % basic.encode()
    )
    error = token_error(
        403, {"retry-after": "3"}, body, now=NOW, secrets=request_secrets(request, "client-secret")
    )
    assert (error.error, error.status, error.retry_after) == ("invalid_grant", 403, 3.0)
    assert error.error_description == "[redacted] for [redacted] ([redacted])"
    assert token_error(502, {}, b"<html>", now=NOW).error == "invalid_response"


def test_discovery_document_must_name_the_expected_issuer() -> None:
    doc = b'{"issuer": "https://evil.test", "token_endpoint": "https://evil.test/token"}'
    with pytest.raises(ConfigurationError, match=r"expected 'https://idp\.test'"):
        ProviderMetadata.from_discovery_document(doc, issuer=ISSUER)


@pytest.mark.parametrize(
    ("doc", "complaint"),
    [
        (b"<html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"issuer": "https://idp.test"}', "no token_endpoint"),
        (b'{"issuer": "https://idp.test", "token_endpoint": "ftp://x"}', "not a URL"),
    ],
)
def test_broken_discovery_documents_are_configuration_errors(doc: bytes, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        ProviderMetadata.from_discovery_document(doc, issuer=ISSUER)


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"client_id": ""}, "client_id is required"),
        ({"client_id": "a", "client_secret": "s"}, "token_endpoint"),
        ({"client_id": "a", "token_endpoint": "https://x"}, "needs a client_secret"),
        ({"client_id": "a", "client_secret": "s", "token_endpoint": "idp/token"}, "http"),
        ({"client_id": "a", "auth_method": "tls", "token_endpoint": "https://x"}, "auth_method"),
        (
            {"client_id": "a", "client_secret": "s", "token_endpoint": "https://x", "timeout": 0},
            "timeout",
        ),
    ],
)
def test_bad_configuration_fails_at_construction(
    options: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        OAuth2Client(**options)  # type: ignore[arg-type]


def test_repr_never_shows_the_client_secret() -> None:
    client = OAuth2Client(client_id="app", client_secret="TOP-SECRET", token_endpoint="https://x/t")
    assert "TOP-SECRET" not in repr(client) + str(client)


# -- I/O against the FakeIdP --------------------------------------------------------------------


async def test_discovery_is_fetched_once_for_concurrent_first_callers(
    client: OAuth2Client, idp: FakeIdP, clock: FakeClock
) -> None:
    sessions = [login(idp, clock, f"user{i}") for i in range(5)]
    refreshed = await asyncio.gather(*(client.refresh(s.refresh_token or "") for s in sessions))
    assert len({t.access_token for t in refreshed}) == 5
    await client.metadata()
    assert idp.calls("discovery") == 1


async def test_refresh_rotates_and_keeps_the_id_token(
    client: OAuth2Client, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(10)
    new = await client.refresh(session.refresh_token or "", previous=session)
    assert new.refresh_token != session.refresh_token
    assert new.id_token is not None
    assert new.issued_at == clock.time()
    assert idp.token_calls("refresh_token", "success") == 1


async def test_client_credentials_grant(client: OAuth2Client, idp: FakeIdP) -> None:
    token = await client.client_credentials(scope="api")
    assert token.refresh_token is None
    assert token.scope == "api"
    assert idp.token_calls("client_credentials", "success") == 1


async def test_login_with_authorization_code_and_pkce(client: OAuth2Client, idp: FakeIdP) -> None:
    start = await client.authorization_url(
        "https://app.test/callback", scope="openid offline_access"
    )
    query = parse_qs(urlsplit(start.url).query)
    assert query["prompt"] == ["consent"]  # OIDC Core §11 for offline_access
    async with httpx.AsyncClient(transport=idp.transport(), base_url=ISSUER) as browser:
        response = await browser.get(start.url)
    callback = parse_qs(urlsplit(response.headers["location"]).query)
    assert callback["state"] == [start.state]
    tokens = await client.exchange_code(
        callback["code"][0], redirect_uri=start.redirect_uri, code_verifier=start.code_verifier
    )
    assert tokens.refresh_token is not None
    assert "VERIFIER" not in repr(start)
    with pytest.raises(TokenEndpointError) as caught:  # codes are single-use
        await client.exchange_code(
            callback["code"][0], redirect_uri=start.redirect_uri, code_verifier=start.code_verifier
        )
    assert caught.value.error == "invalid_grant"


async def test_revocation_ends_the_grant(
    client: OAuth2Client, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    await client.revoke(session.refresh_token or "")
    assert not idp.is_grant_active(session.refresh_token or "")


@pytest.mark.parametrize("auth_method", ["client_secret_post", "client_secret_basic"])
async def test_both_secret_methods_authenticate(idp: FakeIdP, auth_method: str) -> None:
    client = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        auth_method=auth_method,  # type: ignore[arg-type]
        transport=idp.transport(),
    )
    await client.client_credentials()
    await client.aclose()
    assert idp.token_calls(outcome="success") == 1


async def test_a_wrong_secret_is_an_invalid_client_error(idp: FakeIdP) -> None:
    client = OAuth2Client(
        client_id="app",
        client_secret="wrong",
        token_endpoint=f"{ISSUER}/token",
        transport=idp.transport(),
    )
    with pytest.raises(TokenEndpointError) as caught:
        await client.client_credentials()
    await client.aclose()
    assert (caught.value.error, caught.value.status) == ("invalid_client", 401)
    assert "wrong" not in str(caught.value)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault.server_error(), RefreshUnavailable),
        (Fault.unavailable(retry_after=9), RefreshUnavailable),
        (Fault.malformed(), RefreshUnavailable),
        (Fault.invalid_grant(status=403), TokenEndpointError),
    ],
)
async def test_faults_surface_as_typed_errors_without_the_refresh_token(
    client: OAuth2Client, idp: FakeIdP, clock: FakeClock, fault: Fault, expected: type[Exception]
) -> None:
    session = login(idp, clock)
    idp.script(fault)
    with pytest.raises(expected) as caught:
        await client.refresh(session.refresh_token or "")
    error = caught.value
    rendered = f"{error!s} {error!r} {error.__cause__!r} {vars(error)}"
    assert (session.refresh_token or "") not in rendered


async def once(client: OAuth2Client) -> None:
    """One client-credentials call on this loop, then close the loop's pool."""
    try:
        await client.client_credentials()
    finally:
        await client.aclose()


def test_a_provider_that_does_not_answer_times_out_over_real_sockets() -> None:
    idp = FakeIdP(issuer=None)
    idp.script(Fault.hang())
    with serve(idp) as base_url:
        client = OAuth2Client(
            client_id="app",
            client_secret="app-secret",
            token_endpoint=f"{base_url}/token",
            timeout=0.2,
        )
        with pytest.raises(RefreshUnavailable) as caught:
            asyncio.run(once(client))
        idp.close()
    assert caught.value.reason == "timeout"


def test_an_unreachable_provider_is_a_network_error() -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = OAuth2Client(
        client_id="app", client_secret="s", token_endpoint=f"http://127.0.0.1:{port}/token"
    )
    with pytest.raises(RefreshUnavailable) as caught:
        asyncio.run(once(client))
    assert caught.value.reason == "network_error"


# -- where the endpoints come from ------------------------------------------------------------


def metadata_provider(
    issuer: str, *, oidc: dict[str, str], oauth: dict[str, str] | None
) -> tuple[httpx.MockTransport, list[str]]:
    """A provider that serves OIDC discovery and, if given, RFC 8414 metadata at the path
    RFC 8414 §3.1 prescribes (the issuer's path after the well-known segment)."""
    parts = urlsplit(issuer)
    oauth_path = f"/.well-known/oauth-authorization-server{parts.path.rstrip('/')}"
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == parts.path.rstrip("/") + "/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": issuer, **oidc})
        if oauth is not None and request.url.path == oauth_path:
            return httpx.Response(200, json={"issuer": issuer, **oauth})
        if request.url.path.endswith("/revoke"):
            return httpx.Response(200)
        return httpx.Response(404)

    return httpx.MockTransport(handle), seen


@pytest.mark.parametrize("issuer", ["https://idp.test", "https://idp.test/tenants/acme"])
async def test_a_revocation_endpoint_published_only_in_rfc_8414_metadata_is_found(
    issuer: str,
) -> None:
    transport, seen = metadata_provider(
        issuer,
        oidc={"token_endpoint": f"{issuer}/token", "jwks_uri": f"{issuer}/jwks"},
        oauth={"token_endpoint": f"{issuer}/token", "revocation_endpoint": f"{issuer}/revoke"},
    )
    client = OAuth2Client.from_discovery(
        issuer, client_id="a", client_secret="s", transport=transport
    )
    metadata = await client.metadata()
    assert metadata.revocation_endpoint == f"{issuer}/revoke"
    assert metadata.jwks_uri == f"{issuer}/jwks"
    assert await client.revoke("rt") is True
    assert seen[-1].endswith("/revoke")


async def test_an_explicit_revocation_endpoint_is_honoured_with_discovery() -> None:
    issuer = "https://idp.test"
    transport, seen = metadata_provider(
        issuer, oidc={"token_endpoint": f"{issuer}/token"}, oauth=None
    )
    client = OAuth2Client.from_discovery(
        issuer,
        client_id="a",
        client_secret="s",
        transport=transport,
        revocation_endpoint=f"{issuer}/custom/revoke",
    )
    assert (await client.metadata()).revocation_endpoint == f"{issuer}/custom/revoke"
    assert not any("oauth-authorization-server" in path for path in seen)


async def test_a_provider_without_any_revocation_endpoint_says_so() -> None:
    issuer = "https://idp.test"
    transport, _ = metadata_provider(issuer, oidc={"token_endpoint": f"{issuer}/token"}, oauth=None)
    client = OAuth2Client.from_discovery(
        issuer, client_id="a", client_secret="s", transport=transport
    )
    assert (await client.metadata()).revocation_endpoint is None
    assert await client.revoke("rt") is False
