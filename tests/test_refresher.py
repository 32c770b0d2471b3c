"""The refresher's invariants (DESIGN.md §3), each observed at the provider and by callers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from asgi_token_refresh import (
    ConfigurationError,
    OAuth2Client,
    ReauthenticationRequired,
    Refresher,
    RefreshUnavailable,
    TokenParams,
    TokenSet,
)
from asgi_token_refresh.testing import FakeClock, FakeIdP, Fault

from .helpers import ISSUER, login, waiting

pytestmark = pytest.mark.anyio

EXPIRED = 300.0  # FakeIdP's default access-token lifetime: advancing this far makes tokens due


def wait_for_waiters(refresher: Refresher, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while waiting(refresher) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{waiting(refresher)} of {n} callers joined")
        time.sleep(0.001)


async def userinfo_subject(idp: FakeIdP, access_token: str) -> str:
    async with httpx.AsyncClient(transport=idp.transport(), base_url=ISSUER) as http:
        response = await http.get("/userinfo", headers={"Authorization": f"Bearer {access_token}"})
    response.raise_for_status()
    subject: str = response.json()["sub"]
    return subject


# -- one flight per grant -----------------------------------------------------------------------


async def test_a_fresh_token_set_is_returned_as_is_without_any_call(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    assert await refresher.ensure_fresh(session) is session
    assert idp.calls("token") == 0


async def test_1000_concurrent_callers_make_one_provider_call(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    results = await asyncio.gather(*(refresher.ensure_fresh(session) for _ in range(1000)))
    assert idp.token_calls("refresh_token") == 1
    assert len({id(r) for r in results}) == 1
    assert results[0].refresh_token != session.refresh_token
    assert idp.is_grant_active(results[0].refresh_token or "")
    assert idp.grants_revoked == 0


async def test_200_sessions_by_50_callers_make_200_calls_and_nobody_gets_another_users_tokens(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    sessions = {f"user{i}": login(idp, clock, f"user{i}") for i in range(200)}
    clock.advance(EXPIRED)
    callers = [
        (user, refresher.ensure_fresh(ts)) for user, ts in sessions.items() for _ in range(50)
    ]
    results = await asyncio.gather(*(call for _, call in callers))
    assert idp.token_calls("refresh_token") == 200
    by_user: dict[str, set[str]] = {}
    for (user, _), result in zip(callers, results, strict=True):
        by_user.setdefault(user, set()).add(result.access_token)
    assert all(len(tokens) == 1 for tokens in by_user.values())
    for user, tokens in by_user.items():
        assert await userinfo_subject(idp, next(iter(tokens))) == user
    assert idp.grants_revoked == 0


async def test_requests_with_different_parameters_are_never_coalesced(clock: FakeClock) -> None:
    idp = FakeIdP(issuer=ISSUER, clock=clock, rotate_refresh_tokens=False)
    client = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=idp.transport(),
        clock=clock,
    )
    refresher = Refresher(client, jitter=0)
    session = login(idp, clock)
    clock.advance(EXPIRED)
    narrow, wide = TokenParams(scope="openid"), TokenParams(scope="openid offline_access")
    results = await asyncio.gather(
        *(refresher.ensure_fresh(session, params=narrow) for _ in range(20)),
        *(refresher.ensure_fresh(session, params=wide) for _ in range(20)),
    )
    await client.aclose()
    assert idp.token_calls("refresh_token") == 2
    assert {r.scope for r in results[:20]} == {"openid"}
    assert {r.scope for r in results[20:]} == {"openid offline_access"}


# -- stragglers ---------------------------------------------------------------------------------


async def test_stragglers_with_the_old_refresh_token_get_the_new_tokens_without_a_call(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    new = await refresher.ensure_fresh(session)
    clock.advance(30)  # within the 60 s grace TTL
    stragglers = await asyncio.gather(*(refresher.ensure_fresh(session) for _ in range(20)))
    assert all(s is new for s in stragglers)
    assert idp.token_calls("refresh_token") == 1
    assert idp.is_grant_active(new.refresh_token or "")


async def test_chained_rotations_hand_generation_0_stragglers_generation_3(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    gen0 = login(idp, clock)
    clock.advance(EXPIRED)
    gen1 = await refresher.ensure_fresh(gen0)
    gen2 = await refresher.renew(gen1)  # the API rejected gen1's access token, say
    gen3 = await refresher.renew(gen2)
    assert (
        len({gen0.refresh_token, gen1.refresh_token, gen2.refresh_token, gen3.refresh_token}) == 4
    )
    assert await refresher.ensure_fresh(gen0) is gen3
    # compare-and-refresh: gen1's access token failed, but gen3 is already newer
    assert await refresher.renew(gen1, failed_access_token=gen1.access_token) is gen3
    assert idp.token_calls("refresh_token") == 3
    assert idp.grants_revoked == 0


async def test_after_the_grace_ttl_a_straggler_is_sent_and_the_strict_provider_refuses(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    await refresher.ensure_fresh(session)
    clock.advance(61)
    with pytest.raises(ReauthenticationRequired) as caught:
        await refresher.ensure_fresh(session)
    assert caught.value.reason == "invalid_grant"


# -- the flight outlives its callers ------------------------------------------------------------


async def test_cancelling_the_leader_cancels_only_its_wait(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    gate = idp.pause_token_endpoint()
    persisted: list[TokenSet] = []
    saved = threading.Event()

    def persist(token_set: TokenSet) -> None:
        persisted.append(token_set)
        saved.set()

    leader = asyncio.create_task(refresher.ensure_fresh(session, on_refreshed=persist))
    await gate.arrived(1)
    followers = [asyncio.create_task(refresher.ensure_fresh(session)) for _ in range(10)]
    await asyncio.sleep(0)  # let the followers join the flight
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    gate.release()
    results = await asyncio.gather(*followers)
    assert await asyncio.to_thread(saved.wait, 5)
    assert all(r is persisted[0] for r in results)
    assert idp.token_calls("refresh_token") == 1


async def test_tokens_are_persisted_even_when_every_caller_is_gone(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    gate = idp.pause_token_endpoint()
    persisted: list[TokenSet] = []
    saved = threading.Event()

    async def persist(token_set: TokenSet) -> None:
        persisted.append(token_set)
        saved.set()

    callers = [
        asyncio.create_task(refresher.ensure_fresh(session, on_refreshed=persist)) for _ in range(5)
    ]
    await gate.arrived(1)
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    gate.release()
    assert await asyncio.to_thread(saved.wait, 5)
    assert persisted[0].refresh_token != session.refresh_token
    # and a straggler that comes back gets those tokens from the grace cache
    assert await refresher.ensure_fresh(session) is persisted[0]
    assert idp.token_calls("refresh_token") == 1


def test_callers_on_two_event_loops_and_on_threads_share_one_flight(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    gate = idp.pause_token_endpoint()
    results: list[TokenSet] = []
    results_lock = threading.Lock()

    def on_own_loop() -> None:
        async def storm() -> list[TokenSet]:
            return await asyncio.gather(*(refresher.ensure_fresh(session) for _ in range(20)))

        got = asyncio.run(storm())
        with results_lock:
            results.extend(got)

    def in_worker_thread() -> None:
        got = refresher.sync.ensure_fresh(session)
        with results_lock:
            results.append(got)

    threads = [threading.Thread(target=on_own_loop) for _ in range(2)]
    threads += [threading.Thread(target=in_worker_thread) for _ in range(5)]
    for thread in threads:
        thread.start()
    gate.wait_arrived(1)
    wait_for_waiters(refresher, 45)
    gate.release()
    for thread in threads:
        thread.join(10)
    assert len(results) == 45
    assert len({r.access_token for r in results}) == 1
    assert idp.token_calls("refresh_token") == 1


def test_the_sync_api_refuses_to_block_an_event_loop(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)

    async def misuse() -> None:
        refresher.sync.ensure_fresh(session)

    with pytest.raises(RuntimeError, match="use the async API"):
        asyncio.run(misuse())


# -- re-checks after winning (invariants 3 and 5) -----------------------------------------------


async def test_the_leader_uses_a_token_set_another_process_already_stored(
    refresher: Refresher, client: OAuth2Client, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    rotated_elsewhere = await client.refresh(session.refresh_token or "", previous=session)
    results = await asyncio.gather(
        *(refresher.ensure_fresh(session, current=lambda: rotated_elsewhere) for _ in range(10))
    )
    assert all(r is rotated_elsewhere for r in results)
    assert idp.token_calls("refresh_token") == 1  # only the other process's call
    assert idp.grants_revoked == 0


async def test_invalid_grant_rereads_the_store_once_before_declaring_the_session_dead(
    refresher: Refresher, client: OAuth2Client, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    rotated_elsewhere = await client.refresh(session.refresh_token or "", previous=session)
    reads = iter([None, rotated_elsewhere])  # the other write lands while our call is out
    idp.script(Fault.invalid_grant())
    result = await refresher.ensure_fresh(session, current=lambda: next(reads))
    assert result is rotated_elsewhere
    assert idp.token_calls("refresh_token", "fault:invalid_grant") == 1


@pytest.mark.parametrize("status", [400, 403])
async def test_invalid_grant_is_terminal_and_cached_for_the_grace_ttl(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, status: int
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    idp.script(Fault.invalid_grant(status=status))
    outcomes = await asyncio.gather(
        *(refresher.ensure_fresh(session) for _ in range(10)), return_exceptions=True
    )
    assert all(
        isinstance(o, ReauthenticationRequired) and o.reason == "invalid_grant" for o in outcomes
    )
    assert len({id(o) for o in outcomes}) == 10  # each caller gets its own exception object
    clock.advance(59)
    with pytest.raises(ReauthenticationRequired):
        await refresher.ensure_fresh(session)
    assert idp.token_calls() == 1  # a dead session does not storm the provider
    clock.advance(2)
    assert (await refresher.ensure_fresh(session)).refresh_token != session.refresh_token
    assert idp.token_calls() == 2


async def test_a_session_without_a_refresh_token_needs_reauthentication(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = TokenSet.from_token_response(
        idp.issue(scope="openid"), issued_at=clock.time(), default_lifetime=60
    )
    clock.advance(EXPIRED)
    with pytest.raises(ReauthenticationRequired) as caught:
        await refresher.ensure_fresh(session)
    assert caught.value.reason == "no_session"


async def test_after_logout_stragglers_are_refused(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    gen0 = login(idp, clock)
    clock.advance(EXPIRED)
    gen1 = await refresher.ensure_fresh(gen0)
    refresher.forget(gen1)
    with pytest.raises(ReauthenticationRequired) as caught:
        await refresher.ensure_fresh(gen0)
    assert caught.value.reason == "no_session"


# -- transient failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "retry_after"),
    [
        (Fault.server_error(), 5.0),
        (Fault.unavailable(retry_after=7), 7.0),
        (Fault.rate_limited(3), 3.0),
    ],
)
async def test_provider_trouble_is_transient_and_keeps_the_session(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, fault: Fault, retry_after: float
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    idp.script(fault)
    outcomes = await asyncio.gather(
        *(refresher.ensure_fresh(session) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(o, RefreshUnavailable) and o.retry_after == retry_after for o in outcomes)
    # while the provider asked us to back off, nobody calls it
    with pytest.raises(RefreshUnavailable):
        await refresher.ensure_fresh(session)
    assert idp.token_calls() == 1
    assert idp.is_grant_active(session.refresh_token or "")
    clock.advance(retry_after)
    recovered = await refresher.ensure_fresh(session)
    assert recovered.refresh_token != session.refresh_token
    assert idp.token_calls() == 2


async def test_a_provider_that_never_answers_times_out_and_keeps_the_session(
    client: OAuth2Client, idp: FakeIdP, clock: FakeClock
) -> None:
    refresher = Refresher(client, jitter=0, timeout=0.05)
    session = login(idp, clock)
    clock.advance(EXPIRED)
    idp.script(Fault.hang())
    outcomes = await asyncio.gather(
        *(refresher.ensure_fresh(session) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, RefreshUnavailable) and o.reason == "timeout" for o in outcomes)
    assert idp.is_grant_active(session.refresh_token or "")


@pytest.mark.parametrize(("reuse_grace", "survives"), [(30.0, True), (0.0, False)])
async def test_a_lost_response_after_the_provider_rotated_depends_on_its_grace_window(
    clock: FakeClock, reuse_grace: float, survives: bool
) -> None:
    """Documented behaviour: if the answer to a rotation is lost, we cannot know the token was
    consumed. The retry presents it again; a provider with a reuse grace window answers, a
    strict one refuses (and revokes the grant)."""
    idp = FakeIdP(issuer=ISSUER, clock=clock, reuse_grace=reuse_grace)
    client = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=idp.transport(),
        clock=clock,
    )
    refresher = Refresher(client, jitter=0, timeout=0.05)
    session = login(idp, clock)
    clock.advance(EXPIRED)
    idp.script(Fault.hang_after_consuming())
    with pytest.raises(RefreshUnavailable):
        await refresher.ensure_fresh(session)
    clock.advance(5)  # the provider's Retry-After default
    if survives:
        assert (await refresher.ensure_fresh(session)).refresh_token != session.refresh_token
    else:
        with pytest.raises(ReauthenticationRequired):
            await refresher.ensure_fresh(session)
    idp.close()
    await client.aclose()


async def test_garbage_from_the_provider_is_transient_and_keeps_the_session(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    idp.script(Fault.malformed())
    with pytest.raises(RefreshUnavailable) as caught:
        await refresher.ensure_fresh(session)
    assert caught.value.reason == "provider_error"
    assert "HTTP 200 invalid_response: token response is not JSON" in str(caught.value)
    clock.advance(caught.value.retry_after)  # the provider recovers: the session lives on
    assert (await refresher.ensure_fresh(session)).refresh_token != session.refresh_token


# -- skew ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lifetime", "lead"), [(300.0, 60.0), (90.0, 45.0), (30.0, 15.0)])
def test_skew_is_clamped_to_half_the_lifetime(
    idp: FakeIdP, clock: FakeClock, client: OAuth2Client, lifetime: float, lead: float
) -> None:
    refresher = Refresher(client, skew=60, jitter=0)
    idp.access_token_lifetime = lifetime
    session = login(idp, clock)
    clock.advance(lifetime - lead - 0.01)
    assert not refresher.refresh_due(session)
    clock.advance(0.01)
    assert refresher.refresh_due(session)


def test_jitter_only_ever_refreshes_earlier(
    client: OAuth2Client, idp: FakeIdP, clock: FakeClock
) -> None:
    refresher = Refresher(client, skew=60, jitter=5)
    session = login(idp, clock)
    clock.advance(EXPIRED - 65.01)
    assert not any(refresher.refresh_due(session) for _ in range(1000))
    clock.advance(5.01)
    assert all(refresher.refresh_due(session) for _ in range(1000))


# -- bounded, fair provider concurrency ---------------------------------------------------------


class _Recording(httpx.AsyncBaseTransport):
    """Wraps a transport; records the peak of concurrent token requests and their order."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.active = self.peak = 0
        self.order: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.order.append(request.content)
        try:
            response = await self.inner.handle_async_request(request)
            await asyncio.sleep(0.002)  # hold the slot so flights overlap
            return response
        finally:
            self.active -= 1


