"""The blocking twins, for sync code in a worker thread (a sync endpoint, a sync httpx
client): every method of the async original, run on the library's private loop
(``_single_flight.run_blocking``) unless the answer is at hand without awaiting. Never call
them inside an event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from ._errors import ConfigurationError
from ._httpx import TokenAuth
from ._keys import NO_PARAMS, TokenParams
from ._single_flight import run_blocking
from ._tokens import TokenSet

if TYPE_CHECKING:
    from ._accessor import TokenAccessor
    from ._refresher import Refresher
    from ._telemetry import Telemetry

__all__ = ["SyncRefresher", "SyncTokenAccessor"]


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

    def claims(self) -> dict[str, Any] | None:
        return run_blocking(self._accessor.claims())

    def login(self, tokens: TokenSet | Mapping[str, Any] | bytes) -> TokenSet:
        return run_blocking(self._accessor.login(tokens))

    def logout(self, *, revoke: bool = True) -> None:
        run_blocking(self._accessor.logout(revoke=revoke))

    def client(self, **options: Any) -> httpx.Client:
        """A new ``httpx.Client`` for this request: bearer injected, one 401 → one
        compare-and-refresh → one retry. ``options`` go to ``httpx.Client``."""
        if "auth" in options:
            raise ConfigurationError("the client authenticates with the session's tokens")
        auth = TokenAuth(self, telemetry=self.telemetry, on_failure=self._accessor.record_failure)
        return httpx.Client(auth=auth, **options)
