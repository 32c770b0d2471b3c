from __future__ import annotations

import asyncio
import base64
import logging
import re
import threading

import pytest

from asgi_token_refresh import (
    ConfigurationError,
    CookieSessionStore,
    MemorySessionStore,
    RefreshUnavailable,
    ServerSideStore,
    Session,
    SessionStore,
    TokenSet,
)
from asgi_token_refresh.kit import BackendSessionStore, parse_cookie_header
from asgi_token_refresh.testing import FakeClock

pytestmark = pytest.mark.anyio

KEY_A = "a" * 32
KEY_B = "b" * 40
NOW = 1_700_000_000.0


def token_set(
    access: str = "AT", refresh: str = "RT", issued_at: float = NOW, **extra: object
) -> TokenSet:
    return TokenSet(
        access_token=access,
        refresh_token=refresh,
        expires_at=issued_at + 300,
        issued_at=issued_at,
        extra=extra,
    )


def cookies_from(set_cookies: list[str]) -> dict[str, str]:
    """What a browser sends back after receiving these Set-Cookie headers."""
    jar: dict[str, str] = {}
    for header in set_cookies:
        pair = header.split(";", 1)[0]
        name, value = pair.split("=", 1)
        if "Max-Age=0" in header:
            jar.pop(name, None)
        else:
            jar[name] = value
    return jar


def test_both_stores_implement_the_protocol_and_only_memory_is_server_side() -> None:
    assert isinstance(CookieSessionStore([KEY_A]), SessionStore)
    assert isinstance(MemorySessionStore(), SessionStore)
    assert isinstance(MemorySessionStore(), ServerSideStore)
    assert not isinstance(CookieSessionStore([KEY_A]), ServerSideStore)


def test_cookie_header_parsing_skips_garbage() -> None:
    header = 'a=1; b="2"; junk; =x; a=3; c=with=equals'
    assert parse_cookie_header(header) == {"a": "1", "b": "2", "c": "with=equals"}


# -- CookieSessionStore -------------------------------------------------------------------------


async def test_cookie_round_trip_is_encrypted_and_flagged() -> None:
    store = CookieSessionStore([KEY_A])
    session, headers = await store.save({}, None, token_set("SECRET-ACCESS", "SECRET-REFRESH"))
    assert session is not None
    assert len(headers) == 1
    assert "SECRET" not in headers[0]
    for flag in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age=2592000"):
        assert flag in headers[0]
    loaded = await store.load(cookies_from(headers))
    assert loaded == Session(token_set("SECRET-ACCESS", "SECRET-REFRESH"))


async def test_secure_can_be_turned_off_for_local_http() -> None:
    _, headers = await CookieSessionStore([KEY_A], secure=False).save({}, None, token_set())
    assert "Secure" not in headers[0]


async def test_max_age_follows_the_refresh_token_lifetime_when_known() -> None:
    store = CookieSessionStore([KEY_A])
    _, headers = await store.save({}, None, token_set(refresh_expires_in=1800))
    assert "Max-Age=1800" in headers[0]


async def test_large_token_sets_are_chunked_and_reassembled() -> None:
    store = CookieSessionStore([KEY_A], chunk_size=1000)
    big = token_set("x" * 2500, "y" * 2500)
    _, headers = await store.save({}, None, big)
    jar = cookies_from(headers)
    assert sorted(jar) == ["atr_session", *(f"atr_session.{i}" for i in range(1, len(jar)))]
    assert len(jar) >= 5
    assert all(len(v) <= 1010 for v in jar.values())
    loaded = await store.load(jar)
    assert loaded is not None
    assert loaded.token_set == big


async def test_stale_chunks_are_deleted_when_the_session_shrinks() -> None:
    store = CookieSessionStore([KEY_A], chunk_size=1000)
    _, headers = await store.save({}, None, token_set("x" * 3000))
    jar = cookies_from(headers)
    _, headers = await store.save(jar, None, token_set("small"))
    deleted = {h.split("=", 1)[0] for h in headers if "Max-Age=0" in h}
    assert deleted == set(jar) - {"atr_session"}
    jar = cookies_from(headers)
    assert list(jar) == ["atr_session"]
    loaded = await store.load(jar)
    assert loaded is not None
    assert loaded.token_set.access_token == "small"


