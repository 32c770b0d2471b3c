"""RedisSessionStore against a real redis-server: sealed at rest, compare-and-set, TTLs, and
the middleware keeping sessions (and their refreshes) in Redis for every worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from asgi_token_refresh import (
    OAuth2Client,
    Refresher,
    ServerSideStore,
    Session,
    SessionStore,
    TokenRefreshMiddleware,
)
from asgi_token_refresh import TokenSet as TokenSetType
from asgi_token_refresh.redis import RedisCoordinator, RedisSessionStore
from asgi_token_refresh.testing import FakeClock, FakeIdP

from .processes import RedisServer, running_redis

pytestmark = pytest.mark.anyio

SECRET = "redis-store-test-secret-" + "s" * 32
OTHER_SECRET = "another-app-secret-" + "o" * 32
NOW = 1_700_000_000.0
THIRTY_DAYS = 30 * 24 * 3600
EXPIRED = 300.0  # FakeIdP's access-token lifetime
APP = "https://app.test"


def token_set(generation: float = NOW, extra: dict[str, object] | None = None) -> TokenSetType:
    """A token set whose tokens are long, unique and easy to look for in Redis."""
    tag = f"{generation:.0f}-{random.randrange(10**12):012d}"
    return TokenSetType(
        access_token=f"at-secret-{tag}-access",
        refresh_token=f"rt-secret-{tag}-refresh",
        id_token=f"eyJ.id-secret-{tag}.sig",
        scope="openid offline_access",
        issued_at=generation,
        expires_at=generation + 300,
        extra=extra or {},
    )


def cookie_value(header: str) -> str:
    return header.split(";", 1)[0].split("=", 1)[1]


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.cli("FLUSHALL")
    return redis_server.url


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client for looking at (and tampering with) what the store wrote."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisSessionStore]:
    session_store = RedisSessionStore(redis_url, secret_keys=[SECRET])
    yield session_store
    asyncio.run(session_store.aclose())


def session_keys(raw: redis.Redis) -> list[bytes]:
    return sorted(raw.scan_iter(match=b"atr:session:*"))


# -- the SessionStore contract ----------------------------------------------------------------


def test_the_store_implements_the_protocol_and_is_server_side(
    store: RedisSessionStore,
) -> None:
    assert isinstance(store, SessionStore)
    assert isinstance(store, ServerSideStore)
    assert SECRET not in repr(store)


async def test_login_load_save_clear_round_trip_with_flagged_cookies(
    store: RedisSessionStore, raw: redis.Redis
) -> None:
    first = token_set()
    session, cookies = await store.save({}, None, first, new_session=True)
    assert session is not None
    assert session.id is not None
    assert len(cookies) == 1
    header = cookies[0]
    assert header.startswith(f"atr_sid={session.id};")
    for attribute in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/", f"Max-Age={THIRTY_DAYS}"):
        assert attribute in header.split("; ")
    jar = {"atr_sid": cookie_value(header)}

    loaded = await store.load(jar)
    assert loaded == Session(first, session.id)
    assert loaded.token_set.to_dict() == first.to_dict()

    # A refresh keeps the id and re-sends the cookie (its Max-Age slides with the session).
    second = token_set(NOW + 300)
    again, cookies = await store.save(jar, loaded, second)
    assert again == Session(second, session.id)
    assert [cookie_value(c) for c in cookies] == [session.id]
    assert await store.read(again) == second
    assert (await store.load(jar)) == Session(second, session.id)

    # Clearing deletes the key and the cookie.
    cleared, cookies = await store.save(jar, again, None)
    assert cleared is None
    assert cookies == ["atr_sid=; Max-Age=0; Path=/; HttpOnly; Secure; SameSite=Lax"]
    assert session_keys(raw) == []
    assert await store.load(jar) is None
    assert await store.read(again) is None
    # Nothing to clear without a cookie: no header.
    assert await store.save({}, None, None) == (None, [])


async def test_cookie_options_are_applied(redis_url: str) -> None:
    store = RedisSessionStore(
        redis_url,
        secret_keys=[SECRET],
        cookie_name="sid",
        secure=False,
        same_site="strict",
        path="/app",
        domain="example.test",
        max_age=3600,
    )
    try:
        _, cookies = await store.save({}, None, token_set(), new_session=True)
    finally:
        await store.aclose()
    attributes = cookies[0].split("; ")
    assert attributes[0].startswith("sid=")
    assert attributes[1:] == [
        "Max-Age=3600",
        "Path=/app",
        "Domain=example.test",
        "HttpOnly",
        "SameSite=Strict",
    ]


@pytest.mark.parametrize(
    ("refresh_expires_in", "expected"),
    [(None, 7200), (1800, 1800), (10**9, 7200), (0, 7200), ("1800", 7200)],
)
async def test_max_age_and_ttl_follow_the_refresh_token_lifetime(
    redis_url: str, raw: redis.Redis, refresh_expires_in: object, expected: int
) -> None:
    store = RedisSessionStore(redis_url, secret_keys=[SECRET], max_age=7200)
    extra = {} if refresh_expires_in is None else {"refresh_expires_in": refresh_expires_in}
    try:
        session, cookies = await store.save({}, None, token_set(NOW, extra), new_session=True)
        assert f"Max-Age={expected}" in cookies[0].split("; ")
        [key] = session_keys(raw)
        ttl = raw.pttl(key)
        assert 0 < ttl <= expected * 1000
        assert ttl > expected * 1000 - 60_000  # set now, not inherited from somewhere else

        # Every write sets the TTL again (the session lives max_age after its last write).
        assert session is not None
        raw.pexpire(key, 5_000)
        await store.persist(session, token_set(NOW + 1, extra))
        assert raw.pttl(key) > 5_000
        assert raw.pttl(key) <= expected * 1000
    finally:
        await store.aclose()


async def test_a_login_issues_a_new_session_id_and_deletes_the_old_one(
    store: RedisSessionStore, raw: redis.Redis
) -> None:
    old, cookies = await store.save({}, None, token_set(), new_session=True)
    assert old is not None
    old_jar = {"atr_sid": cookie_value(cookies[0])}
    [old_key] = session_keys(raw)

    new, cookies = await store.save(old_jar, old, token_set(NOW + 1), new_session=True)
    assert new is not None
    assert new.id not in (None, old.id)
    assert cookie_value(cookies[0]) == new.id
    [new_key] = session_keys(raw)
    assert new_key != old_key
    assert await store.load(old_jar) is None  # the fixated id is worthless
    assert await store.load({"atr_sid": new.id or ""}) == new


async def test_ids_are_random_and_unknown_or_oversized_ids_are_no_session(
    store: RedisSessionStore,
) -> None:
    ids = set()
    for _ in range(20):
        session, _ = await store.save({}, None, token_set(), new_session=True)
        assert session is not None
        assert session.id is not None
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", session.id)
        ids.add(session.id)
    assert len(ids) == 20
    for bad in ["", "unknown", "x" * 129, "atr:session:*", "\x00\xff", next(iter(ids)) + "x"]:
        assert await store.load({"atr_sid": bad}) is None
    assert await store.load({}) is None
    assert await store.load({"other_cookie": next(iter(ids))}) is None


# -- nothing readable at rest -------------------------------------------------------------------


async def test_redis_holds_only_ciphertext_and_keys_reveal_no_session_id(
    store: RedisSessionStore, raw: redis.Redis
) -> None:
    token_sets = [token_set(NOW + i, {"refresh_expires_in": 3600}) for i in range(5)]
    sessions = []
    for tokens in token_sets:
        session, _ = await store.save({}, None, tokens, new_session=True)
        assert session is not None
        sessions.append(session)
    # Refresh some of them, so that overwritten values are checked too.
    for session, tokens in zip(sessions[:2], token_sets[:2], strict=True):
        await store.persist(session, token_set(tokens.issued_at + 300))

    secrets_to_hide: list[bytes] = []
    for tokens in token_sets:
        for value in (tokens.access_token, tokens.refresh_token, tokens.id_token):
            assert value is not None
            secrets_to_hide.append(value.encode())
            # Any distinctive 12-character window of a token, not just the whole of it.
            secrets_to_hide += [value.encode()[i : i + 12] for i in range(10, len(value) - 12, 6)]
    ids = [s.id.encode() for s in sessions if s.id is not None]

    keys = list(raw.scan_iter(count=10))
    assert len(keys) == len(sessions)
    for key in keys:
        assert raw.type(key) == b"hash"
        assert re.fullmatch(rb"atr:session:[0-9a-f]{32}", key), key
        for session_id in ids:
            assert session_id[:8] not in key
        fields = cast(dict[bytes, bytes], raw.hgetall(key))
        assert set(fields) == {b"gen", b"at", b"fp", b"token_set"}
        # Ordering metadata, nothing more: the generation, the issue time, and a keyed hash
        # of the access token (so that the same token set written again is no conflict).
        assert re.fullmatch(rb"[0-9]+", fields[b"gen"])
        assert re.fullmatch(rb"[0-9]+\.[0-9]+", fields[b"at"])
        assert re.fullmatch(rb"[0-9a-f]{32}", fields[b"fp"])
        sealed = fields[b"token_set"]
        for name, stored in fields.items():
            for secret in [*secrets_to_hide, *ids, SECRET.encode()]:
                assert secret not in stored, (key, name)
        for fragment in (b"access_token", b"refresh", b"expires_at", b"Bearer", b"openid"):
            assert fragment not in sealed
        with pytest.raises((UnicodeDecodeError, json.JSONDecodeError)):
            json.loads(sealed)


async def test_another_apps_keys_neither_read_nor_find_these_sessions(
    store: RedisSessionStore, redis_url: str
) -> None:
    session, _ = await store.save({}, None, token_set(), new_session=True)
    assert session is not None
    other = RedisSessionStore(redis_url, secret_keys=[OTHER_SECRET])
    try:
        assert await other.load({"atr_sid": session.id or ""}) is None
    finally:
        await other.aclose()


async def test_keys_rotate_the_first_seals_and_every_one_opens(
    store: RedisSessionStore, redis_url: str
) -> None:
    session, _ = await store.save({}, None, token_set(), new_session=True)
    assert session is not None
    # Prepending a new key changes nothing for existing sessions (the first key names them).
    rotated = RedisSessionStore(redis_url, secret_keys=[SECRET, OTHER_SECRET])
    try:
        loaded = await rotated.load({"atr_sid": session.id or ""})
        assert loaded == session
    finally:
        await rotated.aclose()


# -- tampering ----------------------------------------------------------------------------------


def flip_byte(value: bytes, index: int) -> bytes:
    return value[:index] + bytes([value[index] ^ 0x01]) + value[index + 1 :]


async def test_a_tampered_value_loads_as_no_session(
    store: RedisSessionStore, raw: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    session, _ = await store.save({}, None, token_set(), new_session=True)
    assert session is not None
    jar = {"atr_sid": session.id or ""}
    [key] = session_keys(raw)
    sealed = raw.hget(key, "token_set")
    assert isinstance(sealed, bytes)
    for index in (0, 5, 12, len(sealed) // 2, len(sealed) - 1):  # nonce, ciphertext, tag
        raw.hset(key, "token_set", flip_byte(sealed, index))
        assert await store.load(jar) is None
    for garbage in (sealed[:-1], sealed[:20], b"", b"not sealed at all", b'{"access_token":"x"}'):
        raw.hset(key, "token_set", garbage)
        assert await store.load(jar) is None
    assert "does not authenticate" in caplog.text
    raw.hset(key, "token_set", sealed)
    assert await store.load(jar) == session


async def test_another_users_value_moved_under_this_key_is_no_session(
    store: RedisSessionStore, raw: redis.Redis
) -> None:
    """Each value is bound to its key: copying Bob's sealed value over Alice's key gives Alice
    no session, never Bob's tokens."""
    alice, _ = await store.save({}, None, token_set(), new_session=True)
    alice_key = set(session_keys(raw))
    bob, _ = await store.save({}, None, token_set(NOW + 1), new_session=True)
    assert alice is not None
    assert bob is not None
    [bob_key] = set(session_keys(raw)) - alice_key
    [alice_key_] = alice_key
    raw.hset(alice_key_, "token_set", raw.hget(bob_key, "token_set") or b"")
    assert await store.load({"atr_sid": alice.id or ""}) is None
    assert await store.load({"atr_sid": bob.id or ""}) == bob