async def test_provider_concurrency_is_bounded_and_first_come_first_served(
    idp: FakeIdP, clock: FakeClock
) -> None:
    transport = _Recording(idp.transport())
    client = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=transport,
        clock=clock,
    )
    refresher = Refresher(client, jitter=0, max_concurrency=3)
    sessions = [login(idp, clock, f"user{i}") for i in range(30)]
    clock.advance(EXPIRED)
    await asyncio.gather(*(refresher.ensure_fresh(s) for s in sessions))
    await client.aclose()
    assert idp.token_calls("refresh_token", "success") == 30
    assert transport.peak == 3
    sent = [
        next(s.refresh_token for s in sessions if (s.refresh_token or "") in body.decode())
        for body in transport.order
    ]
    assert sent == [s.refresh_token for s in sessions]


# -- client credentials -------------------------------------------------------------------------


async def test_client_credentials_are_single_flight_and_cached_per_parameters(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    api, admin = TokenParams(scope="api"), TokenParams(scope="admin")
    first = await asyncio.gather(*(refresher.client_credentials(api) for _ in range(100)))
    other = await refresher.client_credentials(admin)
    assert len({t.access_token for t in first}) == 1
    assert other.access_token != first[0].access_token
    assert await refresher.client_credentials(api) is first[0]
    assert idp.token_calls("client_credentials") == 2
    clock.advance(EXPIRED)
    assert (await refresher.client_credentials(api)).access_token != first[0].access_token
    assert idp.token_calls("client_credentials") == 3


# -- configuration and secrecy ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"skew": -1}, "skew"),
        ({"grace_ttl": float("nan")}, "grace_ttl"),
        ({"timeout": 0}, "timeout"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_bad_options_are_configuration_errors(
    client: OAuth2Client, options: dict[str, float], complaint: str
) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        Refresher(client, **options)  # type: ignore[arg-type]


def test_one_shared_refresher_per_provider_and_client(idp: FakeIdP) -> None:
    def make() -> OAuth2Client:
        return OAuth2Client(
            client_id="shared-test", client_secret="s", token_endpoint=f"{ISSUER}/token"
        )

    first = Refresher.shared(make(), grace_ttl=30)
    assert Refresher.shared(make()) is first
    assert Refresher.shared(make(), grace_ttl=30) is first
    with pytest.raises(ConfigurationError, match="already exists"):
        Refresher.shared(make(), grace_ttl=90)
    other_clock = OAuth2Client(
        client_id="shared-test",
        client_secret="s",
        token_endpoint=f"{ISSUER}/token",
        clock=FakeClock(),
    )
    with pytest.raises(ConfigurationError, match="another OAuth2Client"):
        Refresher.shared(other_clock)


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG):
        yield caplog


async def test_no_token_or_secret_in_any_repr_error_or_log(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock, all_logs: pytest.LogCaptureFixture
) -> None:
    sessions = [login(idp, clock, f"user{i}") for i in range(4)]
    clock.advance(EXPIRED)
    idp.script(Fault.invalid_grant(), Fault.server_error(), Fault.malformed())
    outcomes = await asyncio.gather(
        *(refresher.ensure_fresh(s) for s in sessions), return_exceptions=True
    )
    rendered = [repr(refresher), repr(refresher.client), repr(idp), all_logs.text]
    for outcome in outcomes:
        rendered += [repr(outcome), str(outcome)]
        if isinstance(outcome, BaseException):
            rendered += [repr(outcome.__cause__), str(outcome.__cause__), repr(vars(outcome))]
    secrets = {"app-secret"}
    for ts in [*sessions, *(o for o in outcomes if isinstance(o, TokenSet))]:
        secrets |= {t for t in (ts.access_token, ts.refresh_token, ts.id_token) if t}
    assert len(secrets) > 8
    text = "\n".join(rendered)
    assert not [s for s in secrets if s in text]
    assert "needs reauthentication" in all_logs.text  # the logs do say what happened


def test_the_refresher_outlives_the_event_loops_of_its_callers(
    refresher: Refresher, idp: FakeIdP, clock: FakeClock
) -> None:
    session = login(idp, clock)
    clock.advance(EXPIRED)
    # The caller's loop is closed as soon as asyncio.run returns; the refresher keeps working.
    asyncio.run(refresher.ensure_fresh(session))
    later = login(idp, clock, "bob")
    clock.advance(EXPIRED)
    assert asyncio.run(refresher.ensure_fresh(later)).refresh_token != later.refresh_token