async def test_clearing_deletes_every_session_cookie() -> None:
    store = CookieSessionStore([KEY_A], chunk_size=1000)
    _, headers = await store.save({}, None, token_set("x" * 3000))
    jar = cookies_from(headers)
    _, headers = await store.save(jar, None, None)
    assert all("Max-Age=0" in h for h in headers)
    assert cookies_from(headers) == {}


async def test_keys_rotate_decrypt_with_any_encrypt_with_the_first() -> None:
    old = CookieSessionStore([KEY_A])
    _, headers = await old.save({}, None, token_set())
    rotated = CookieSessionStore([KEY_B, KEY_A])
    assert await rotated.load(cookies_from(headers)) is not None
    _, headers = await rotated.save({}, None, token_set())
    assert await CookieSessionStore([KEY_B]).load(cookies_from(headers)) is not None
    assert await CookieSessionStore([KEY_A]).load(cookies_from(headers)) is None


def _flip(value: str) -> str:
    head, _, blob = value.rpartition(".")
    raw = bytearray(base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4)))
    raw[20] ^= 1
    return f"{head}.{base64.urlsafe_b64encode(bytes(raw)).rstrip(b'=').decode()}"


@pytest.mark.parametrize(
    "mangle",
    [
        _flip,  # tampered ciphertext
        lambda v: v[:-10],  # truncated
        lambda v: "v1.1.garbage!!",  # not base64
        lambda v: "v1.1.",  # empty
        lambda v: "v9." + v[3:],  # unknown version
        lambda v: "v1.99." + v[5:],  # too many chunks
        lambda v: "v1.2." + v[5:],  # missing chunk
        lambda v: "nonsense",
        lambda v: "x" * 5000,  # oversized
    ],
)
async def test_bad_cookies_are_no_session_and_are_counted(mangle: object) -> None:
    store = CookieSessionStore([KEY_A])
    _, headers = await store.save({}, None, token_set())
    jar = cookies_from(headers)
    jar["atr_session"] = mangle(jar["atr_session"])  # type: ignore[operator]
    assert await store.load(jar) is None
    assert store.rejected == 1


async def test_a_cookie_from_another_cookie_name_is_rejected() -> None:
    _, headers = await CookieSessionStore([KEY_A], cookie_name="one").save({}, None, token_set())
    value = cookies_from(headers)["one"]
    assert await CookieSessionStore([KEY_A], cookie_name="two").load({"two": value}) is None


