"""asgi-token-refresh: single-flight OAuth2 token refresh for ASGI apps.

One token-endpoint call per grant, however many requests, tabs, threads or event loops find the
access token expired at once; stragglers served from a grace cache; dead sessions cached as dead.
"""

from ._accessor import SyncTokenAccessor, TokenAccessor
from ._clock import Clock, SystemClock
from ._cookie_store import CookieSessionStore
from ._coordination import Coordinator, Lease, LocalCoordinator
from ._errors import (
    ConfigurationError,
    LoginFailed,
    ReauthenticationRequired,
    RefreshUnavailable,
    TokenEndpointError,
    TokenRefreshError,
)
from ._file_coordinator import FileCoordinator
from ._httpx import MachineTokens, SessionTokens, SyncTokens, TokenAuth, TokenSource
from ._keys import TokenParams
from ._login import OIDCLogin
from ._memory_store import MemorySessionStore
from ._middleware import TokenRefreshMiddleware
from ._oauth import OAuth2Client
from ._oauth_messages import AuthorizationRequest, ProviderMetadata
from ._refresher import Refresher, SyncRefresher
from ._sessions import ServerSideStore, Session, SessionStore
from ._telemetry import Telemetry
from ._tokens import TokenSet

__version__ = "0.1.0"

__all__ = [
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
