"""The public surface is pinned: changing it must be a deliberate edit of this file."""

import asgi_token_refresh
import asgi_token_refresh.testing

PUBLIC = [
    "AuthorizationRequest",
    "BlockingTokens",
    "Clock",
    "ConfigurationError",
    "CookieSessionStore",
    "Coordinator",
    "FileCoordinator",
    "Lease",
    "LocalCoordinator",
    "MachineTokens",
    "MemorySessionStore",
    "OAuth2Client",
    "ProviderMetadata",
    "ReauthenticationRequired",
    "RefreshUnavailable",
    "Refresher",
    "Session",
    "SessionStore",
    "SessionTokens",
    "SyncTokenAccessor",
    "SystemClock",
    "Telemetry",
    "TokenAccessor",
    "TokenAuth",
    "TokenEndpointError",
    "TokenParams",
    "TokenRefreshError",
    "TokenRefreshMiddleware",
    "TokenSet",
    "TokenSource",
    "__version__",
]


def test_all_is_sorted_and_pinned() -> None:
    assert asgi_token_refresh.__all__ == sorted(asgi_token_refresh.__all__)
    assert asgi_token_refresh.__all__ == PUBLIC


def test_every_exported_name_exists_and_claims_the_public_module() -> None:
    for name in PUBLIC:
        member = getattr(asgi_token_refresh, name)
        if name != "__version__":
            assert member.__module__.startswith("asgi_token_refresh"), name


def test_testing_helpers_are_public() -> None:
    assert asgi_token_refresh.testing.__all__ == [
        "CapturedTelemetry",
        "FakeClock",
        "FakeIdP",
        "Fault",
        "Gate",
        "capture_telemetry",
        "serve",
    ]


def test_version_is_a_release_string() -> None:
    assert asgi_token_refresh.__version__.count(".") == 2