@pytest.mark.parametrize(
    ("keys", "options", "complaint"),
    [
        ([], {}, "non-empty"),
        ("a" * 32, {}, "non-empty list"),
        (["short"], {}, "at least 32"),
        ([KEY_A], {"cookie_name": "bad name"}, "not a valid cookie name"),
        ([KEY_A], {"same_site": "none", "secure": False}, "SameSite=None"),
        ([KEY_A], {"same_site": "sometimes"}, "same_site"),
        ([KEY_A], {"chunk_size": 100}, "chunk_size"),
    ],
)
def test_cookie_store_configuration_is_validated(
    keys: list[str], options: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        CookieSessionStore(keys, **options)  # type: ignore[arg-type]


def test_cookie_store_repr_has_no_key() -> None:
    assert KEY_A not in repr(CookieSessionStore([KEY_A]))


async def test_60000_bad_cookies_in_ten_minutes_log_a_line_a_minute_per_reason_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = CookieSessionStore([KEY_A], clock=clock)
    _, headers = await store.save({}, None, token_set())
    good = cookies_from(headers)["atr_session"]
    _, foreign = await CookieSessionStore([KEY_B]).save({}, None, token_set())
    bad = [_flip(good), "nonsense", cookies_from(foreign)["atr_session"]]  # 2 reasons
    caplog.set_level(logging.DEBUG, logger="asgi_token_refresh")
    for i in range(60_000):
        assert await store.load({"atr_session": bad[i % 3]}) is None
        clock.advance(0.01)  # 100 bad cookies a second, for 600 s
    clock.advance(60)
    for value in bad[:2]:  # one more of each reason: the line says what was left out
        await store.load({"atr_session": value})

    lines = [r for r in caplog.records if r.name.startswith("asgi_token_refresh")]
    assert store.rejected == 60_002
    assert 2 <= len(lines) <= 2 * 12  # at most one a minute per reason, not 60,000
    assert {r.levelno for r in lines} == {logging.INFO}
    assert {r.name for r in lines} == {"asgi_token_refresh._cookie_store"}
    left_out = [re.search(r"(\d+) more since the last such line", r.getMessage()) for r in lines]
    assert len(lines) + sum(int(m.group(1)) for m in left_out if m) == 60_002
    assert all(KEY_A not in r.getMessage() and good not in r.getMessage() for r in lines)


# -- MemorySessionStore -------------------------------------------------------------------------


async def test_memory_sessions_live_behind_an_opaque_id() -> None:
    store = MemorySessionStore()
    session, headers = await store.save({}, None, token_set("SECRET-ACCESS"))
    assert session is not None
    assert session.id is not None
    assert len(session.id) >= 40
    assert "SECRET" not in headers[0]
    assert re.match(
        r"atr_sid=[\w-]+; Max-Age=\d+; Path=/; HttpOnly; Secure; SameSite=Lax", headers[0]
    )
    assert await store.load(cookies_from(headers)) == session
    assert await store.load({"atr_sid": "guessed"}) is None


async def test_login_issues_a_new_session_id_and_drops_the_old_one() -> None:
    store = MemorySessionStore()
    first, _ = await store.save({}, None, token_set())
    assert first is not None
    second, _ = await store.save({}, first, token_set("new"), new_session=True)
    assert second is not None
    assert second.id != first.id
    assert await store.read(first) is None


async def test_a_slower_writer_never_regresses_the_session() -> None:
    store = MemorySessionStore()
    session, _ = await store.save({}, None, token_set("gen1", issued_at=NOW))
    assert session is not None
    await store.persist(session, token_set("gen3", issued_at=NOW + 20))
    await store.save({}, session, token_set("gen2", issued_at=NOW + 10))
    stored = await store.read(session)
    assert stored is not None
    assert stored.access_token == "gen3"


def test_concurrent_writers_leave_the_newest_generation() -> None:
    import asyncio

    store = MemorySessionStore()
    session, _ = asyncio.run(store.save({}, None, token_set(), new_session=True))
    assert session is not None

    def writer(offset: int) -> None:
        for generation in range(offset, 400, 4):
            asyncio.run(
                store.persist(session, token_set(f"gen{generation}", issued_at=NOW + generation))
            )

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = asyncio.run(store.read(session))
    assert stored is not None
    assert stored.access_token == "gen399"


async def test_memory_store_is_bounded_and_expires() -> None:
    clock = FakeClock()
    store = MemorySessionStore(max_sessions=3, max_age=60, clock=clock)
    sessions = [(await store.save({}, None, token_set(f"u{i}")))[0] for i in range(5)]
    assert len(store) == 3
    assert sessions[0] is not None
    assert await store.read(sessions[0]) is None
    clock.advance(61)
    assert sessions[4] is not None
    assert await store.read(sessions[4]) is None


async def test_clearing_a_memory_session_deletes_its_cookie() -> None:
    store = MemorySessionStore()
    session, headers = await store.save({}, None, token_set())
    jar = cookies_from(headers)
    cleared, headers = await store.save(jar, session, None)
    assert cleared is None
    assert headers == ["atr_sid=; Max-Age=0; Path=/; HttpOnly; Secure; SameSite=Lax"]
    assert session is not None
    assert await store.read(session) is None


async def test_a_logged_out_memory_session_never_comes_back_through_a_late_write() -> None:
    store = MemorySessionStore()
    session, _ = await store.save({}, None, token_set("gen1"), new_session=True)
    assert session is not None
    jar = {store.cookie_name: session.id or ""}
    await store.save(jar, session, None)  # logout
    await store.persist(session, token_set("gen2", issued_at=NOW + 10))  # a refresh landing late
    again, cookies = await store.save(jar, session, token_set("gen3", issued_at=NOW + 20))
    assert again is None  # the request that still held the session writes nothing back
    assert cookies == [f"{store.cookie_name}=; Max-Age=0; Path=/; HttpOnly; Secure; SameSite=Lax"]
    assert await store.read(session) is None
    assert len(store) == 0


@pytest.mark.parametrize("refresh_expires_in", [0.4, 1e-9])
async def test_a_refresh_token_living_under_a_second_never_writes_max_age_0(
    refresh_expires_in: float,
) -> None:
    store = CookieSessionStore([KEY_A])
    short = TokenSet("at", NOW + 300, NOW, "rt", extra={"refresh_expires_in": refresh_expires_in})
    _, cookies = await store.save({}, None, short, new_session=True)
    assert cookies
    assert all("Max-Age=1;" in cookie for cookie in cookies)  # not 0: that deletes it


# -- a backend that is down: refreshed token sets are held, then written ------------------------


class FlakyBackend:
    """A MemoryBackend that fails every call while ``down`` (as a Redis outage does)."""

    def __init__(self) -> None:
        from asgi_token_refresh._memory_store import MemoryBackend

        self.inner = MemoryBackend(max_sessions=100, clock=FakeClock())
        self.down = False
        self.puts = 0

    def _check(self) -> None:
        if self.down:
            raise RefreshUnavailable("store_unavailable", retry_after=2.0)

    async def get(self, session_id: str) -> TokenSet | None:
        self._check()
        return await self.inner.get(session_id)

    async def put(self, session_id: str, token_set: TokenSet, ttl: float, *, create: bool) -> bool:
        self._check()
        self.puts += 1
        return await self.inner.put(session_id, token_set, ttl, create=create)

    async def delete(self, session_id: str) -> None:
        self._check()
        await self.inner.delete(session_id)


def refreshed(previous: TokenSet, access: str) -> TokenSet:
    return TokenSet.from_token_response(
        {"access_token": access, "refresh_token": "rt-" + access, "expires_in": 300},
        issued_at=previous.issued_at + 1,
        default_lifetime=300,
        previous=previous,
    )


async def login(store: BackendSessionStore, tokens: TokenSet) -> dict[str, str]:
    _, set_cookies = await store.save({}, None, tokens, new_session=True)
    return cookies_from(set_cookies)


async def test_a_sessions_repr_shows_neither_its_id_nor_its_tokens() -> None:
    store = MemorySessionStore(secure=False)
    tokens = token_set(access="AT-SECRET", refresh="RT-SECRET")
    session, _ = await store.save({}, None, tokens, new_session=True)
    assert session is not None
    assert session.id
    text = repr(session)
    assert session.id not in text
    assert "SECRET" not in text
    assert text.startswith("Session(token_set=TokenSet(")
    assert "id=<hidden>" in text
    assert "id=" not in repr(Session(tokens))  # a cookie session has none


async def test_a_refresh_the_store_could_not_take_is_written_on_the_sessions_next_request() -> None:
    backend = FlakyBackend()
    store = BackendSessionStore(backend, secure=False)
    first = token_set()
    jar = await login(store, first)
    session = await store.load(jar)
    assert session is not None

    backend.down = True
    second = refreshed(first, "AT2")
    with pytest.raises(RefreshUnavailable):
        await store.persist(session, second)  # the flight's write: fails, is held
    saved, set_cookies = await store.save(jar, session, second)  # the commit: no 503
    assert saved == Session(second, session.id)
    assert set_cookies == []

    backend.down = False
    assert await backend.inner.get(session.id or "") == first  # not written yet
    assert await store.load(jar) == Session(second, session.id)
    assert await backend.inner.get(session.id or "") == second  # written now, once
    puts = backend.puts
    assert await store.load(jar) == Session(second, session.id)
    assert backend.puts == puts


async def test_held_writes_of_other_sessions_are_flushed_once_the_store_answers() -> None:
    backend = FlakyBackend()
    store = BackendSessionStore(backend, secure=False)
    tokens = [token_set(access=f"AT{i}", refresh=f"RT{i}") for i in range(3)]
    jars = [await login(store, t) for t in tokens]
    sessions = [await store.load(jar) for jar in jars]
    backend.down = True
    newer = [refreshed(t, f"NEW{i}") for i, t in enumerate(tokens)]
    for session, token_set_ in zip(sessions, newer, strict=True):
        assert session is not None
        await store.save(jars[0], session, token_set_)
    backend.down = False
    await store.load({})  # no session: reaches no backend, flushes nothing
    assert await backend.inner.get(sessions[1].id or "") == tokens[1]  # type: ignore[union-attr]
    await store.load(jars[0])  # this one reaches the backend: every held write goes in
    for session, token_set_ in zip(sessions, newer, strict=True):
        assert session is not None
        assert await backend.inner.get(session.id or "") == token_set_


async def test_a_held_write_never_brings_back_a_session_that_logged_out_meanwhile() -> None:
    backend = FlakyBackend()
    store = BackendSessionStore(backend, secure=False)
    first = token_set()
    jar = await login(store, first)
    session = await store.load(jar)
    assert session is not None
    backend.down = True
    await store.save(jar, session, refreshed(first, "AT2"))
    backend.down = False
    await backend.inner.delete(session.id or "")  # logged out from another process
    assert await store.load(jar) is None
    assert await backend.inner.get(session.id or "") is None


async def test_a_held_write_never_overwrites_a_later_generation() -> None:
    backend = FlakyBackend()
    store = BackendSessionStore(backend, secure=False)
    first = token_set()
    jar = await login(store, first)
    session = await store.load(jar)
    assert session is not None
    backend.down = True
    second = refreshed(first, "AT2")
    await store.save(jar, session, second)
    backend.down = False
    third = refreshed(second, "AT3")  # another worker refreshed on from what it stored
    assert await backend.inner.put(session.id or "", third, 300, create=False)
    assert await store.load(jar) == Session(third, session.id)


async def test_a_refresh_held_while_an_older_held_write_goes_in_is_kept_and_written() -> None:
    backend = FlakyBackend()
    store = BackendSessionStore(backend, secure=False)
    first = token_set()
    jar = await login(store, first)
    session = await store.load(jar)
    assert session is not None
    backend.down = True
    second = refreshed(first, "AT2")
    await store.save(jar, session, second)  # held
    backend.down = False

    # The session's next request writes the held token set; while that write is on its way,
    # a refresh of it fails to be written (the store flaps) and is held in turn.
    writing, finish = asyncio.Event(), asyncio.Event()
    put = backend.put

    async def slow_put(session_id: str, token_set: TokenSet, ttl: float, *, create: bool) -> bool:
        writing.set()
        await finish.wait()
        return await put(session_id, token_set, ttl, create=create)

    backend.put = slow_put  # type: ignore[method-assign]
    loading = asyncio.ensure_future(store.load(jar))
    await writing.wait()
    backend.put = put  # type: ignore[method-assign]
    backend.down = True
    third = refreshed(second, "AT3")
    with pytest.raises(RefreshUnavailable):
        await store.persist(Session(second, session.id), third)
    backend.down = False
    finish.set()
    assert await loading == Session(second, session.id)

    assert await store.load(jar) == Session(third, session.id)  # not lost: written now
    assert await backend.inner.get(session.id or "") == third


async def test_a_login_the_store_cannot_take_is_a_503_not_a_held_write() -> None:
    backend = FlakyBackend()
    store = BackendSessionStore(backend, secure=False)
    backend.down = True
    with pytest.raises(RefreshUnavailable):
        await store.save({}, None, token_set(), new_session=True)


async def test_persist_says_when_another_refresh_of_the_same_generation_was_stored_first() -> None:
    store = MemorySessionStore(secure=False)
    first = token_set()
    session, _ = await store.save({}, None, first, new_session=True)
    assert session is not None
    ours, theirs = refreshed(first, "OURS"), refreshed(first, "THEIRS")
    assert await store.persist(session, theirs) is True
    assert await store.persist(session, theirs) is True  # the same again (the commit)
    assert await store.persist(session, ours) is False  # a duplicate refresh: refused
    assert await store.read(session) == theirs
    await store.save(cookies_from([]), session, None)
    assert await store.persist(session, ours) is True  # logged out: refused, no duplicate
