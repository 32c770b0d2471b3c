"""Shared fixtures: a fake clock, a strict FakeIdP, a client and a refresher wired to both."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from asgi_token_refresh import OAuth2Client, Refresher
from asgi_token_refresh.testing import FakeClock, FakeIdP

from .helpers import ISSUER
from .processes import RedisServer, running_redis


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def idp(clock: FakeClock) -> Iterator[FakeIdP]:
    provider = FakeIdP(issuer=ISSUER, clock=clock)
    yield provider
    provider.close()


@pytest.fixture
def client(idp: FakeIdP, clock: FakeClock) -> OAuth2Client:
    return OAuth2Client.from_discovery(
        ISSUER,
        client_id="app",
        client_secret="app-secret",
        transport=idp.transport(),
        clock=clock,
    )


@pytest.fixture
def refresher(client: OAuth2Client) -> Refresher:
    return Refresher(client, jitter=0.0)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests flush it (``FLUSHALL``) as they need."""
    with running_redis() as server:
        yield server
