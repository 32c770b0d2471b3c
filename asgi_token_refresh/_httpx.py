"""TokenAuth: bearer injection for httpx, with one 401 → one compare-and-refresh → one retry.

One I/O-free generator (:meth:`TokenAuth._flow`) decides what happens; the sync and async
shells only fetch tokens and pass requests through, as httpx's own ``Auth`` classes do. A
second 401 is terminal. Token-endpoint failures surface from the token source and are never
retried here. Per-user tokens live only on per-request clients: the pooled transport they share
carries no user state (the lesson of CVE-2024-51987).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, Literal, Protocol

import httpx

from ._errors import ConfigurationError, ReauthenticationRequired, TokenEndpointError
from ._keys import TokenParams
from ._per_loop import PerLoop
from ._provider_http import instrumented
from ._refresher import Refresher
from ._single_flight import run_blocking
from ._telemetry import Telemetry, default_telemetry
from ._tokens import TokenSet

__all__ = [
    "MachineTokens",
    "SessionTokens",
    "SyncTokens",
    "TokenAuth",
    "TokenSource",
    "close_shared_pool",
    "shared_client",
]


class TokenSource(Protocol):
    """Where :class:`TokenAuth` gets tokens: ``request.state.token``, :class:`SessionTokens`,
    :class:`MachineTokens` or their ``.sync`` forms (whose methods are not coroutines)."""

    def get(self) -> Any: ...

    def renew(self, failed_access_token: str | None = None) -> Any: ...


class _Renew:
    """What the flow yields to ask its shell for a new token after ``failed`` was rejected."""

    __slots__ = ("failed",)

    def __init__(self, failed: str) -> None:
        self.failed = failed


_Step = Generator["httpx.Request | _Renew", "httpx.Response | str", None]


class TokenAuth(httpx.Auth):
    """``Authorization: Bearer`` from a token source; a 401 refreshes once and retries once.

    ``on_terminal``: what a second 401 does — ``"raise"`` :class:`ReauthenticationRequired`
    (``reason="downstream_401"``; the middleware turns it into its terminal response) or
    ``"response"`` (return the 401 as is). ``anonymous``: a source to fall back on when the
    user has no session left (e.g. ``MachineTokens``), so requests continue anonymously.

    The request body is read into memory before sending so it can be replayed; pass
    ``replay_body=False`` for uploads too large for that: a 401 to a streamed body that cannot
    be replayed is then returned, not retried.
    """

    def __init__(
        self,
        source: TokenSource,
        *,
        on_terminal: Literal["raise", "response"] = "raise",
        anonymous: TokenSource | None = None,
        replay_body: bool = True,
        telemetry: Telemetry | None = None,
        on_failure: Callable[[ReauthenticationRequired], None] | None = None,
    ) -> None:
        if on_terminal not in ("raise", "response"):
            raise ConfigurationError("on_terminal must be 'raise' or 'response'")
        self.source = source
        self.anonymous = anonymous
        self.on_terminal = on_terminal
        self.requires_request_body = replay_body
        self._on_failure = on_failure
        self.telemetry = telemetry or getattr(source, "telemetry", None) or default_telemetry()
        refresher = getattr(source, "refresher", None)
        self._provider: str | None = refresher.client.name if refresher is not None else None

    def __repr__(self) -> str:
        return f"TokenAuth(source={type(self.source).__name__}, on_terminal={self.on_terminal!r})"

    # -- the decision, shared by both shells ---------------------------------------------------

    def _flow(self, request: httpx.Request, token: str) -> _Step:
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        assert isinstance(response, httpx.Response)
        if response.status_code != 401:
            return
        if not isinstance(request.stream, httpx.ByteStream):
            return  # a streamed body was consumed: it cannot be sent again
        new_token = yield _Renew(token)
        assert isinstance(new_token, str)
        request.headers["Authorization"] = f"Bearer {new_token}"
        response = yield request
        assert isinstance(response, httpx.Response)
        if response.status_code == 401:
            # Counted here, whatever on_terminal does with it. A refusal from the token source
            # (a dead session) is the source's to count: the accessor's as asgi, SessionTokens'
            # and MachineTokens' as httpx.
            self.telemetry.terminal_failure("downstream_401", "httpx", self._provider)
            if self.on_terminal == "raise":
                error = ReauthenticationRequired("downstream_401", "the API refused a fresh token")
                if self._on_failure is not None:
                    self._on_failure(error)
                raise error

    # -- shells ------------------------------------------------------------------------------

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        if inspect.iscoroutinefunction(self.source.get):
            raise ConfigurationError("a sync httpx.Client needs a sync token source: use .sync")
        if self.requires_request_body:
            request.read()  # a streamed body, buffered so that a 401 can be retried
        flow = self._flow(request, self._sync_get())
        step = next(flow)
        try:
            while True:
                if isinstance(step, _Renew):
                    step = flow.send(self.source.renew(step.failed))
                else:
                    step = flow.send((yield step))
        except StopIteration:
            return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if not inspect.iscoroutinefunction(self.source.get):
            raise ConfigurationError("an httpx.AsyncClient needs an async token source")
        if self.requires_request_body:
            await request.aread()  # a streamed body, buffered so that a 401 can be retried
        flow = self._flow(request, await self._async_get())
        step = next(flow)
        try:
            while True:
                if isinstance(step, _Renew):
                    step = flow.send(await self.source.renew(step.failed))
                else:
                    step = flow.send((yield step))
        except StopIteration:
            return

    def _sync_get(self) -> str:
        try:
            token: str = self.source.get()
        except ReauthenticationRequired:
            if self.anonymous is None:
                raise
            token = self.anonymous.get()
        return token

    async def _async_get(self) -> str:
        try:
            token: str = await self.source.get()
        except ReauthenticationRequired:
            if self.anonymous is None:
                raise
            token = await self.anonymous.get()
        return token


# -- standalone token sources (background jobs, machine tokens) ----------------------------------


class SessionTokens:
    """A user's tokens outside a request (a background job acting for the user).

    Shares the process-wide refresher with the web app, so a job and a request of the same
    session never both spend the refresh token. ``on_refreshed`` persists new tokens.
    """

    def __init__(self, refresher: Refresher, token_set: TokenSet, **hooks: Any) -> None:
        self.refresher = refresher
        self.token_set = token_set
        self.telemetry = refresher.telemetry
        self._hooks = hooks

    def __repr__(self) -> str:
        return f"SessionTokens({self.token_set!r})"

    async def get(self) -> str:
        try:
            self.token_set = await self.refresher.ensure_fresh(self.token_set, **self._hooks)
        except ReauthenticationRequired as exc:
            _count_terminal(self.refresher, exc.reason)
            raise
        return self.token_set.access_token

    async def renew(self, failed_access_token: str | None = None) -> str:
        try:
            self.token_set = await self.refresher.renew(
                self.token_set, failed_access_token=failed_access_token, **self._hooks
            )
        except ReauthenticationRequired as exc:
            _count_terminal(self.refresher, exc.reason)
            raise
        return self.token_set.access_token

    @property
    def sync(self) -> SyncTokens:
        """This source for a sync ``httpx.Client`` in a worker thread."""
        return SyncTokens(self)


class MachineTokens:
    """Client-credentials tokens for ``params``, cached and single-flight per process."""

    def __init__(self, refresher: Refresher, params: TokenParams | None = None) -> None:
        self.refresher = refresher
        self.params = params or TokenParams()
        self.telemetry = refresher.telemetry

    def __repr__(self) -> str:
        return f"MachineTokens(params={self.params!r})"

    async def get(self) -> str:
        try:
            return (await self.refresher.client_credentials(self.params)).access_token
        except TokenEndpointError as exc:  # the client is refused: terminal
            _count_terminal(self.refresher, exc.error)
            raise

    async def renew(self, failed_access_token: str | None = None) -> str:
        try:
            token_set = await self.refresher.client_credentials(
                self.params, failed_access_token=failed_access_token
            )
        except TokenEndpointError as exc:
            _count_terminal(self.refresher, exc.error)
            raise
        return token_set.access_token

    @property
    def sync(self) -> SyncTokens:
        """This source for a sync ``httpx.Client`` in a worker thread."""
        return SyncTokens(self)


class SyncTokens:
    """The blocking form of an async token source, for threads without an event loop."""

    def __init__(self, source: SessionTokens | MachineTokens) -> None:
        self.source = source
        self.refresher = source.refresher  # (TokenAuth labels its counts with the provider)
        self.telemetry = source.telemetry

    def get(self) -> str:
        return run_blocking(self.source.get())

    def renew(self, failed_access_token: str | None = None) -> str:
        return run_blocking(self.source.renew(failed_access_token))


def _count_terminal(refresher: Refresher, reason: str) -> None:
    """A standalone source's terminal failure, counted once where its caller meets it."""
    refresher.telemetry.terminal_failure(reason, "httpx", refresher.client.name)


