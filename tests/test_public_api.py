"""The public surface is pinned: changing it must be a deliberate edit of this file."""

import ast
from pathlib import Path

import asgi_token_refresh
import asgi_token_refresh.kit
import asgi_token_refresh.redis
import asgi_token_refresh.testing

PUBLIC = [
    "AuthorizationRequest",
    "Clock",
    "ConfigurationError",
    "CookieSessionStore",
    "Coordinator",
    "FileCoordinator",
    "Lease",
    "LocalCoordinator",
    "LoginFailed",
    "MachineTokens",
    "MemorySessionStore",
    "OAuth2Client",
    "OIDCLogin",
    "ProviderMetadata",
    "ReauthenticationRequired",
    "RefreshUnavailable",
    "Refresher",
    "ServerSideStore",
    "Session",
    "SessionStore",
    "SessionTokens",
    "SyncRefresher",
    "SyncTokenAccessor",
    "SyncTokens",
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


def test_the_extension_kit_is_pinned() -> None:
    assert asgi_token_refresh.kit.__all__ == [
        "DEFAULT_MAX_AGE",
        "BackendSessionStore",
        "CookieWriter",
        "Coordinator",
        "Lease",
        "LocalCoordinator",
        "PerLoop",
        "Published",
        "SameSite",
        "Sealer",
        "ServerSideStore",
        "Session",
        "SessionBackend",
        "SessionCookie",
        "SessionStore",
        "SizeLimitedStore",
        "decode_outcome",
        "encode_outcome",
        "new_session_id",
        "parse_cookie_header",
        "session_max_age",
        "supersedes",
        "validate_cookie_options",
    ]
    assert asgi_token_refresh.redis.__all__ == [
        "RedisCoordinator",
        "RedisSessionBackend",
        "RedisSessionStore",
    ]


PACKAGE = Path(asgi_token_refresh.__file__).parent
# The built-in backends are written against the public names, as a third-party one would be:
# each may also use helper modules of its own.
BACKENDS = {
    "_memory_store.py": set(),
    "_file_coordinator.py": {"_file_locks"},
    "redis/_coordinator.py": {"_connection"},
    "redis/_sessions.py": {"_connection"},
}
PUBLIC_NAMES = set(asgi_token_refresh.__all__) | set(asgi_token_refresh.kit.__all__)


def test_built_in_backends_use_only_public_names() -> None:
    for backend, own_helpers in BACKENDS.items():
        taken = {
            alias.name
            for node in ast.walk(ast.parse((PACKAGE / backend).read_text()))
            if isinstance(node, ast.ImportFrom) and node.level > 0
            if (node.module or "").split(".")[-1] not in own_helpers
            for alias in node.names
        }
        assert taken <= PUBLIC_NAMES, (backend, taken - PUBLIC_NAMES)


def test_no_module_of_the_package_reaches_into_another_modules_private_names() -> None:
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not any(alias.name.startswith("_") for alias in node.names), path
