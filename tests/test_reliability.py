"""The reliability suite's CI share: every part of ``benchmarks/reliability.py`` at small sizes,
and Hypothesis driving its cookie and provider fuzzers.

Each part counts the inputs it tried, the 500s, the sessions lost and the leaks (a secret in
anything emitted, or another user's token served); every count but the first must be 0.
Nothing here depends on the machine's speed: the fake clock moves time, faults are injected
after a number of answers (not of seconds), and a slow answer is still a defined one. The full
sizes, and the figures the README quotes: ``python benchmarks/reliability.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_token_refresh import RefreshUnavailable, Session, TokenSet
from asgi_token_refresh.redis import RedisSessionStore
from asgi_token_refresh.testing import FakeClock, capture_telemetry

from .processes import RedisServer

# benchmarks/ is not a package: its scripts find each other (and this file finds them) on the
# path, as when a benchmark runs.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import reliability
from reliability import QUICK, Scanner, Tally

FUZZ = settings(
    max_examples=200,
    deadline=None,  # a verdict never depends on the machine's speed
    derandomize=True,  # the same examples in every run
    database=None,  # and no example database in the working tree
    suppress_health_check=[HealthCheck.too_slow],
)


def assert_clean(tally: Tally, inputs: int) -> None:
    assert tally.inputs >= inputs, tally.summary()
    failures = (tally.server_errors, tally.lost, tally.leaks, tally.undefined)
    assert failures == (0, 0, 0, 0), tally.summary()


# -- a. cookies -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", reliability.STORES)
async def test_fuzzed_cookies_get_200_or_401_and_never_another_users_session(
    kind: reliability.StoreKind, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_server").url if kind == "redis" else None
    rnd = random.Random(f"ci-a-{kind}")
    tally, scanner = await reliability.cookie_fuzz(kind, QUICK.cookies, rnd, url)
    assert_clean(tally, QUICK.cookies)
    assert tally.answers["200"] > 0
    assert tally.answers["401"] > 0
    assert scanner.items > 0


@pytest.fixture(scope="module")
def cookie_rig() -> Iterator[tuple[asyncio.Runner, reliability.CookieRig]]:
    """The cookie store's rig, on one loop for every Hypothesis example."""
    with asyncio.Runner() as runner:
        rig = runner.run(reliability.CookieRig.create("cookie"))
        yield runner, rig
        runner.run(rig.close())


@FUZZ
@given(rnd=st.randoms(use_true_random=False))
def test_hypothesis_cookies_through_the_cookie_store(
    cookie_rig: tuple[asyncio.Runner, reliability.CookieRig], rnd: random.Random
) -> None:
    runner, rig = cookie_rig
    case = rig.fuzzer.case(rnd)
    tally = Tally("a", "hypothesis")
    runner.run(rig.check(case, tally))
    assert_clean(tally, 1)


# -- b. provider answers ----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", reliability.MODES)
async def test_fuzzed_provider_answers_end_in_tokens_a_terminal_error_or_a_503(
    mode: reliability.Mode,
) -> None:
    tally, scanner = await reliability.provider_fuzz(
        mode, QUICK.answers, random.Random(f"ci-b-{mode}")
    )
    assert_clean(tally, QUICK.answers)
    outcomes = tally.answers
    assert outcomes["token set"] > 0
    assert outcomes["terminal"] > 0
    assert outcomes["unavailable"] > 0
    assert scanner.items > 0


@pytest.fixture(scope="module")
def provider_rig() -> Iterator[tuple[asyncio.Runner, reliability.ProviderRig]]:
    with asyncio.Runner() as runner:
        rig = reliability.ProviderRig("middleware", reliability.Provider())
        yield runner, rig
        runner.run(rig.close())


@FUZZ
@given(rnd=st.randoms(use_true_random=False))
def test_hypothesis_provider_answers_through_the_middleware(
    provider_rig: tuple[asyncio.Runner, reliability.ProviderRig], rnd: random.Random
) -> None:
    runner, rig = provider_rig
    refresh_token = "rt_" + secrets.token_urlsafe(32)  # a session of its own, every time
    answer = rig.fuzzer.answer(rnd, reliability.Secrets(refresh_token))
    tally = Tally("b", "hypothesis")
    rig.scanner.leaks = 0  # this example's findings only
    rig.scanner.findings.clear()
    with rig.scanner.logs():
        runner.run(rig.check(answer, refresh_token, tally))
    rig.scanner.into(tally)
    assert_clean(tally, 1)


# -- c. the Redis fault matrix ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_matrix() -> tuple[dict[str, Tally], Scanner]:
    """Every fault of the matrix, once, on a durable redis-server of its own."""
    tallies, scanner = asyncio.run(
        reliability.redis_fault_matrix(
            QUICK.matrix_sessions, QUICK.matrix_requests, random.Random("ci-c")
        )
    )
    return {t.what.removeprefix("Redis: "): t for t in tallies}, scanner