async def test_a_tampered_generation_never_breaks_the_session(
    store: RedisSessionStore, raw: redis.Redis
) -> None:
    session, _ = await store.save({}, None, token_set(), new_session=True)
    assert session is not None
    [key] = session_keys(raw)
    for garbage in (b"not a number", b"", b"1.7e+09x"):
        raw.hset(key, mapping={"gen": garbage, "at": garbage})
        refreshed = token_set(NOW + 300)
        await store.persist(session, refreshed)  # no Lua error: treated as unknown, replaced
        assert await store.read(session) == refreshed
        assert raw.hget(key, "at") == repr(NOW + 300).encode()


async def test_a_session_written_before_generations_were_stored_is_still_ordered(
    store: RedisSessionStore, raw: redis.Redis
) -> None:
    """Hashes of earlier versions hold only ``generation`` = the issue time: read as
    generation 0 issued then, so an older write is refused and a refresh replaces it."""
    session, _ = await store.save({}, None, token_set(NOW), new_session=True)
    assert session is not None
    [key] = session_keys(raw)
    raw.hdel(key, "gen", "at", "fp")
    raw.hset(key, "generation", repr(NOW))
    before = await store.read(session)
    await store.persist(session, token_set(NOW - 1))
    assert await store.read(session) == before
    assert before is not None
    refreshed = TokenSetType.from_token_response(
        {"access_token": "at-next", "refresh_token": "rt-next"},
        issued_at=NOW,
        default_lifetime=300,
        previous=before,
    )
    await store.persist(session, refreshed)
    assert await store.read(session) == refreshed
    assert raw.hget(key, "generation") is None


