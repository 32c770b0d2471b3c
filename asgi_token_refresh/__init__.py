"""asgi-token-refresh: single-flight OAuth2 token refresh for ASGI apps.

One token-endpoint call per grant, however many requests, tabs, threads or event loops find the
access token expired at once; stragglers served from a grace cache; dead sessions cached as dead.
"""

from ._accessor import SyncTokenAccessor, TokenAccessor
from ._clock import Clock, SystemClock
from ._coordination import Coordinator, Lease, LocalCoordinator
from ._errors import (
    ConfigurationError,
    ReauthenticationRequired,
    RefreshUnavailable,
    TokenEndpointError,
    TokenRefreshError,
)
from ._file_coordinator import FileCoordinator
from ._httpx import BlockingTokens, MachineTokens, SessionTokens, TokenAuth, TokenSource
from ._middleware import TokenRefreshMiddleware
from ._oauth import AuthorizationRequest, OAuth2Client, ProviderMetadata
from ._refresher import Refresher, TokenParams
from ._stores import CookieSessionStore, MemorySessionStore, Session, SessionStore
from ._telemetry import Telemetry
from ._tokens import TokenSet

__version__ = "0.1.0"

__all__ = [
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
