"""Duplicate refreshes made visible: a provider call that refreshed a session someone else had
already refreshed is counted in ``refresh.duplicates``, by how it was noticed.

Here each "someone else" is a second process's refresh done by hand; the two-process version
runs real workers (tests/test_coordination.py). Every case asserts the provider's own count
of calls next to the library's, and that nothing is counted when nothing was duplicated.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from asgi_token_refresh import (
    MemorySessionStore,
    OAuth2Client,
    ReauthenticationRequired,
    Refresher,
    TokenSet,
)
from asgi_token_refresh._telemetry import DUPLICATES
from asgi_token_refresh.testing import CapturedTelemetry, FakeClock, FakeIdP, capture_telemetry

from .helpers import ISSUER, login

pytestmark = pytest.mark.anyio

EXPIRED = 3600.0  # past the login tokens' lifetime: every refresh below is due


@pytest.fixture
def captured() -> Iterator[CapturedTelemetry]:
    capture = capture_telemetry()
    yield capture
    capture.shutdown()


def client_for(idp: FakeIdP, clock: FakeClock, captured: CapturedTelemetry) -> OAuth2Client:
    return OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=idp.transport(),
        clock=clock,
        name="fake",
        telemetry=captured.telemetry,
    )


def duplicates(captured: CapturedTelemetry) -> dict[str, float]:
    counts: dict[str, float] = {}
    for attributes, point in captured.points(DUPLICATES):
        if point.value:
            key = attributes["asgi_token_refresh.detected_by"]
            counts[key] = counts.get(key, 0) + point.value
    return counts


async def refreshed_elsewhere(idp: FakeIdP, clock: FakeClock, token_set: TokenSet) -> TokenSet:
    """Another process's refresh of ``token_set`` (its own client, not our refresher)."""
    other = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=idp.transport(),
        clock=clock,
    )
    try:
        assert token_set.refresh_token is not None
        return await other.refresh(token_set.refresh_token, previous=token_set)
    finally:
        await other.aclose()


async def test_a_refresh_the_store_refuses_as_a_second_of_its_generation_is_a_store_conflict(
    clock: FakeClock, captured: CapturedTelemetry
) -> None:
    """A grace-window provider accepts both refreshes of one generation; the server-side
    store keeps the first written and refuses ours."""
    idp = FakeIdP(issuer=ISSUER, clock=clock, reuse_grace=60.0)
    store = MemorySessionStore(clock=clock, secure=False)
    refresher = Refresher(client_for(idp, clock, captured), jitter=0)
    first = login(idp, clock)
    session, _ = await store.save({}, None, first, new_session=True)
    assert session is not None
    clock.advance(EXPIRED)
    theirs = await refreshed_elsewhere(idp, clock, first)
    assert await store.persist(session, theirs)

    # Our request read the store before their write (the race replicas have without a
    # coordinator), so it refreshes the same generation.
    ours = await refresher.ensure_fresh(
        first, current=lambda: first, on_refreshed=lambda t: store.persist(session, t)
    )
    assert ours.access_token != theirs.access_token
    assert idp.token_calls("refresh_token") == 2
    assert duplicates(captured) == {"store_conflict": 1}
    assert await store.read(session) == theirs  # the first written stays
    idp.close()


async def test_an_invalid_grant_answered_for_a_token_someone_rotated_first_is_newer_stored(
    clock: FakeClock, captured: CapturedTelemetry
) -> None:
    """A strict provider refuses our presentation of a refresh token another process had
    just rotated; the store holds its successor, which we serve."""
    idp = FakeIdP(issuer=ISSUER, clock=clock, revoke_on_reuse=False)
    refresher = Refresher(client_for(idp, clock, captured), jitter=0)
    first = login(idp, clock)
    clock.advance(EXPIRED)
    theirs = await refreshed_elsewhere(idp, clock, first)
    reads = 0

    def current() -> TokenSet:
        nonlocal reads
        reads += 1
        return first if reads == 1 else theirs  # they write just after our first look

    assert await refresher.ensure_fresh(first, current=current) == theirs
    assert idp.token_calls("refresh_token") == 2
    assert idp.token_calls("refresh_token", outcome="invalid_grant") == 1
    assert duplicates(captured) == {"newer_stored": 1}
    idp.close()


async def test_an_invalid_grant_for_a_token_this_process_spent_is_spent_here(
    clock: FakeClock, captured: CapturedTelemetry
) -> None:
    """After the grace window a straggler presents a refresh token this very process rotated
    (its write-back was lost, say): the provider refuses it, and it is counted."""
    idp = FakeIdP(issuer=ISSUER, clock=clock)
    refresher = Refresher(client_for(idp, clock, captured), jitter=0, grace_ttl=10.0)
    first = login(idp, clock)
    clock.advance(EXPIRED)
    await refresher.ensure_fresh(first)
    assert duplicates(captured) == {}
    clock.advance(11.0)  # the grace cache forgot the rotation
    with pytest.raises(ReauthenticationRequired):
        await refresher.ensure_fresh(first)
    assert idp.token_calls("refresh_token") == 2
    assert duplicates(captured) == {"spent_here": 1}
    idp.close()


async def test_one_refresher_alone_counts_no_duplicate(
    clock: FakeClock, captured: CapturedTelemetry
) -> None:
    idp = FakeIdP(issuer=ISSUER, clock=clock)
    store = MemorySessionStore(clock=clock, secure=False)
    refresher = Refresher(client_for(idp, clock, captured), jitter=0)
    token_set = login(idp, clock)
    session, _ = await store.save({}, None, token_set, new_session=True)
    assert session is not None
    for _ in range(3):
        clock.advance(EXPIRED)
        token_set = await refresher.ensure_fresh(
            token_set,
            current=lambda: store.read(session),
            on_refreshed=lambda t: store.persist(session, t),
        )
    assert idp.token_calls("refresh_token") == 3
    assert duplicates(captured) == {}
    idp.close()
