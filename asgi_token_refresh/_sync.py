"""The blocking twins: the same methods as the async objects, for sync code in a worker
thread (a sync endpoint in Starlette's threadpool, a sync ``httpx.Client``).

Every async object with a blocking form offers it as ``.sync``: ``Refresher.sync``,
``request.state.token.sync``, ``SessionTokens.sync``, ``MachineTokens.sync``. Each method takes
the fresh path without blocking when it can, and otherwise runs the async method to the end
with :func:`run_blocking` (refused inside a running event loop, which it would freeze).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._keys import NO_PARAMS, TokenParams
from ._single_flight import run_blocking
from ._tokens import TokenSet

if TYPE_CHECKING:
    from ._accessor import TokenAccessor
    from ._httpx import MachineTokens, SessionTokens
    from ._refresher import Refresher
    from ._telemetry import Telemetry

__all__ = ["SyncRefresher", "SyncTokenAccessor", "SyncTokens"]


class SyncRefresher:
    """:class:`Refresher` for sync code in a worker thread: the same methods, blocking."""

    __slots__ = ("refresher",)

    def __init__(self, refresher: Refresher) -> None:
        self.refresher = refresher

    def ensure_fresh(self, token_set: TokenSet, **options: Any) -> TokenSet:
        if self.refresher.serve_fresh(token_set):
            return token_set
        return run_blocking(self.refresher.ensure_fresh(token_set, **options))

    def renew(self, token_set: TokenSet, **options: Any) -> TokenSet:
        return run_blocking(self.refresher.renew(token_set, **options))

    def client_credentials(self, params: TokenParams = NO_PARAMS, **options: Any) -> TokenSet:
        return run_blocking(self.refresher.client_credentials(params, **options))


class SyncTokenAccessor:
    """Blocking twin of :class:`TokenAccessor` for code in a worker thread (never in a loop)."""

    __slots__ = ("_accessor",)

    def __init__(self, accessor: TokenAccessor) -> None:
        self._accessor = accessor

    @property
    def refresher(self) -> Refresher:
        return self._accessor.refresher

    @property
    def telemetry(self) -> Telemetry:
        return self._accessor.telemetry

    def get(self) -> str:
        token = self._accessor.cached_fresh_token()
        return token if token is not None else run_blocking(self._accessor.get())

    def headers(self) -> dict[str, str]:
        return run_blocking(self._accessor.headers())

    def token_set(self) -> TokenSet | None:
        return run_blocking(self._accessor.token_set())

    def is_authenticated(self) -> bool:
        return run_blocking(self._accessor.is_authenticated())

    def renew(self, failed_access_token: str | None = None) -> str:
        return run_blocking(self._accessor.renew(failed_access_token))


class SyncTokens:
    """The blocking form of an async token source, for threads without an event loop."""

    def __init__(self, source: SessionTokens | MachineTokens) -> None:
        self.source = source
        self.telemetry = source.telemetry

    def get(self) -> str:
        return run_blocking(self.source.get())

    def renew(self, failed_access_token: str | None = None) -> str:
        return run_blocking(self.source.renew(failed_access_token))