# -- concurrency ----------------------------------------------------------------------------------


def write_generations(
    store: RedisSessionStore,
    session: Session,
    generations: list[float],
    written: dict[float, TokenSetType],
    errors: list[BaseException],
) -> None:
    """In this thread's own event loop: persist ``generations`` ten at a time."""

    async def write_all() -> None:
        for start in range(0, len(generations), 10):
            chunk = generations[start : start + 10]
            await asyncio.gather(*(store.persist(session, written[g]) for g in chunk))

    try:
        asyncio.run(write_all())
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


def test_concurrent_writers_in_any_order_never_regress_the_generation(
    redis_url: str, raw: redis.Redis
) -> None:
    """Threads, each with its own event loop and tasks, and two store instances (as two
    workers would), write generations of one session in random order: the newest stays."""
    stores = [RedisSessionStore(redis_url, secret_keys=[SECRET]) for _ in range(2)]
    session, _ = asyncio.run(stores[0].save({}, None, token_set(NOW), new_session=True))
    assert session is not None
    for round_ in range(3):
        generations = [NOW + round_ * 1000 + i for i in range(1, 241)]
        written = {g: token_set(g) for g in generations}
        random.shuffle(generations)
        batches = [generations[i::8] for i in range(8)]
        errors: list[BaseException] = []
        threads = [
            threading.Thread(
                target=write_generations, args=(stores[i % 2], session, batch, written, errors)
            )
            for i, batch in enumerate(batches)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        newest = max(written)
        stored = asyncio.run(stores[1].read(session))
        assert stored is not None
        assert stored.to_dict() == written[newest].to_dict()
        [key] = session_keys(raw)
        assert raw.hget(key, "at") == repr(newest).encode()

        # And a late writer of an older generation changes nothing.
        asyncio.run(stores[0].persist(session, token_set(newest - 500)))
        assert asyncio.run(stores[0].read(session)) == written[newest]
    for session_store in stores:
        asyncio.run(session_store.aclose())


async def test_the_same_token_set_may_be_rewritten_but_a_duplicate_refresh_may_not(
    store: RedisSessionStore,
) -> None:
    """Re-saving the same token set (the middleware's commit after the flight persisted it)
    is allowed; another refresh of the same generation (a replica that refreshed it too,
    without a coordinator) is refused: the first written stays."""
    first = token_set(NOW)
    session, _ = await store.save({}, None, first, new_session=True)
    assert session is not None

    def refreshed(access_token: str, at: float) -> TokenSetType:
        return TokenSetType.from_token_response(
            {"access_token": access_token, "refresh_token": "rt-" + access_token},
            issued_at=at,
            default_lifetime=300,
            previous=first,
        )

    ours, theirs = refreshed("at-ours", NOW + 1), refreshed("at-theirs", NOW + 2)
    assert await store.persist(session, ours)
    assert await store.persist(session, ours)  # the same again: no conflict
    assert not await store.persist(session, theirs)  # later, but a duplicate of generation 1
    assert await store.read(session) == ours


async def test_more_concurrent_operations_than_pool_connections_wait_instead_of_failing(
    store: RedisSessionStore,
) -> None:
    """A storm's worth of session loads at once: past the pool's connections they queue (the
    default pool of redis-py 8 raised MaxConnectionsError past 100, so requests got 500s)."""
    session, _ = await store.save({}, None, token_set(), new_session=True)
    assert session is not None
    jar = {"atr_sid": session.id or ""}
    loaded = await asyncio.gather(*(store.load(jar) for _ in range(300)))
    assert loaded == [session] * 300


def test_one_store_works_from_several_event_loops_and_threads(
    store: RedisSessionStore,
) -> None:
    """Loops come and go (a fresh one per asyncio.run): each gets its own connection pool, so
    none is used on a loop it does not belong to."""
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    async def life_of_a_session(n: int) -> bool:
        tokens = token_set(NOW + n)
        session, cookies = await store.save({}, None, tokens, new_session=True)
        assert session is not None
        jar = {"atr_sid": cookie_value(cookies[0])}
        loaded = await store.load(jar)
        newer = token_set(NOW + n + 300)
        await store.persist(session, newer)
        after = await store.load(jar)
        await store.save(jar, after, None)
        return loaded == session and after == Session(newer, session.id)

    def in_thread(n: int) -> None:
        try:
            for i in range(5):  # five loops, one after the other, in this thread
                results[n * 100 + i] = asyncio.run(life_of_a_session(n * 100 + i))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=in_thread, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == 30
    assert all(results.values())
    assert asyncio.run(life_of_a_session(10_000))  # and from the main thread afterwards


# -- the middleware with Redis sessions ----------------------------------------------------------


def worker_app(idp: FakeIdP, refresher: Refresher, store: RedisSessionStore) -> Starlette:
    """One "worker": its own refresher (own grace cache) and store, sharing only Redis."""

    async def token(request: Request) -> JSONResponse:
        return JSONResponse({"token": await request.state.token.get()})

    async def login(request: Request) -> PlainTextResponse:
        await request.state.token.login(idp.issue())
        return PlainTextResponse("welcome")

    async def logout(request: Request) -> PlainTextResponse:
        await request.state.token.logout()
        return PlainTextResponse("bye")

    routes = [Route("/token", token), Route("/login", login), Route("/logout", logout)]
    middleware = [Middleware(TokenRefreshMiddleware, refresher=refresher, store=store)]
    return Starlette(routes=routes, middleware=middleware)


@contextlib.asynccontextmanager
async def browser(
    app: Any, cookies: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=APP) as client:
        for name, value in (cookies or {}).items():
            client.cookies.set(name, value, domain="app.test")
        yield client


@pytest.fixture
def workers(
    idp: FakeIdP, client: OAuth2Client, redis_url: str
) -> Iterator[list[tuple[Starlette, RedisSessionStore]]]:
    made: list[tuple[Starlette, RedisSessionStore]] = []
    coordinators: list[RedisCoordinator] = []
    for _ in range(2):
        store = RedisSessionStore(redis_url, secret_keys=[SECRET])
        coordinator = RedisCoordinator(redis_url, secret_keys=[SECRET])
        coordinators.append(coordinator)
        refresher = Refresher(client, jitter=0.0, coordinator=coordinator)
        made.append((worker_app(idp, refresher, store), store))
    yield made
    for _, store in made:
        asyncio.run(store.aclose())
    for coordinator in coordinators:
        asyncio.run(coordinator.aclose())


async def test_a_refresh_is_persisted_in_redis_for_the_next_request_on_any_worker(
    workers: list[tuple[Starlette, RedisSessionStore]],
    idp: FakeIdP,
    clock: FakeClock,
    raw: redis.Redis,
) -> None:
    (app_a, store_a), (app_b, _) = workers
    async with browser(app_a) as alice:
        login = await alice.get("/login")
        assert login.status_code == 200
        [header] = login.headers.get_list("set-cookie")
        assert {"HttpOnly", "Secure", "SameSite=Lax"} <= set(header.split("; "))
        cookie = alice.cookies["atr_sid"]
        before = (await alice.get("/token")).json()["token"]
        assert len(session_keys(raw)) == 1

        clock.advance(EXPIRED)
        refreshed = await alice.get("/token")
        assert refreshed.status_code == 200
        new_token = refreshed.json()["token"]
        assert new_token != before
        assert idp.token_calls("refresh_token") == 1
        assert alice.cookies["atr_sid"] == cookie  # same session, new generation in Redis

    stored = await store_a.load({"atr_sid": cookie})
    assert stored is not None
    assert stored.token_set.access_token == new_token

    # Another worker (its own refresher and grace cache, nothing shared but Redis) gets the new
    # token from Redis: no provider call.
    async with browser(app_b, {"atr_sid": cookie}) as same_browser:
        response = await same_browser.get("/token")
    assert response.json() == {"token": new_token}
    assert idp.token_calls("refresh_token") == 1
    assert idp.grants_revoked == 0


async def test_a_storm_over_two_workers_makes_one_refresh_per_expiry(
    workers: list[tuple[Starlette, RedisSessionStore]], idp: FakeIdP, clock: FakeClock
) -> None:
    (app_a, _), (app_b, _) = workers
    async with browser(app_a) as tab_a:
        await tab_a.get("/login")
        cookie = {"atr_sid": tab_a.cookies["atr_sid"]}
        async with browser(app_b, cookie) as tab_b:
            for rotation in range(1, 4):
                clock.advance(EXPIRED)
                responses = await asyncio.gather(
                    *(tab.get("/token") for _ in range(15) for tab in (tab_a, tab_b))
                )
                assert {r.status_code for r in responses} == {200}
                assert len({r.json()["token"] for r in responses}) == 1
                assert idp.token_calls("refresh_token") == rotation
    assert idp.grants_revoked == 0


async def test_logout_deletes_the_session_in_redis(
    workers: list[tuple[Starlette, RedisSessionStore]], raw: redis.Redis
) -> None:
    (app_a, _), (app_b, _) = workers
    async with browser(app_a) as client:
        await client.get("/login")
        cookie = {"atr_sid": client.cookies["atr_sid"]}
        assert len(session_keys(raw)) == 1
        bye = await client.get("/logout")
        assert "Max-Age=0" in bye.headers["set-cookie"]
    assert session_keys(raw) == []
    async with browser(app_b, cookie) as replay:
        response = await replay.get("/token")
    assert response.status_code == 401


async def test_a_tampered_session_is_a_401_never_a_500(
    workers: list[tuple[Starlette, RedisSessionStore]], raw: redis.Redis
) -> None:
    (app_a, _), _ = workers
    async with browser(app_a) as client:
        await client.get("/login")
        [key] = session_keys(raw)
        sealed = raw.hget(key, "token_set")
        assert isinstance(sealed, bytes)
        raw.hset(key, "token_set", flip_byte(sealed, len(sealed) // 2))
        response = await client.get("/token")
    assert response.status_code == 401
    assert response.json()["error"] == "reauthentication_required"


# -- store faults: no session, or a 503 that keeps the session ----------------------------------


async def test_a_key_of_another_type_is_no_session_and_a_late_write_does_not_revive_it(
    store: RedisSessionStore, raw: redis.Redis
) -> None:
    session, _ = await store.save({}, None, token_set(), new_session=True)
    assert session is not None
    [key] = session_keys(raw)
    raw.delete(key)
    raw.rpush(key, b"not", b"a", b"hash")  # WRONGTYPE for every hash command
    assert await store.load({"atr_sid": session.id or ""}) is None
    await store.persist(session, token_set(NOW + 300))  # a refresh landing late
    assert await store.read(session) is None
    assert session_keys(raw) == []  # the foreign value is gone, nothing put back
    login = token_set(NOW + 600)
    fresh, _ = await store.save({}, None, login, new_session=True)
    assert fresh is not None
    assert await store.read(fresh) == login  # a new login works as ever


async def test_redis_frozen_or_down_is_a_503_that_keeps_the_session_and_nothing_is_lost(
    idp: FakeIdP, client: OAuth2Client
) -> None:
    with running_redis() as server:
        store = RedisSessionStore(server.url, secret_keys=[SECRET], timeout=0.5)
        app = worker_app(idp, Refresher(client, jitter=0.0), store)
        async with browser(app) as alice:
            assert (await alice.get("/login")).status_code == 200
            before = await alice.get("/token")
            answers = []
            os.kill(server.process.pid, signal.SIGSTOP)  # frozen: no answer within the timeout
            try:
                answers.append(await alice.get("/token"))
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            thawed = await alice.get("/token")
            server.stop()  # down: connections refused
            answers.append(await alice.get("/token"))
        await store.aclose()
    for down in answers:
        assert down.status_code == 503
        assert down.json()["reason"] == "store_unavailable"
        assert down.headers["retry-after"] == "2"
        assert "set-cookie" not in down.headers  # the browser keeps its session cookie
    assert thawed.status_code == 200
    assert thawed.json() == before.json()  # the same session, its tokens intact


async def test_a_logged_out_redis_session_never_comes_back_through_a_late_write(
    store: RedisSessionStore, raw: redis.Redis
) -> None:
    session, _ = await store.save({}, None, token_set(), new_session=True)
    assert session is not None
    jar = {"atr_sid": session.id or ""}
    await store.save(jar, session, None)  # logout
    await store.persist(session, token_set(NOW + 10))  # a refresh landing late
    again, cookies = await store.save(jar, session, token_set(NOW + 20))
    assert again is None
    assert cookies
    assert "Max-Age=0" in cookies[0]
    assert session_keys(raw) == []


@pytest.mark.parametrize("coordinated", [False, True])
async def test_a_refresh_answered_before_logout_never_brings_a_redis_session_back(
    idp: FakeIdP, clock: FakeClock, redis_url: str, raw: redis.Redis, coordinated: bool
) -> None:
    from .test_middleware import HeldAnswers

    held = HeldAnswers(idp.transport())
    client = OAuth2Client.from_discovery(
        "https://idp.test", client_id="app", client_secret="app-secret", transport=held, clock=clock
    )
    coordinator = RedisCoordinator(redis_url, secret_keys=[SECRET]) if coordinated else None
    refresher = Refresher(client, jitter=0.0, coordinator=coordinator)
    store = RedisSessionStore(redis_url, secret_keys=[SECRET])
    async with browser(worker_app(idp, refresher, store)) as alice:
        await alice.get("/login")
        clock.advance(EXPIRED)
        parked = asyncio.create_task(alice.get("/token"))
        await held.answered.wait()  # the provider rotated the grant and answered
        await alice.get("/logout")
        held.release.set()
        answer = await parked
        later = await alice.get("/token")
    await store.aclose()
    if coordinator is not None:
        await coordinator.aclose()
    assert answer.status_code == later.status_code == 401
    assert session_keys(raw) == []  # not persisted by the flight, not written back
    assert idp.token_calls("refresh_token", "success") == 1