def _fault_param(fault: reliability.RedisFault) -> object:
    marks = []
    if fault.known:
        marks.append(pytest.mark.xfail(strict=True, reason="known bug: " + fault.known))
    return pytest.param(fault, id=re.sub(r"\W+", "-", fault.name).strip("-"), marks=marks)


@pytest.mark.parametrize("fault", [_fault_param(f) for f in reliability.REDIS_FAULTS])
def test_redis_faults_mid_traffic_answer_200_401_or_503_and_lose_nothing(
    fault: reliability.RedisFault, fault_matrix: tuple[dict[str, Tally], Scanner]
) -> None:
    tallies, scanner = fault_matrix
    tally = tallies[fault.name]
    assert_clean(tally, 3 * QUICK.matrix_requests if fault.before and fault.after else 1)
    assert scanner.leaks == 0, scanner.findings


# -- d. randomized interleaving -----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", reliability.STORES)
async def test_interleaved_logins_refreshes_and_logouts_lose_no_session(
    kind: reliability.StoreKind, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_server").url if kind == "redis" else None
    rnd = random.Random(f"ci-d-{kind}")
    tally, scanner = await reliability.interleaving(kind, QUICK.sessions, QUICK.rounds, rnd, url)
    assert_clean(tally, QUICK.sessions * QUICK.rounds)
    assert scanner.items > 0


# -- e. the secrets scan itself -----------------------------------------------------------------


def test_the_secrets_scan_finds_a_token_wherever_it_is_emitted() -> None:
    """The scan is not blind: a token planted in each kind of emitted text is found."""
    token = "rt_" + "x" * 43
    scanner = Scanner()
    with scanner.logs():
        logging.getLogger("asgi_token_refresh.anywhere").debug("presented %s", token)
    try:
        try:
            raise ValueError(reliability.CLIENT_SECRET)
        except ValueError as cause:
            raise RuntimeError("outer") from cause
    except RuntimeError as exc:
        scanner.exception("planted cause", exc)
    captured = capture_telemetry()
    with captured.telemetry.tracer.start_as_current_span("planted") as span:
        span.set_attribute("token", token)
    captured.telemetry.refreshes.add(1, {"outcome": token})
    scanner.telemetry(captured)
    scanner.reply("planted", reliability.Reply(401, [(b"x-echo", token.encode())], b""))
    assert scanner.leaks == 5, scanner.findings  # log, cause, span, metric, answer
    assert not any(token in finding for finding in scanner.findings)  # never repeated


# -- f. the negative cache's memory -------------------------------------------------------------


@pytest.mark.anyio
async def test_a_remembered_refusal_is_compact_and_holds_no_exception() -> None:
    memory = await reliability.negative_cache_memory(QUICK.dead)
    assert memory.traced_per_entry <= 1024
    assert memory.exceptions_kept <= 0
    assert memory.provider_calls_on_replay == 0


# -- bugs the parts found, fixed: pinned here one by one ------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("echo", ["refresh token", "client secret", "basic credential"])
async def test_a_secret_echoed_as_the_error_code_or_description_reaches_no_text(
    echo: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Part b found it: the ``error`` code was not redacted like the description, so a
    provider answering ``{"error": "<the refresh token>"}`` put it in RefreshUnavailable's text
    and the refresher's warning; the Basic credential was redacted nowhere."""
    caplog.set_level(logging.DEBUG)
    rig = reliability.ProviderRig("refresher", reliability.Provider())
    tally = Tally("b", echo)
    echoed = []
    for field_ in ("error", "error_description"):
        refresh_token = "rt_" + secrets.token_urlsafe(32)  # what this request presents
        secret = {
            "refresh token": refresh_token,
            "client secret": reliability.CLIENT_SECRET,
            "basic credential": reliability.BASIC,
        }[echo]
        echoed.append(secret)
        body = json.dumps({"error": "invalid_request", field_: secret}).encode()
        await rig.check(reliability.Answer(echo, 400, [], body, False), refresh_token, tally)
    await rig.close()
    rig.scanner.into(tally)
    assert_clean(tally, 2)
    assert not any(secret in caplog.text for secret in echoed)


@pytest.mark.anyio
async def test_a_busy_redis_is_a_503_that_keeps_the_session(redis_server: RedisServer) -> None:
    """Part c found it: any Redis error reply counted as "a key of another type", so while a
    long script ran (-BUSY) every session read as none: a 401, and the browser's cookie
    deleted. Only WRONGTYPE means the value is not a session."""
    now = time.time()
    store = RedisSessionStore(redis_server.url, secret_keys=[reliability.SESSION_KEY])
    try:
        session, _ = await store.save(
            {}, None, TokenSet("at_x", now + 300, now, "rt_x"), new_session=True
        )
        assert session is not None
        jar = {"atr_sid": session.id or ""}

        async def load_until_busy() -> None:
            for _ in range(100_000):  # until the script runs (then Redis answers -BUSY)
                assert await store.load(jar) == session
                await asyncio.sleep(0.001)

        redis_server.cli("CONFIG", "SET", "busy-reply-threshold", "20")
        busy = asyncio.create_task(asyncio.to_thread(_run_forever, redis_server))
        try:
            with pytest.raises(RefreshUnavailable) as caught:
                await load_until_busy()
            assert caught.value.reason == "store_unavailable"
        finally:
            while not busy.done():  # SCRIPT KILL, until the script it kills has started
                with contextlib.suppress(subprocess.CalledProcessError):
                    redis_server.cli("SCRIPT", "KILL")
                await asyncio.sleep(0.001)
            redis_server.cli("CONFIG", "SET", "busy-reply-threshold", "5000")
        assert await store.load({"atr_sid": session.id or ""}) == session
    finally:
        await store.aclose()


def _run_forever(server: RedisServer) -> None:
    """A script that keeps Redis busy until ``SCRIPT KILL``."""
    with contextlib.suppress(subprocess.CalledProcessError):  # "Script killed by user"
        server.cli("EVAL", "while true do end", "0")


# -- known bugs found on the way ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_late_write_of_the_older_of_two_generations_issued_together_never_wins(
    kind: reliability.StoreKind, request: pytest.FixtureRequest
) -> None:
    """Part d found it with Redis (a tab's write-back of generation 2 reached Redis after a
    second tab's generation 3, both at the same fake instant; the next refresh presented the
    spent refresh token and the strict provider revoked the grant). Stores ordered token sets
    by issue time then; now by generation. Here, deterministically."""
    url = request.getfixturevalue("redis_server").url if kind == "redis" else None
    clock = FakeClock()
    store = reliability.make_store(kind, clock, url)
    now = clock.time()

    def refreshed(previous: TokenSet, n: int) -> TokenSet:
        body = {"access_token": f"at_{n}", "refresh_token": f"rt_{n}", "expires_in": 300}
        return TokenSet.from_token_response(
            body, issued_at=now, default_lifetime=300, previous=previous
        )

    login = TokenSet("at_1", now + 300, now, "rt_1")
    second = refreshed(login, 2)
    third = refreshed(second, 3)  # refreshed from the second, in the same instant
    try:
        session, _ = await store.save({}, None, second, new_session=True)
        assert session is not None
        await store.persist(session, third)  # the newer generation is written first
        await store.persist(session, second)  # then the slower writer of the older one
        stored = await store.read(session)
        assert stored is not None
        assert stored.refresh_token == "rt_3"
    finally:
        await reliability.close_store(store, url)


@pytest.mark.anyio
async def test_prepending_a_new_key_keeps_every_redis_session(redis_server: RedisServer) -> None:
    now = time.time()
    token_set = TokenSet("at_" + "a" * 30, now + 300, now, "rt_" + "r" * 40)
    before = RedisSessionStore(redis_server.url, secret_keys=[reliability.OLD_KEY])
    after = RedisSessionStore(
        redis_server.url, secret_keys=[reliability.SESSION_KEY, reliability.OLD_KEY]
    )
    only_new = RedisSessionStore(redis_server.url, secret_keys=[reliability.SESSION_KEY])
    try:
        session, _ = await before.save({}, None, token_set, new_session=True)
        assert session is not None
        jar = {"atr_sid": session.id or ""}
        assert await after.load(jar) == session  # found under the old key's name, moved
        newer = TokenSet("at_" + "b" * 30, now + 600, now + 300, "rt_" + "s" * 40)
        await after.persist(session, newer)  # a refresh after the rotation is kept
        assert await only_new.load(jar) == Session(newer, session.id)  # the old key dropped
        await only_new.save(jar, session, None)  # logout removes it under every name
        assert await after.load(jar) is None
    finally:
        for store in (before, after, only_new):
            await store.aclose()


def test_the_script_reports_every_count_and_writes_its_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Another section\n")
    argv = ["--parts", "bf", "--answers", "20", "--dead", "100", "--write", "--results"]
    assert reliability.main([*argv, str(results)]) == 0
    text = results.read_text()
    assert "## Another section" in text
    assert "## Reliability (`benchmarks/reliability.py`)" in text
    assert "| b. provider fuzz, middleware, loopback socket | 20 | 0 | 0 | 0 |" in text
    assert "| bytes per entry (tracemalloc) |" in text