# -- per-request clients over a shared pool -----------------------------------------------------


class _Shared(httpx.AsyncBaseTransport):
    """A pooled transport that per-request clients use but cannot close."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        pass  # owned by the process (or by whoever passed it in), not by one request


async def _close_pools(by_provider: dict[tuple[int, int], _Shared]) -> None:
    for shared in by_provider.values():
        await shared.inner.aclose()


# A connection pool belongs to one event loop: one per loop (and telemetry providers), closed when
# the loop shuts down.
_pools: PerLoop[dict[tuple[int, int], _Shared]] = PerLoop(dict, close=_close_pools)


async def close_shared_pool() -> None:
    """Close the running loop's shared pool now (the middleware does it at lifespan shutdown,
    when the server may stop the loop without finalizing it)."""
    await _close_pools(_pools.pop() or {})


def shared_client(
    source: TokenSource,
    telemetry: Telemetry,
    *,
    on_failure: Callable[[ReauthenticationRequired], None] | None = None,
    **options: Any,
) -> httpx.AsyncClient:
    """A new ``httpx.AsyncClient`` authenticating with ``source`` over the loop's shared pool.

    ``options`` go to ``httpx.AsyncClient``; ``transport=`` replaces the shared pool (and is
    not closed with the client); ``auth=`` is not accepted.
    """
    if "auth" in options:
        raise ConfigurationError("the client authenticates with the session's tokens; no auth=")
    transport = options.pop("transport", None)
    if transport is not None:
        shared = _Shared(instrumented(transport, telemetry))
    else:
        by_provider = _pools.get()
        providers = (id(telemetry.tracer_provider), id(telemetry.meter_provider))
        pooled = by_provider.get(providers)
        if pooled is None:
            pool = instrumented(httpx.AsyncHTTPTransport(), telemetry)
            pooled = by_provider[providers] = _Shared(pool)
        shared = pooled
    return httpx.AsyncClient(
        transport=shared,
        auth=TokenAuth(source, telemetry=telemetry, on_failure=on_failure),
        **options,
    )
