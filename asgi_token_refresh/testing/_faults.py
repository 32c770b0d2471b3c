"""Scripted misbehaviour of the fake provider's token endpoint, and the gate that parks requests.

A :class:`Fault` is what one token request gets instead of a normal answer (``fault_response``
builds it); a :class:`Gate` holds token requests until the test releases them, so concurrency
can be lined up without sleeping. Both are queued or installed through
:class:`~asgi_token_refresh.testing.FakeIdP`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

from ._http import Reject, Response, error_response, invalid_client


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted misbehaviour of the token endpoint; build it with the class methods."""

    name: str
    status: int = 500
    retry_after: int | None = None

    @classmethod
    def server_error(cls, status: int = 500) -> Fault:
        """A 5xx with a plain-text body, as a crashing gateway sends."""
        if not 500 <= status <= 599:
            raise ValueError("server_error status must be 5xx")
        return cls("server_error", status)

    @classmethod
    def unavailable(cls, retry_after: int = 7) -> Fault:
        """503 with ``Retry-After``."""
        return cls("unavailable", 503, retry_after)

    @classmethod
    def rate_limited(cls, retry_after: int = 3) -> Fault:
        """429 with ``Retry-After``."""
        return cls("rate_limited", 429, retry_after)

    @classmethod
    def hang(cls) -> Fault:
        """Never answer (until :meth:`FakeIdP.close`); the refresh token is left untouched."""
        return cls("hang", 503)

    @classmethod
    def hang_after_consuming(cls) -> Fault:
        """Process the request (rotating the refresh token), then never answer: a lost response."""
        return cls("hang_after_consuming", 503)

    @classmethod
    def malformed(cls) -> Fault:
        """200 whose body is not JSON although it claims to be."""
        return cls("malformed", 200)

    @classmethod
    def invalid_grant(cls, status: int = 400) -> Fault:
        """``invalid_grant`` with status 400, or 403 as Auth0 sends it."""
        if status not in (400, 403):
            raise ValueError("invalid_grant status must be 400 or 403")
        return cls("invalid_grant", status)

    @classmethod
    def invalid_client(cls) -> Fault:
        """401 ``invalid_client``."""
        return cls("invalid_client", 401)


def fault_response(fault: Fault) -> Response:
    retry = (("retry-after", str(fault.retry_after)),) if fault.retry_after is not None else ()
    if fault.name == "malformed":
        return Response(200, b"<html><body>Bad Gateway</body></html>", (), "application/json")
    if fault.name == "invalid_grant":
        return error_response(
            Reject("invalid_grant", "refresh token is invalid or expired", status=fault.status)
        )
    if fault.name == "invalid_client":
        return error_response(invalid_client())
    # Gateways in front of an IdP answer these, usually not in OAuth's JSON.
    return Response(fault.status, b"upstream failure", retry)


_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


def _wake(waiters: list[_Waiter]) -> None:
    # The waiter's loop may belong to another thread: futures are not thread-safe, so the
    # result is set from inside that loop.
    for loop, future in waiters:
        with contextlib.suppress(RuntimeError):  # that loop is closed; nobody is waiting
            loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Gate:
    """Parks token requests until :meth:`release`; see :meth:`FakeIdP.pause_token_endpoint`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._released = False
        self._arrivals = 0
        self._parked: list[_Waiter] = []
        self._watchers: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def released(self) -> bool:
        with self._cond:
            return self._released

    def release(self) -> None:
        """Let every parked request (and every later one) through. Callable from any thread."""
        with self._cond:
            self._released = True
            parked, self._parked = self._parked, []
        _wake(parked)

    def wait_arrived(self, n: int, timeout: float = 5.0) -> None:
        """Block this thread until ``n`` requests have been parked, else ``TimeoutError``.

        Never call it on the thread whose event loop runs the IdP: use :meth:`arrived` there.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._arrivals >= n, timeout):
                raise TimeoutError(f"{self._arrivals} of {n} token requests arrived")

    async def arrived(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Async form of :meth:`wait_arrived`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        watcher = (n, loop, future)
        with self._cond:
            if self._arrivals >= n:
                return
            self._watchers.append(watcher)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            with self._cond:
                arrivals = self._arrivals
            raise TimeoutError(f"{arrivals} of {n} token requests arrived") from None
        finally:
            with self._cond:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)

    async def _park(self) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._released:
                return
            self._arrivals += 1
            self._parked.append((loop, future))
            self._cond.notify_all()
            ready = [(lp, f) for n, lp, f in self._watchers if self._arrivals >= n]
        _wake(ready)
        await future

    def __repr__(self) -> str:
        return f"Gate(arrivals={self._arrivals}, released={self.released})"
