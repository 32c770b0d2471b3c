"""Reliability with figures: what the middleware answers whatever browsers, providers and Redis
send it, counted.

Run from the repository root::

    python benchmarks/reliability.py           # full sizes (~4 min on 2 cores), markdown
    python benchmarks/reliability.py --quick   # the sizes tests/test_reliability.py runs in CI
    python benchmarks/reliability.py --write   # also write its section of RESULTS.md
    python benchmarks/reliability.py --parts a,c --seed 7

a. Fuzzed cookies, per store: mutated, garbage, truncated, oversized and re-keyed ``Cookie``
   headers through the middleware. Every answer is 200 (anonymous, or the session whose
   cookie was sent) or 401; a harmless change (spacing, quotes, other cookies, split headers)
   keeps the session.
b. Fuzzed token-endpoint answers (status codes, JSON shapes and types, huge numbers, deep
   nesting, encodings, Retry-After and Content-Encoding headers, echoed secrets): to a
   Refresher and through the middleware in process, and through the middleware from a provider
   on a real loopback socket. Each ends in a token set, ReauthenticationRequired (only for a
   terminal OAuth error) or RefreshUnavailable (503 with Retry-After, the session kept).
c. A Redis fault matrix, mid-traffic, on a private redis-server: stopped and restarted, killed,
   frozen (SIGSTOP), connections dropped, busy, writes refused, keys of the wrong type, garbage
   values. Answers are 200, 401 (only for a corrupted session) or 503 with Retry-After; once
   Redis is back every session is there.
d. A randomized interleaving of sessions per store: logins, expiry (a fake clock), concurrent
   tabs, forced refreshes, cancelled requests, logouts, scripted terminal and transient
   provider errors, against a strict FakeIdP. No 500, no other user's token, no session lost
   except by logout or a scripted terminal error.
e. A secrets scan of everything a-d emitted: log records at DEBUG, exceptions (text, repr,
   traceback), spans and metric points (``capture_telemetry``), the middleware's own answers.
   No token, client secret or key may appear.
f. Memory per entry of the refresher's negative cache (remembered refusals), filled with dead
   sessions: tracemalloc and RSS growth per entry.

Every part reports inputs tried, 500s, lost sessions and leaks; each must be 0 (the script
exits 1 otherwise; rows that reproduce a known bug are marked so and do not fail the run).
What each part does, and how: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import gc
import gzip
import json
import logging
import os
import random
import re
import secrets
import signal
import string
import tempfile
import threading
import time
import traceback
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

import common  # this directory is on sys.path when a benchmark runs
import httpx
import redis
from common import EXPIRED, ISSUER, check, row, table
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_token_refresh import (
    CookieSessionStore,
    MemorySessionStore,
    OAuth2Client,
    ReauthenticationRequired,
    Refresher,
    RefreshUnavailable,
    SessionStore,
    TokenRefreshError,
    TokenRefreshMiddleware,
    TokenSet,
)
from asgi_token_refresh.redis import RedisSessionStore
from asgi_token_refresh.testing import (
    CapturedTelemetry,
    FakeClock,
    FakeIdP,
    capture_telemetry,
    serve,
)
from tests.processes import (
    RedisServer,
    free_port,
    kill,
    running_redis,
    spawn_redis,
)

logger = logging.getLogger("reliability")

CLIENT_SECRET = "cs_" + secrets.token_urlsafe(24)
BASIC = base64.b64encode(f"app:{CLIENT_SECRET}".encode()).decode()
SESSION_KEY = "sk_" + secrets.token_urlsafe(32)
OLD_KEY = "ok_" + secrets.token_urlsafe(32)  # still accepted: the key before a rotation
FOREIGN_KEY = "fk_" + secrets.token_urlsafe(32)  # another app's: never accepted
GRACE_TTL = 60.0  # the Refresher's default
LIMIT = 64 * 1024  # max_response_bytes of the fuzzed client

# What a token looks like here: FakeIdP's and the fuzzers' tokens are "at_"/"rt_"/"code_" plus
# URL-safe base64, ID tokens are JWTs. Any such string in emitted text is a leak.
TOKEN_SHAPED = re.compile(
    r"(?<![A-Za-z0-9_-])(?:at|rt|code)_[A-Za-z0-9_-]{16,}|eyJ[A-Za-z0-9_-]{8,}\.eyJ", re.ASCII
)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
StoreKind = Literal["cookie", "memory", "redis"]
STORES: tuple[StoreKind, ...] = ("cookie", "memory", "redis")
STORE_NAMES = {
    "cookie": "CookieSessionStore",
    "memory": "MemorySessionStore",
    "redis": "RedisSessionStore",
}


@dataclass(frozen=True)
class Sizes:
    cookies: int
    answers: int
    matrix_sessions: int
    matrix_requests: int
    sessions: int
    rounds: int
    dead: int


SIZES = {
    "cookies": "a: fuzzed Cookie headers per store",
    "answers": "b: fuzzed token-endpoint answers per mode (refresher, middleware, socket)",
    "matrix_sessions": "c: browsers in the Redis fault matrix",
    "matrix_requests": "c: requests in each phase (before, during, after) of each fault",
    "sessions": "d: browsers per store",
    "rounds": "d: rounds of random actions (the clock moves between rounds)",
    "dead": "f: dead sessions in the negative cache",
}
FULL = Sizes(
    cookies=100_000,
    answers=2_000,
    matrix_sessions=60,
    matrix_requests=200,
    sessions=500,
    rounds=30,
    dead=10_000,
)
QUICK = Sizes(
    cookies=3_000,
    answers=300,
    matrix_sessions=24,
    matrix_requests=40,
    sessions=200,
    rounds=6,
    dead=1_000,
)


# -- what a part reports --------------------------------------------------------------------------


@dataclass
class Tally:
    """One row of the report: what was tried, and every way it went wrong, counted.

    ``server_errors``: an exception out of the app, or a 5xx other than a 503 with Retry-After.
    ``lost``: a session that existed and was not ended on purpose (logout, a scripted terminal
    error, corrupted data) answered as no session, or was gone afterwards. ``leaks``: a
    secret in emitted text (:class:`Scanner`), or another user's token served. ``undefined``:
    any other answer outside the part's contract (a 503 without Retry-After, a 404, a
    terminal error for a transient answer or the reverse).
    """

    part: str
    what: str
    inputs: int = 0
    server_errors: int = 0
    lost: int = 0
    leaks: int = 0
    undefined: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    known: str | None = None  # the known bug this row shows: reported, not failing the run

    def problem(self, kind: str, description: str) -> None:
        """Count nothing; keep the first few descriptions for the report."""
        if len(self.problems) < 8:
            self.problems.append(f"{kind}: {description}")

    def count(self, kind: Literal["server_errors", "lost", "leaks", "undefined"], why: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.problem(kind, why)

    @property
    def clean(self) -> bool:
        return not (self.server_errors or self.lost or self.leaks or self.undefined)

    def summary(self) -> str:
        return (
            f"{self.part} {self.what}: {self.inputs} inputs, {self.server_errors} 500s, "
            f"{self.lost} lost, {self.leaks} leaks, {self.undefined} undefined"
            + "".join(f"\n  {p}" for p in self.problems)
        )


# -- e. the secrets scan ----------------------------------------------------------------------


class Scanner:
    """Looks for secrets in everything a part emits: log records (at DEBUG, every logger),
    exceptions, spans, metric points and the middleware's own answers.

    A secret is anything token-shaped (``TOKEN_SHAPED``) or one of ``literals`` (the client
    secret, its Basic credential, the session keys). Text is scanned as it comes, so nothing
    is kept but counts and the first few findings (which name where, never the secret).
    """

    def __init__(self, literals: Sequence[str] = (CLIENT_SECRET, BASIC, SESSION_KEY, OLD_KEY)):
        self.literals = [s for s in literals if len(s) >= 8]
        self.items = 0
        self.leaks = 0
        self.findings: list[str] = []
        self.kinds: Counter[str] = Counter()

    def text(self, where: str, text: str) -> None:
        self.items += 1
        self.kinds[where.split(":")[0]] += 1
        found = TOKEN_SHAPED.search(text)
        what = f"a token ({found.group()[:6]}...)" if found else None
        if what is None:
            what = next((f"a secret ({s[:3]}...)" for s in self.literals if s in text), None)
        if what is not None:
            self.leaks += 1
            if len(self.findings) < 8:
                self.findings.append(f"{what} in {where}")

    def exception(self, where: str, exc: BaseException) -> None:
        """Every form an exception takes when shown: text, repr, attributes, the traceback with
        its whole chain of causes."""
        parts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
        seen: BaseException | None = exc
        while seen is not None:
            parts.append(repr(getattr(seen, "__dict__", {})))
            seen = seen.__cause__ or seen.__context__
        self.text(f"exception: {where} ({type(exc).__name__})", "\n".join(parts))

    def telemetry(self, captured: CapturedTelemetry) -> None:
        """Finished spans (attributes, events, links, status) and every metric point."""
        for span in captured.spans():
            self.text(f"span: {span.name}", span.to_json())
        captured.exporter.clear()
        data = captured.reader.get_metrics_data()
        if data is not None:
            for resource in data.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        self.text(f"metric: {metric.name}", metric.to_json())

    def reply(self, where: str, reply: Reply) -> None:
        """An answer the middleware made itself (401, 503, 303): headers and body. Set-Cookie
        is left out: it carries a session id or a sealed cookie by design."""
        headers = [(k, v) for k, v in reply.headers if k != b"set-cookie"]
        self.text(f"answer: {where}", f"{headers!r} {reply.body!r}")

    @contextlib.contextmanager
    def logs(self) -> Iterator[None]:
        """Every log record of every logger, at DEBUG, for the duration."""
        handler = _ScanningHandler(self)
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(level)

    def into(self, tally: Tally) -> None:
        """Add the findings to a part's row."""
        tally.leaks += self.leaks
        for finding in self.findings:
            tally.problem("leak", finding)


class _ScanningHandler(logging.Handler):
    def __init__(self, scanner: Scanner) -> None:
        super().__init__(logging.DEBUG)
        self.scanner = scanner
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self._lock_scan = threading.Lock()  # uvicorn's thread logs too

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)  # with the traceback and stack, when the record has them
        with self._lock_scan:
            self.scanner.text(f"log: {record.name}", text + repr(record.args))


# -- talking to the app ---------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    error: str | None = None  # the traceback, when the app raised

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def token(self) -> str | None:
        """The ``token`` of the test app's JSON answer."""
        try:
            value = json.loads(self.body).get("token")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def retry_after_ok(self) -> bool:
        value = self.header(b"retry-after")
        return value is not None and value.isdigit() and 1 <= int(value) <= 120


async def call(
    app: Any, method: str, path: str, cookies: Sequence[bytes] = (), query: str = ""
) -> Reply:
    """One request to ``app`` as an ASGI callable, each ``cookies`` item a ``Cookie`` header
    as sent on the wire (any bytes). An exception out of the app is a 500, with its traceback."""
    headers = [(b"host", b"app.test"), *((b"cookie", c) for c in cookies)]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",  # behind TLS, as Secure session cookies require
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    reply = Reply(0, [], b"")
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            await asyncio.Event().wait()  # the client stays: as a server would, wait forever
        received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")

    try:
        await app(scope, receive, send)
    except Exception:
        reply.error = traceback.format_exc()
        reply.status = 500
    return reply


@dataclass
class Browser:
    """A user's browser: a cookie jar that follows Set-Cookie, and what the test knows."""

    user: str
    jar: dict[str, str] = field(default_factory=dict)
    logged_in: bool = False
    may_end: bool = False  # its session may end on purpose now (data corrupted under it)
    busy: bool = False

    def cookies(self) -> list[bytes]:
        if not self.jar:
            return []
        return ["; ".join(f"{k}={v}" for k, v in self.jar.items()).encode("latin-1")]

    def absorb(self, reply: Reply) -> None:
        for name, value in reply.headers:
            if name != b"set-cookie":
                continue
            text = value.decode("latin-1")
            pair, _, attributes = text.partition(";")
            cookie, _, content = pair.partition("=")
            if "Max-Age=0" in attributes:
                self.jar.pop(cookie, None)
            else:
                self.jar[cookie] = content


# -- whose token is it ------------------------------------------------------------------------


class Owners:
    """Every token issued, by user: what "another user's token" is checked against."""

    def __init__(self) -> None:
        self.of: dict[str, str] = {}

    def issued(self, user: str, tokens: TokenSet | dict[str, Any]) -> None:
        if isinstance(tokens, TokenSet):
            values = [tokens.access_token, tokens.refresh_token, tokens.id_token]
        else:
            values = [tokens.get(k) for k in ("access_token", "refresh_token", "id_token")]
        for value in values:
            if isinstance(value, str):
                self.of[value] = user


class Tap(httpx.AsyncBaseTransport):
    """Between the app's OAuth2Client and the FakeIdP: learns whose every new token is (from
    the refresh token presented), and answers some refreshes itself, as scripted per user:
    ``invalid_grant`` for a doomed user (a terminal error the test knows of), a 503, 429 or
    500 for a user in trouble (a transient one).

    Each token request moves the clock 1 ms, as time passes while a provider answers. (Stores
    order token sets by generation, not by this time: tests/test_reliability.py pins it.)"""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        owners: Owners,
        rnd: random.Random,
        clock: FakeClock,
    ) -> None:
        self.inner = inner
        self.owners = owners
        self.rnd = rnd
        self.clock = clock
        self.doomed: set[str] = set()
        self.refused: set[str] = set()  # users refused since their last login
        self.troubled: set[str] = set()
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        form = parse_qs((await request.aread()).decode())
        presented = form.get("refresh_token", [""])[0]
        user = self.owners.of.get(presented)
        if request.url.path.endswith("/token"):
            self.calls += 1
            self.clock.advance(0.001)
            await asyncio.sleep(0)  # a network suspends: lets flights overlap
            if user is not None and user in self.doomed:
                self.doomed.discard(user)
                self.refused.add(user)
                status = self.rnd.choice((400, 403))  # oidc-provider's, Auth0's
                return httpx.Response(status, json={"error": "invalid_grant"})
            if user is not None and user in self.troubled:
                self.troubled.discard(user)
                status, wait = self.rnd.choice(((503, "7"), (429, "3"), (500, None)))
                headers = {"retry-after": wait} if wait else {}
                return httpx.Response(status, text="upstream failure", headers=headers)
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        if user is not None and response.status_code == 200:
            with contextlib.suppress(ValueError):
                self.owners.issued(user, json.loads(body))
        return httpx.Response(response.status_code, headers=response.headers, content=body)

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- the app under test -----------------------------------------------------------------------


def app_for(
    store: SessionStore,
    refresher: Refresher,
    scanner: Scanner,
    idp: FakeIdP | None = None,
    owners: Owners | None = None,
) -> Starlette:
    """Starlette with the middleware: ``/api`` (a fresh token, refreshing if due), ``/whoami``
    (the session's token, or none, without refreshing), ``/renew`` (a forced compare-and-refresh),
    ``POST /login?user=`` (a grant from the FakeIdP) and ``POST /logout``. Every exception the
    app sees from the library is scanned."""

    async def seen(step: Awaitable[Any]) -> Any:
        try:
            return await step
        except TokenRefreshError as exc:
            scanner.exception("raised to the app", exc)
            raise

    async def api(request: Request) -> JSONResponse:
        return JSONResponse({"token": await seen(request.state.token.get())})

    async def whoami(request: Request) -> JSONResponse:
        token_set = await seen(request.state.token.token_set())
        return JSONResponse({"token": token_set.access_token if token_set else None})

    async def renew(request: Request) -> JSONResponse:
        return JSONResponse({"token": await seen(request.state.token.renew())})

    async def login(request: Request) -> JSONResponse:
        assert idp is not None
        assert owners is not None
        user = request.query_params["user"]
        body = idp.issue(user)
        owners.issued(user, body)
        await seen(request.state.token.login(body))
        return JSONResponse({"token": body["access_token"]})

    async def logout(request: Request) -> JSONResponse:
        await seen(request.state.token.logout())
        return JSONResponse({"token": None})

    routes = [
        Route("/api", api),
        Route("/whoami", whoami),
        Route("/renew", renew),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
    middleware = [Middleware(TokenRefreshMiddleware, refresher=refresher, store=store)]
    return Starlette(routes=routes, middleware=middleware)


def oauth_client(
    transport: httpx.AsyncBaseTransport | None,
    clock: FakeClock,
    telemetry: CapturedTelemetry,
    base_url: str = ISSUER,
    **options: Any,
) -> OAuth2Client:
    return OAuth2Client(
        client_id="app",
        client_secret=CLIENT_SECRET,
        token_endpoint=f"{base_url}/token",
        revocation_endpoint=f"{base_url}/revoke",
        transport=transport,
        clock=clock,
        telemetry=telemetry.telemetry,
        **options,
    )


def make_store(kind: StoreKind, clock: FakeClock, redis_url: str | None, **options: Any) -> Any:
    if kind == "cookie":
        return CookieSessionStore([SESSION_KEY, OLD_KEY], **options)
    if kind == "memory":
        return MemorySessionStore(clock=clock, **options)
    assert redis_url is not None
    prefix = "atr-rel-" + secrets.token_hex(4)
    return RedisSessionStore(redis_url, secret_keys=[SESSION_KEY], prefix=prefix, **options)


async def close_store(store: Any, redis_url: str | None) -> None:
    if isinstance(store, RedisSessionStore):
        await store.aclose()
        assert redis_url is not None
        with contextlib.closing(redis.Redis.from_url(redis_url)) as raw:
            for key in raw.scan_iter(match=f"{store.prefix}:*"):
                raw.delete(key)


def expired_token_set(clock: FakeClock, refresh_token: str) -> TokenSet:
    now = clock.time()
    return TokenSet("at_" + secrets.token_urlsafe(24), now - 10, now - 310, refresh_token)


# -- a. cookie fuzz -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CookieCase:
    """One request's ``Cookie`` headers, and what may be answered to them."""

    headers: tuple[bytes, ...]
    sources: frozenset[str]  # users whose cookie material is in the headers
    keeps: str | None  # a harmless change of this user's cookies: the session must be kept
    route: str
    kind: str


_UNRELATED = ("theme", "_ga", "csrftoken", "lang", "consent", "atr_other", "atr_session_old")
_JUNK = string.ascii_letters + string.digits + "-_.~!$&'()*+,/:?@[]%" + " \t"
_B64 = string.ascii_letters + string.digits + "-_"


_TABLES: dict[str, bytes] = {}


def _junk(rnd: random.Random, length: int, alphabet: str = _JUNK) -> str:
    """``length`` characters of ``alphabet``: random bytes mapped through a table (fast enough
    for 100,000 cookies; the slight bias is of no matter here)."""
    table = _TABLES.get(alphabet)
    if table is None:
        table = _TABLES[alphabet] = bytes(ord(alphabet[i % len(alphabet)]) for i in range(256))
    return rnd.randbytes(length).translate(table).decode("latin-1")


class CookieFuzzer:
    """Makes :class:`CookieCase` s from the real sessions' cookies, with any ``random.Random``
    (Hypothesis' ``st.randoms()`` in the tests). A quarter are harmless changes of one
    session's cookies; the rest damage, replace, splice, re-key or bury them."""

    def __init__(
        self,
        sessions: Sequence[tuple[str, dict[str, str]]],
        cookie_name: str,
        forged: Sequence[dict[str, str]],
    ) -> None:
        self.sessions = list(sessions)
        self.name = cookie_name
        self.forged = list(forged)  # cookies that look right and must never authenticate
        self.damaging: list[Callable[[random.Random], CookieCase]] = [
            self._garbage_value,
            self._truncated,
            self._flipped,
            self._header_fields,
            self._spliced,
            self._forged,
            self._oversized,
            self._syntax,
            self._random_header,
            self._first_wins,
        ]

    def case(self, rnd: random.Random) -> CookieCase:
        if rnd.random() < 0.25:
            return self._harmless(rnd)
        return rnd.choice(self.damaging)(rnd)

    # -- helpers -------------------------------------------------------------------------------

    def _session(self, rnd: random.Random) -> tuple[str, list[tuple[str, str]]]:
        user, cookies = rnd.choice(self.sessions)
        return user, list(cookies.items())

    @staticmethod
    def _route(rnd: random.Random) -> str:
        return "/api" if rnd.random() < 0.5 else "/whoami"

    def _render(
        self,
        rnd: random.Random,
        pairs: Sequence[tuple[str, str]],
        kind: str,
        sources: set[str],
        keeps: str | None = None,
        split: bool = False,
    ) -> CookieCase:
        separator = rnd.choice(("; ", "; ", ";", " ; ", ";  "))
        text = [f"{name}={value}" for name, value in pairs]
        if split and len(text) > 1:  # HTTP/2 sends cookies in several headers
            cut = rnd.randint(1, len(text) - 1)
            headers: tuple[str, ...] = (separator.join(text[:cut]), separator.join(text[cut:]))
        else:
            headers = (separator.join(text),)
        return CookieCase(
            tuple(_encode(h) for h in headers),
            frozenset(sources),
            keeps,
            self._route(rnd),
            kind,
        )

    def _replace_main(self, pairs: list[tuple[str, str]], value: str) -> list[tuple[str, str]]:
        return [(n, value if n == self.name else v) for n, v in pairs]

    def _main(self, pairs: Sequence[tuple[str, str]]) -> str:
        return next(v for n, v in pairs if n == self.name)

    # -- harmless: the session is kept ----------------------------------------------------------

    def _harmless(self, rnd: random.Random) -> CookieCase:
        user, pairs = self._session(rnd)
        changes = rnd.sample(
            ("others", "quotes", "split", "shuffle", "twice", "empty", "many", "spaces"),
            rnd.randint(1, 3),
        )
        if "shuffle" in changes:
            rnd.shuffle(pairs)
        if "quotes" in changes:
            pairs = [(n, f'"{v}"') for n, v in pairs]
        if "spaces" in changes:
            pairs = [(f" {n} ", f" {v}\t") for n, v in pairs]
        if "twice" in changes:
            pairs = pairs + pairs  # the same values again: the first wins, and it is the same
        if "others" in changes:
            for _ in range(rnd.randint(1, 4)):
                other = (rnd.choice(_UNRELATED), _junk(rnd, rnd.randint(0, 40), _B64))
                pairs.insert(rnd.randint(0, len(pairs)), other)
            if rnd.random() < 0.3:  # a stale chunk beyond the count: ignored
                pairs.append((f"{self.name}.{rnd.randint(9, 16)}", _junk(rnd, 30, _B64)))
        if "many" in changes:  # a crowded cookie jar
            crowd = [(f"c{i}", _junk(rnd, 20, _B64)) for i in range(rnd.randint(20, 300))]
            pairs = crowd + pairs
        if "empty" in changes:
            pairs = [("", ""), *pairs, ("flag", "")]
        kind = "harmless: " + "+".join(sorted(changes))
        text = "; ".join(f"{n}={v}" if n else "" for n, v in pairs)
        if "empty" in changes:
            text = ";;" + text.replace("flag=", "flag") + ";"
        if "split" in changes and len(pairs) > 1:
            return self._render(rnd, pairs, kind, {user}, keeps=user, split=True)
        return CookieCase((_encode(text),), frozenset({user}), user, self._route(rnd), kind)

    # -- damaging: any session in sources, or none ---------------------------------------------

    def _garbage_value(self, rnd: random.Random) -> CookieCase:
        user, pairs = self._session(rnd)
        choice = rnd.randrange(6)
        if choice == 0:
            value = _junk(rnd, rnd.randint(0, 300))
        elif choice == 1:
            value = rnd.randbytes(rnd.randint(1, 200)).decode("latin-1")
        elif choice == 2:
            value = "".join(chr(rnd.randint(0x80, 0x2FFF)) for _ in range(rnd.randint(1, 50)))
        elif choice == 3:
            value = _junk(rnd, rnd.randint(20, 2000), _B64)
        elif choice == 4:
            value = f"v1.{rnd.randint(1, 3)}." + _junk(rnd, rnd.randint(0, 600), _B64)
        else:
            value = base64.urlsafe_b64encode(rnd.randbytes(rnd.randint(0, 400))).decode()
        return self._render(rnd, self._replace_main(pairs, value), "garbage value", {user})

    def _truncated(self, rnd: random.Random) -> CookieCase:
        user, pairs = self._session(rnd)
        index = rnd.randrange(len(pairs))
        name, value = pairs[index]
        choice = rnd.randrange(3)
        if choice == 0 and value:
            cut = rnd.randrange(len(value))
            pairs[index] = (name, value[:cut])
        elif choice == 1 and value:
            pairs[index] = (name, value[rnd.randrange(len(value)) :])
        else:
            del pairs[index]  # a chunk (or the cookie) went missing
        case = self._render(rnd, pairs, "truncated", {user})
        if rnd.random() < 0.2 and case.headers[0]:  # the header itself cut short
            header = case.headers[0]
            return dataclasses.replace(case, headers=(header[: rnd.randrange(len(header))],))
        return case

    def _flipped(self, rnd: random.Random) -> CookieCase:
        user, pairs = self._session(rnd)
        index = rnd.randrange(len(pairs))
        name, value = pairs[index]
        if value:
            at = rnd.randrange(len(value))
            swapped = rnd.choice(_B64.replace(value[at], ""))
            pairs[index] = (name, value[:at] + swapped + value[at + 1 :])
        return self._render(rnd, pairs, "one character changed", {user})

    def _header_fields(self, rnd: random.Random) -> CookieCase:
        """The cookie store's ``v1.<count>.`` head, or a session id's shape, made odd."""
        user, pairs = self._session(rnd)
        value = self._main(pairs)
        head = value.split(".", 2)
        odd = rnd.choice(
            ("0", "17", "-1", "1e3", "²", "\u0661", "99999999999999999999", " 1", "1 ", "", "0x2")
        )
        if len(head) == 3:
            if rnd.random() < 0.5:
                value = f"{head[0]}.{odd}.{head[2]}"
            else:
                version = rnd.choice(("v2", "V1", "v", "", "v1 ", "v0"))
                value = f"{version}.{head[1]}.{head[2]}"
        else:  # a session id
            changes: list[Callable[[str], str]] = [
                lambda v: v + rnd.choice(_B64),
                lambda v: v[:-1],
                lambda v: v.swapcase(),
                lambda v: v.replace("-", "%2D"),
                lambda v: v + "é",
                lambda v: v * 3,
                lambda v: _junk(rnd, rnd.choice((43, 128, 129, 4096)), _B64),
                lambda v: "v1.1." + v,
            ]
            value = rnd.choice(changes)(value)
        return self._render(rnd, self._replace_main(pairs, value), "odd head or id", {user})

    def _spliced(self, rnd: random.Random) -> CookieCase:
        """Two users' cookies mixed: one's value under the other's names, chunks exchanged,
        halves joined."""
        (user, pairs), (other, other_pairs) = self._session(rnd), self._session(rnd)
        choice = rnd.randrange(3)
        if choice == 0:  # another user's chunks (or id) under this user's head
            donor = dict(other_pairs)
            pairs = [(n, donor.get(n, v) if n != self.name else v) for n, v in pairs]
            if len(pairs) == 1:
                pairs = [(self.name, donor[self.name])]
        elif choice == 1:  # halves of two values joined
            mine, theirs = self._main(pairs), dict(other_pairs)[self.name]
            cut = rnd.randrange(max(1, min(len(mine), len(theirs))))
            pairs = self._replace_main(pairs, mine[:cut] + theirs[cut:])
        else:  # one value under another name: a chunk as the head, the head as a chunk
            values = [v for _, v in pairs]
            names = [self.name] + [f"{self.name}.{i}" for i in range(1, 4)]
            pairs = [(rnd.choice(names), rnd.choice(values)) for _ in range(rnd.randint(1, 4))]
        return self._render(rnd, pairs, "spliced", {user, other})

    def _forged(self, rnd: random.Random) -> CookieCase:
        """Values sealed with another app's key, or for another cookie name, or a session id
        nobody was given: alone, or under a real session's chunks."""
        forged = list(rnd.choice(self.forged).items())
        if rnd.random() < 0.5:
            return self._render(rnd, forged, "forged", set())
        user, pairs = self._session(rnd)
        head = self._main(forged)
        return self._render(rnd, self._replace_main(pairs, head), "forged head", {user})

    def _oversized(self, rnd: random.Random) -> CookieCase:
        user, pairs = self._session(rnd)
        size = rnd.choice((4096, 8192, 16_384, 65_536))
        choice = rnd.randrange(3)
        if choice == 0:
            value = self._main(pairs)
            pairs = self._replace_main(pairs, (value * (size // max(1, len(value)) + 1))[:size])
        elif choice == 1:
            pairs = [(self.name, _junk(rnd, size, _B64))]
            user = ""
        else:  # a chunk count the cookies do not have, and huge chunks
            pairs = [(self.name, "v1.16." + _junk(rnd, 3800, _B64))]
            pairs += [(f"{self.name}.{i}", _junk(rnd, 3800, _B64)) for i in range(1, 16)]
            user = ""
        return self._render(rnd, pairs, "oversized", {user} - {""})

    def _syntax(self, rnd: random.Random) -> CookieCase:
        user, pairs = self._session(rnd)
        value = self._main(pairs)
        forms = (
            f"{self.name}",
            f"={value}",
            f"{self.name}=={value}",
            f"{self.name}={value}={value}",
            f"{self.name}={value[: len(value) // 2]};{value[len(value) // 2 :]}",
            f"{self.name}={value}\x00",
            f"{self.name}=\r\n{value}",
            f"{self.name}={value},{self.name}=x",
            f'{self.name}="{value}',
            f"$Version=1; {self.name}={value}; $Path=/",
            f"{self.name.upper()}={value}",
            f"{self.name}\t={value}",
        )
        form = rnd.choice(forms)
        rest = "; ".join(f"{n}={v}" for n, v in pairs if n != self.name)
        text = form + ("; " + rest if rest else "")
        return CookieCase((_encode(text),), frozenset({user}), None, self._route(rnd), "syntax")

    def _random_header(self, rnd: random.Random) -> CookieCase:
        choice = rnd.randrange(3)
        if choice == 0:
            headers: tuple[bytes, ...] = (rnd.randbytes(rnd.randint(0, 500)),)
        elif choice == 1:
            pairs = [
                (_junk(rnd, rnd.randint(0, 12)), _junk(rnd, rnd.randint(0, 80)))
                for _ in range(rnd.randint(0, 12))
            ]
            headers = (_encode("; ".join(f"{n}={v}" for n, v in pairs)),)
        else:
            headers = tuple(b"" for _ in range(rnd.randint(1, 3)))  # empty Cookie headers
        return CookieCase(headers, frozenset(), None, self._route(rnd), "random header")

    def _first_wins(self, rnd: random.Random) -> CookieCase:
        """Several values for the session cookie: the first one counts, whatever it is."""
        user, pairs = self._session(rnd)
        other, other_pairs = self._session(rnd)
        forged = rnd.choice(self.forged)[self.name]
        first = rnd.choice((_junk(rnd, 40, _B64), dict(other_pairs)[self.name], "", forged))
        return self._render(rnd, [(self.name, first), *pairs], "several values", {user, other})


def _encode(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")  # how browsers send what latin-1 cannot hold


class CookieRig:
    """The app with one store, ``sessions`` users logged in through it, and the checks of
    part a: :meth:`check` sends one case and judges the answer."""

    def __init__(
        self,
        kind: StoreKind,
        store: Any,
        app: Starlette,
        owners: Owners,
        scanner: Scanner,
        captured: CapturedTelemetry,
        redis_url: str | None,
    ) -> None:
        self.kind = kind
        self.store = store
        self.app = app
        self.owners = owners
        self.scanner = scanner
        self.captured = captured
        self.redis_url = redis_url
        self.sessions: list[tuple[str, dict[str, str]]] = []
        self.fuzzer: CookieFuzzer = CookieFuzzer([], "", [])

    @classmethod
    async def create(
        cls, kind: StoreKind, redis_url: str | None = None, users: int = 16
    ) -> CookieRig:
        clock = FakeClock()
        idp = FakeIdP(issuer=ISSUER, clock=clock, clients={"app": CLIENT_SECRET})
        captured = capture_telemetry()
        client = oauth_client(idp.transport(), clock, captured)
        refresher = Refresher(client, jitter=0.0)
        # The smallest chunks: every cookie-store session spans several cookies.
        options: dict[str, Any] = {"chunk_size": 256} if kind == "cookie" else {}
        if kind == "redis":
            options["timeout"] = 5.0  # a healthy local Redis: a 503 here would be a finding
        store = make_store(kind, clock, redis_url, **options)
        scanner = Scanner()
        owners = Owners()
        rig = cls(kind, store, app_for(store, refresher, scanner, idp, owners), owners, scanner,
                  captured, redis_url)  # fmt: skip
        for i in range(users):
            browser = Browser(f"user{i:02d}")
            reply = await call(rig.app, "POST", "/login", query=f"user={browser.user}")
            check(reply.status == 200, f"login answered {reply.status}: {reply.error}")
            browser.absorb(reply)
            rig.sessions.append((browser.user, browser.jar))
        name = rig.store.cookie_name
        forged = [{name: secrets.token_urlsafe(32)} for _ in range(4)]  # ids nobody was given
        if kind == "cookie":
            # Sessions sealed with the previous key still open (keys rotate); cookies sealed
            # with another app's key, or for another cookie name, never do.
            for i, keys, sealed_as in (
                (0, [OLD_KEY], "atr_session"),
                (1, [OLD_KEY], "atr_session"),
                (2, [FOREIGN_KEY], "atr_session"),
                (3, [SESSION_KEY], "other_name"),
            ):
                user = f"rotated{i}" if keys == [OLD_KEY] else f"mallory{i}"
                body = idp.issue(user)
                owners.issued(user, body)
                token_set = TokenSet.from_token_response(
                    body, issued_at=clock.time(), default_lifetime=3600.0
                )
                sealer = CookieSessionStore(keys, cookie_name=sealed_as, chunk_size=256)
                _, headers = await sealer.save({}, None, token_set, new_session=True)
                jar = Browser(user)
                jar.absorb(Reply(200, [(b"set-cookie", h.encode()) for h in headers], b""))
                cookies = {n.replace(sealed_as, "atr_session"): v for n, v in jar.jar.items()}
                if keys == [OLD_KEY]:
                    rig.sessions.append((user, cookies))
                else:
                    forged.append(cookies)
        rig.fuzzer = CookieFuzzer(rig.sessions, name, forged)
        return rig

    async def check(self, case: CookieCase, tally: Tally) -> None:
        tally.inputs += 1
        reply = await call(self.app, "GET", case.route, case.headers)
        what = f"{case.kind} {case.route} {case.headers[0][:120]!r}"
        tally.answers[str(reply.status)] += 1
        if reply.status == 500 or reply.error is not None:
            tally.count("server_errors", f"{what} -> {_last_line(reply.error)}")
            if reply.error:
                self.scanner.text("log: traceback of a 500", reply.error)
            return
        if reply.status != 200:
            self.scanner.reply(case.kind, reply)
        if reply.status == 200:
            token = reply.token()
            if token is None and case.route == "/api":
                tally.count("undefined", f"{what} -> 200 without a token")
            elif token is not None and self.owners.of.get(token) not in case.sources:
                owner = self.owners.of.get(token)
                tally.count("leaks", f"{what} -> the token of {owner}, not of {set(case.sources)}")
            elif case.keeps is not None and self.owners.of.get(token or "") != case.keeps:
                tally.count("lost", f"{what} -> 200 without {case.keeps}'s session")
        elif reply.status == 401:
            if case.keeps is not None:
                tally.count("lost", f"{what} -> 401")
        elif reply.status == 503 and self.kind == "redis" and reply.retry_after_ok():
            tally.notes.append(f"503 for {case.kind}")  # Redis too slow: defined, but noted
        else:
            tally.count("undefined", f"{what} -> {reply.status} {reply.body[:100]!r}")

    async def recheck_sessions(self, tally: Tally) -> None:
        """Afterwards: every session is still there, with its own token."""
        for user, cookies in self.sessions:
            browser = Browser(user, dict(cookies))
            reply = await call(self.app, "GET", "/api", browser.cookies())
            tally.inputs += 1
            if reply.status != 200 or self.owners.of.get(reply.token() or "") != user:
                tally.count("lost", f"{user}'s session after the fuzz: {reply.status}")

    async def close(self) -> None:
        self.scanner.telemetry(self.captured)
        self.captured.shutdown()
        await close_store(self.store, self.redis_url)


def _last_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[-1] if text else ""


async def cookie_fuzz(
    kind: StoreKind, count: int, rnd: random.Random, redis_url: str | None = None
) -> tuple[Tally, Scanner]:
    """Part a for one store: ``count`` fuzzed Cookie headers, then every session re-checked."""
    tally = Tally("a", f"cookie fuzz, {STORE_NAMES[kind]}")
    rig = await CookieRig.create(kind, redis_url)
    with rig.scanner.logs():
        try:
            for _ in range(count):
                await rig.check(rig.fuzzer.case(rnd), tally)
            await rig.recheck_sessions(tally)
        finally:
            await rig.close()
    kinds = Counter(n.split(" for ")[0] for n in tally.notes)
    tally.notes = [f"{n}: {k}" for k, n in kinds.items()]
    rig.scanner.into(tally)
    return tally, rig.scanner


# -- b. provider fuzz ---------------------------------------------------------------------------


TERMINAL_CODES = ("invalid_grant", "invalid_client", "unauthorized_client")
OTHER_CODES = (
    "invalid_request",
    "invalid_scope",
    "unsupported_grant_type",
    "temporarily_unavailable",
    "server_error",
    "access_denied",
    "slow_down",
    "invalid_token",
    "interaction_required",
)
NEAR_MISSES = (
    " invalid_grant",
    "invalid_grant ",
    "INVALID_GRANT",
    "Invalid_Grant",
    "invalid-grant",
    "invalid_grants",
    "invalid_grant,invalid_client",
    "ínvalid_grant",
    "invalid_grant\n",
    "invalid_grant" + "x" * 60,
    "",
)
ERROR_STATUSES = (
    (400,) * 8
    + (401, 401, 403, 403, 404, 405, 409, 410, 413, 415, 418, 422, 429, 429, 431)
    + (500, 500, 501, 502, 503, 503, 504, 520, 599, 300, 301, 302, 303, 307, 308)
)
Fault = Literal["", "die-before", "die-mid-body", "slow"]
Mode = Literal["refresher", "middleware", "socket"]
MODES: tuple[Mode, ...] = ("refresher", "middleware", "socket")


@dataclass
class Answer:
    """A token-endpoint answer, and whether the session must end: ``terminal`` is True only for
    a well-formed OAuth error whose code is terminal, False when it must not end, None when
    either is defined (a JSON body some parsers accept and others refuse)."""

    kind: str
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    terminal: bool | None
    fault: Fault = ""
    access_token: str | None = None  # what a success carries


@dataclass(frozen=True)
class Secrets:
    """What the request carries that the provider may echo."""

    refresh_token: str

    def any(self, rnd: random.Random) -> str:
        return rnd.choice((self.refresh_token, CLIENT_SECRET, BASIC, f"Basic {BASIC}"))


class AnswerFuzzer:
    """Makes :class:`Answer` s with any ``random.Random``: successes with odd fields, OAuth
    errors (terminal, transient, near misses, echoing the request's secrets), bodies of every
    JSON shape and none, headers (Retry-After, Content-Encoding, Content-Type), bodies over the
    limit and, over a socket, a provider that dies or stalls."""

    def __init__(self, *, faults: bool) -> None:
        self.faults = faults
        self.makers: list[tuple[Callable[[random.Random, Secrets], Answer], int]] = [
            (self.success, 3),
            (self.error, 5),
            (self.shape, 2),
            (self.oversized, 1),
        ]

    def answer(self, rnd: random.Random, secrets_: Secrets) -> Answer:
        makers, weights = zip(*self.makers, strict=True)
        maker: Callable[[random.Random, Secrets], Answer] = rnd.choices(makers, weights)[0]
        answer = maker(rnd, secrets_)
        if rnd.random() < 0.3:
            self._headers(rnd, answer, secrets_)
        if self.faults and rnd.random() < 0.03:
            answer.fault = rnd.choice(("die-before", "die-mid-body", "slow"))
            answer.terminal = False
            answer.kind += f" + {answer.fault}"
        if answer.status in (204, 304):  # no body, by HTTP
            answer.body = b""
            answer.terminal = False
        return answer

    # -- makers ------------------------------------------------------------------------------

    def success(self, rnd: random.Random, secrets_: Secrets) -> Answer:
        access_token = "at_" + secrets.token_urlsafe(24)
        payload: dict[str, Any] = {"access_token": access_token}
        odd: list[str] = []
        for name, values in (
            ("token_type", ("Bearer", "bearer", "DPoP", "mac", 7, None, "")),
            (
                "expires_in",
                (3600, "3600", 1, 0, -5, 3.5, 1e308, "soon", True, None, [], {}, "1e309"),
            ),
            ("refresh_token", ("rt_" + secrets.token_urlsafe(32), None, "", 5, ["x"])),
            ("scope", ("openid offline_access", "", 3, None)),
            ("id_token", ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", None, 1.5)),
        ):
            if rnd.random() < 0.6:
                value: Any = rnd.choice(values)
                payload[name] = value
                odd.append(name)
        if rnd.random() < 0.3:
            payload[_junk(rnd, 8, _B64)] = _json_value(rnd, 3)
        if rnd.random() < 0.05:
            payload["access_token"] = rnd.choice((None, 7, "", ["x"], {"a": 1}))
        status = rnd.choice((200,) * 12 + (201, 202, 203, 206, 299))
        body = json.dumps(payload, ensure_ascii=rnd.random() < 0.5).encode()
        token = access_token if payload["access_token"] == access_token else None
        return Answer(f"success ({len(odd)} odd fields)", status, [], body, False, "", token)

    def error(self, rnd: random.Random, secrets_: Secrets) -> Answer:
        status = rnd.choice(ERROR_STATUSES)
        roll = rnd.random()
        terminal: bool | None
        if roll < 0.35:
            code: Any = rnd.choice(TERMINAL_CODES)
            terminal, kind = True, "terminal error"
        elif roll < 0.6:
            code, terminal, kind = rnd.choice(OTHER_CODES), False, "other error"
        elif roll < 0.75:
            code, terminal, kind = rnd.choice(NEAR_MISSES), False, "near-miss code"
        elif roll < 0.85:
            code, terminal, kind = secrets_.any(rnd), False, "a secret as the code"
        else:
            code = rnd.choice((400, None, ["invalid_grant"], {"code": "invalid_grant"}, True))
            terminal, kind = False, "code of another type"
        payload: dict[str, Any] = {"error": code}
        for name in ("error_description", "error_uri", "hint"):
            if rnd.random() < 0.5:
                payload[name] = rnd.choice(
                    (
                        f"the token {secrets_.any(rnd)} is not acceptable",
                        secrets_.any(rnd),
                        _junk(rnd, rnd.randint(0, 300)),
                        "x" * rnd.choice((10, 1000, 20_000)),
                        7,
                        None,
                        ["a"],
                    )
                )
        body = json.dumps(payload, ensure_ascii=rnd.random() < 0.5).encode()
        variant = rnd.random()
        if variant < 0.05:  # the same key twice: parsers differ on which wins
            body = body[:-1] + b', "error": "invalid_request"}'
            terminal, kind = None, kind + ", duplicate key"
        elif variant < 0.1:
            body = json.dumps(payload).encode(rnd.choice(("utf-16", "utf-16-be", "utf-32")))
            terminal, kind = None, kind + ", UTF-16/32"
        elif variant < 0.13:
            body = b"\xef\xbb\xbf" + body
            terminal, kind = None, kind + ", BOM"
        elif variant < 0.16:  # nesting deeper than a parser's stack
            depth = rnd.choice((1_000, 100_000))
            body = body[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
            terminal, kind = None, kind + f", nested {depth} deep"
        elif variant < 0.19:
            body = body[:-1] + b', "n": ' + b"9" * rnd.choice((400, 5000)) + b"}"
            terminal, kind = None, kind + ", huge number"
        return Answer(kind, status, [(b"content-type", b"application/json")], body, terminal)

    def shape(self, rnd: random.Random, secrets_: Secrets) -> Answer:
        status = rnd.choice((200, 200, 400, 401, 500, 503, 302))
        bodies: list[tuple[str, bytes]] = [
            ("empty body", b""),
            ("whitespace", b" \r\n\t "),
            ("array", b'["invalid_grant"]'),
            ("string", b'"invalid_grant"'),
            ("number", b"400"),
            ("null", b"null"),
            ("true", b"true"),
            ("NaN", b"NaN"),
            ("html", b"<html><body>Bad Gateway</body></html>"),
            ("form-encoded", b"error=invalid_grant&error_description=x"),
            ("xml", b"<error>invalid_grant</error>"),
            ("truncated JSON", b'{"error": "invalid_gr'),
            ("random bytes", rnd.randbytes(rnd.randint(1, 300))),
            ("invalid UTF-8", b'{"error": "invalid_grant\xff\xfe"}'),
            ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
            ("4,300+ digits", b'{"access_token": "a", "expires_in": ' + b"9" * 4400 + b"}"),
            ("JSON of JSON", json.dumps(json.dumps({"error": "invalid_grant"})).encode()),
        ]
        kind, body = rnd.choice(bodies)
        return Answer(f"shape: {kind}", status, [], body, False)

    def oversized(self, rnd: random.Random, secrets_: Secrets) -> Answer:
        choice = rnd.randrange(3)
        if choice == 0:
            payload = {"error": "invalid_grant", "error_description": "x" * (LIMIT + 10)}
            body = json.dumps(payload).encode()
            return Answer("over the limit", 400, [], body, False)
        if choice == 1:
            bomb = gzip.compress(b"0" * (LIMIT * 16))
            headers = [(b"content-encoding", b"gzip")]
            return Answer("gzip bomb", 200, headers, bomb, False)
        big = {"access_token": "at_" + "a" * (LIMIT + 10)}
        return Answer("success over the limit", 200, [], json.dumps(big).encode(), False)

    # -- headers -----------------------------------------------------------------------------

    def _headers(self, rnd: random.Random, answer: Answer, secrets_: Secrets) -> None:
        retry_after = rnd.choice(
            (
                "3",
                "0",
                "-1",
                "1.5",
                "99999999999",
                "9" * 400,
                "²",
                "",
                "soon",
                "Wed, 21 Oct 2015 07:28:00 GMT",
                "Fri, 31 Dec 9999 23:59:59 GMT",
                "Mon, 99 Foo 2024 99:99:99 GMT",
                time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30)),
            )
        )
        answer.headers.append((b"retry-after", retry_after.encode()))
        roll = rnd.random()
        if roll < 0.3 and answer.body:
            encoding = rnd.choice(("gzip", "deflate", "identity", "gzip-lie", "x-custom"))
            if encoding == "gzip":
                answer.body = gzip.compress(answer.body)
            elif encoding == "deflate":
                answer.body = zlib.compress(answer.body)
            elif encoding == "gzip-lie":  # says gzip, is not: the body cannot be decoded
                encoding, answer.terminal = "gzip", False
            else:
                answer.terminal = None if answer.terminal else answer.terminal
            answer.headers.append((b"content-encoding", encoding.encode()))
            answer.kind += f", Content-Encoding {encoding}"
        elif roll < 0.5:
            value = rnd.choice((b"text/html", b"application/json; charset=utf-16", b"", b"*/*"))
            answer.headers.append((b"content-type", value))
        elif roll < 0.7:
            # No secrets here: httpcore logs response headers verbatim at DEBUG (not ours to
            # redact); the library reads only Retry-After, Content-Encoding and the body.
            junk = _junk(rnd, rnd.randint(0, 200), string.printable[:94] + " ").encode()
            challenge = b'Bearer error_description="' + junk.replace(b'"', b"") + b'"'
            answer.headers.append((b"www-authenticate", challenge))
            answer.headers.append((b"set-cookie", b"idp=" + junk.replace(b";", b"")))
        elif roll < 0.8:
            answer.headers += [(f"x-h{i}".encode(), b"v" * 50) for i in range(200)]


def _json_value(rnd: random.Random, depth: int) -> Any:
    roll = rnd.randrange(8 if depth > 0 else 6)
    if roll == 0:
        return None
    if roll == 1:
        return rnd.random() < 0.5
    if roll == 2:
        return rnd.choice((0, -1, 2**63, 10**30, 1.5, 1e308))
    if roll == 3:
        return _junk(rnd, rnd.randint(0, 30))
    if roll == 4:
        return "".join(chr(rnd.randint(0x80, 0xD7FF)) for _ in range(rnd.randint(0, 10)))
    if roll == 5:
        return ""
    if roll == 6:
        return [_json_value(rnd, depth - 1) for _ in range(rnd.randint(0, 3))]
    return {_junk(rnd, 5, _B64): _json_value(rnd, depth - 1) for _ in range(rnd.randint(0, 3))}


def mock_response(answer: Answer) -> httpx.Response:
    """The answer in process; a dying or stalling provider is what httpx raises for one."""
    if answer.fault == "die-before":
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
    if answer.fault == "die-mid-body":
        raise httpx.ReadError("connection reset")
    if answer.fault == "slow":
        raise httpx.ReadTimeout("timed out")
    return httpx.Response(answer.status, headers=answer.headers, content=answer.body)


class Provider:
    """The fuzzed token endpoint: each refresh token presented gets its scripted answer."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}

    def answer_for(self, body: bytes) -> Answer | None:
        form = parse_qs(body.decode("latin-1"))
        return self.answers.get(form.get("refresh_token", [""])[0])

    def handle(self, request: httpx.Request) -> httpx.Response:
        answer = self.answer_for(request.content)
        if answer is None:
            return httpx.Response(200)  # revocation
        return mock_response(answer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The same endpoint as an ASGI app, for uvicorn on loopback."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = self.answer_for(body) or Answer("revocation", 200, [], b"", False)
        if answer.fault == "die-before":
            raise RuntimeError("the fuzzed provider dies before answering")
        if answer.fault == "slow":
            await asyncio.sleep(SOCKET_TIMEOUT * 2)
        headers = list(answer.headers)
        length = len(answer.body) + (100 if answer.fault == "die-mid-body" else 0)
        headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        if answer.fault == "die-mid-body":
            half = answer.body[: len(answer.body) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            raise RuntimeError("the fuzzed provider dies mid-body")
        await send({"type": "http.response.body", "body": answer.body})


# The client's timeout against the provider on loopback. A timeout is a defined outcome
# whatever the answer would have been (nobody knows it), so a slow machine changes no verdict.
SOCKET_TIMEOUT = 0.5


class ProviderRig:
    """Part b in one mode: ``refresher`` (the answer to ``Refresher.ensure_fresh``),
    ``middleware`` (the answer through the app, the provider in process) or ``socket`` (the
    same, the provider on a real loopback socket)."""

    def __init__(self, mode: Mode, provider: Provider, base_url: str | None = None) -> None:
        self.mode = mode
        self.clock = FakeClock()
        self.provider = provider
        self.scanner = Scanner()
        self.captured = capture_telemetry()
        transport = None if mode == "socket" else httpx.MockTransport(self.provider.handle)
        options: dict[str, Any] = {"max_response_bytes": LIMIT}
        if mode == "socket":
            options["timeout"] = SOCKET_TIMEOUT
        client = oauth_client(transport, self.clock, self.captured, base_url or ISSUER, **options)
        self.refresher = Refresher(client, jitter=0.0)
        self.store = MemorySessionStore(clock=self.clock)
        self.app = app_for(self.store, self.refresher, self.scanner)
        self.fuzzer = AnswerFuzzer(faults=mode == "socket")

    async def check(self, answer: Answer, refresh_token: str, tally: Tally) -> None:
        """Send one request presenting ``refresh_token``, answered with ``answer``; judge the
        outcome."""
        tally.inputs += 1
        self.provider.answers[refresh_token] = answer
        token_set = expired_token_set(self.clock, refresh_token)
        what = f"{answer.kind} (HTTP {answer.status}, {len(answer.body)} bytes)"
        try:
            if self.mode == "refresher":
                outcome = await self._refresher(token_set, answer, tally, what)
            else:
                outcome = await self._middleware(token_set, answer, tally, what)
        finally:
            del self.provider.answers[refresh_token]
        tally.answers[outcome] += 1
        if outcome == "terminal" and answer.terminal is False:
            tally.count("lost", f"{what} ended the session")
        elif outcome not in ("terminal", "timeout") and answer.terminal is True:
            tally.count("undefined", f"{what}: a terminal error answered as {outcome}")

    async def _refresher(self, token_set: TokenSet, answer: Answer, tally: Tally, what: str) -> str:
        try:
            new = await self.refresher.ensure_fresh(token_set)
        except ReauthenticationRequired as exc:
            self.scanner.exception("ReauthenticationRequired", exc)
            return "terminal"
        except RefreshUnavailable as exc:
            self.scanner.exception("RefreshUnavailable", exc)
            if not 0 <= exc.retry_after <= 120:
                tally.count("undefined", f"{what}: retry_after {exc.retry_after}")
            return "timeout" if exc.reason == "timeout" else "unavailable"
        except Exception as exc:  # anything else is an undefined outcome: a 500 in an app
            self.scanner.exception("an undefined outcome", exc)
            tally.count("server_errors", f"{what} -> {type(exc).__name__}: {exc}")
            return "exception"
        if new.access_token != answer.access_token:
            tally.count("undefined", f"{what}: a token set that the provider did not send")
        return "token set"

    async def _middleware(
        self, token_set: TokenSet, answer: Answer, tally: Tally, what: str
    ) -> str:
        _, headers = await self.store.save({}, None, token_set, new_session=True)
        browser = Browser("user")
        browser.absorb(Reply(200, [(b"set-cookie", h.encode()) for h in headers], b""))
        reply = await call(self.app, "GET", "/api", browser.cookies())
        if reply.status != 200:
            self.scanner.reply(answer.kind, reply)
        kept = await self.store.load(browser.jar)
        if reply.status == 200:
            if reply.token() != answer.access_token or kept is None:
                tally.count("undefined", f"{what} -> 200 with a token it did not send")
            return "token set"
        if reply.status == 401:
            return "terminal"
        if reply.status == 503 and reply.retry_after_ok():
            if kept is None or kept.token_set != token_set:
                tally.count("lost", f"{what} -> 503, the session not kept")
            return "timeout" if b'"reason": "timeout"' in reply.body else "unavailable"
        if reply.status >= 500:
            if reply.error:
                self.scanner.text("log: traceback of a 500", reply.error)
            tally.count("server_errors", f"{what} -> {reply.status} {_last_line(reply.error)}")
            return "500"
        tally.count("undefined", f"{what} -> {reply.status} {reply.body[:80]!r}")
        return str(reply.status)

    async def close(self) -> None:
        await self.refresher.client.aclose()
        self.scanner.telemetry(self.captured)
        self.captured.shutdown()


async def provider_fuzz(mode: Mode, count: int, rnd: random.Random) -> tuple[Tally, Scanner]:
    """Part b in one mode: ``count`` fuzzed answers, each to a session of its own."""
    where = {"refresher": "Refresher, in process", "middleware": "middleware, in process",
             "socket": "middleware, loopback socket"}[mode]  # fmt: skip
    tally = Tally("b", f"provider fuzz, {where}")
    provider = Provider()
    with contextlib.ExitStack() as stack:
        base_url = stack.enter_context(serve(provider)) if mode == "socket" else None
        rig = ProviderRig(mode, provider, base_url)
        with rig.scanner.logs():
            try:
                for _ in range(count):
                    refresh_token = "rt_" + secrets.token_urlsafe(32)
                    answer = rig.fuzzer.answer(rnd, Secrets(refresh_token))
                    await rig.check(answer, refresh_token, tally)
            finally:
                await rig.close()
    rig.scanner.into(tally)
    return tally, rig.scanner


# -- c. the Redis fault matrix ----------------------------------------------------------------


@dataclass
class DurableRedis(RedisServer):
    """A :class:`RedisServer` that keeps its data across :meth:`stop` and :meth:`start`, as a
    Redis holding sessions runs in production: an append-only file, fsynced before each reply.
    Without it "nothing is lost once Redis is back" could not hold for anyone."""

    def kill(self) -> None:
        kill(self.process)

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


@contextlib.contextmanager
def durable_redis() -> Iterator[DurableRedis]:
    with tempfile.TemporaryDirectory(prefix="atr-redis-") as directory:
        port = free_port()
        options = (
            *("--appendonly", "yes", "--appendfsync", "always", "--dir", directory),
            *("--busy-reply-threshold", "50"),  # a script over 50 ms: -BUSY to the others
        )
        log = Path(directory) / "redis.log"
        server = DurableRedis(port, spawn_redis(port, options, log), options, log)
        try:
            yield server
        finally:
            with contextlib.suppress(ProcessLookupError):
                server.thaw()  # a frozen server ignores SIGTERM
            server.stop()


# A script that keeps Redis busy for 1.5 s: every other client gets -BUSY meanwhile.
BUSY_SCRIPT = (
    "local t = redis.call('TIME') while true do local n = redis.call('TIME') "
    "if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 1500000 then break end end return 1"
)


@dataclass(frozen=True)
class RedisFault:
    """One row of the matrix: what is done to Redis mid-traffic, and how it is undone.

    ``victims``: the fault corrupts the data of that many fresh sessions (theirs may end, no
    other may). Traffic runs ``before`` the fault, during it, and ``after`` it is undone;
    every session is then verified ``later`` seconds after (fake time: 0, while the grace
    cache still holds what could not be written; more, when users come back later).
    """

    name: str
    inject: Callable[[DurableRedis, list[bytes]], None]
    recover: Callable[[DurableRedis], None] = lambda server: None
    victims: int = 0
    before: bool = True
    after: bool = True
    later: float = 0.0
    expire: bool = True  # the row starts with every access token due: the traffic refreshes
    routes: tuple[str, ...] = ("/api", "/api", "/api", "/whoami")
    routes_after: tuple[str, ...] | None = None  # after recovery, if not ``routes``
    known: str | None = None  # a known bug this row shows (reported, not a failed run)


def _stop(server: DurableRedis, keys: list[bytes]) -> None:
    server.stop()


def _kill(server: DurableRedis, keys: list[bytes]) -> None:
    server.kill()


def _freeze(server: DurableRedis, keys: list[bytes]) -> None:
    server.freeze()


def _restart(server: DurableRedis) -> None:
    server.start()


def _thaw(server: DurableRedis) -> None:
    server.thaw()


def _drop_connections(server: DurableRedis, keys: list[bytes]) -> None:
    server.cli("CLIENT", "KILL", "TYPE", "normal")


def _busy(server: DurableRedis, keys: list[bytes]) -> None:
    server.cli("EVAL", BUSY_SCRIPT, "0")  # returns when the script ends


def _refuse_writes(server: DurableRedis, keys: list[bytes]) -> None:
    server.cli("CONFIG", "SET", "maxmemory", "1")  # every write: -OOM; reads work


def _accept_writes(server: DurableRedis) -> None:
    server.cli("CONFIG", "SET", "maxmemory", "0")


def _wrong_type(server: DurableRedis, keys: list[bytes]) -> None:
    with contextlib.closing(redis.Redis.from_url(server.url)) as raw:
        for i, key in enumerate(keys):
            raw.delete(key)
            kind = i % 5
            if kind == 0:
                raw.set(key, "a string")
            elif kind == 1:
                raw.rpush(key, "a", "list")
            elif kind == 2:
                raw.sadd(key, "a set")
            elif kind == 3:
                raw.zadd(key, {"a sorted set": 1})
            else:
                raw.xadd(key, {"a": "stream"})


def _garbage(server: DurableRedis, keys: list[bytes]) -> None:
    with contextlib.closing(redis.Redis.from_url(server.url)) as raw:
        for i, key in enumerate(keys):
            stored = raw.hget(key, "token_set")
            sealed = stored if isinstance(stored, bytes) else b""
            values = (
                ("token_set", os.urandom(40)),
                ("token_set", b""),
                ("token_set", b'{"access_token": "x", "expires_at": 1, "issued_at": 0}'),
                ("token_set", sealed[:-3]),
                ("token_set", sealed + b"x"),
                ("generation", b"not a number"),
                ("generation", b"-inf"),
            )
            field_, value = values[i % len(values)]
            raw.hset(key, field_, value)


def _swapped(server: DurableRedis, keys: list[bytes]) -> None:
    """Each victim's key gets the next victim's sealed value: never the other's tokens."""
    with contextlib.closing(redis.Redis.from_url(server.url)) as raw:
        values = [raw.hget(key, "token_set") or b"" for key in keys]
        for key, value in zip(keys, values[1:] + values[:1], strict=True):
            raw.hset(key, "token_set", value)


REDIS_FAULTS = (
    RedisFault("stopped (SIGTERM), restarted", _stop, _restart),
    RedisFault("killed (SIGKILL), restarted", _kill, _restart),
    RedisFault("frozen (SIGSTOP), thawed (SIGCONT)", _freeze, _thaw),
    RedisFault("connections dropped (CLIENT KILL)", _drop_connections),
    RedisFault("busy: a 1.5 s script (BUSY)", _busy),
    RedisFault("writes refused (maxmemory: OOM)", _refuse_writes, _accept_writes),
    RedisFault("keys of the wrong type", _wrong_type, victims=5),
    RedisFault("garbage values", _garbage, victims=7),
    RedisFault("another session's value", _swapped, victims=4),
    RedisFault(
        "writes refused while sessions refresh; users back after the grace window",
        _refuse_writes,
        _accept_writes,
        before=False,
        after=False,
        later=GRACE_TTL + 1,
    ),
    RedisFault(
        "writes refused during forced refreshes (renew); users back at once on fresh tokens",
        _refuse_writes,
        _accept_writes,
        before=False,
        later=EXPIRED,
        expire=False,
        routes=("/renew",),
        routes_after=("/api",),
    ),
)


class MatrixRig:
    """The app on a RedisSessionStore over a DurableRedis, browsers, and traffic."""

    def __init__(self, server: DurableRedis, rnd: random.Random) -> None:
        self.server = server
        self.rnd = rnd
        self.clock = FakeClock()
        self.idp = FakeIdP(issuer=ISSUER, clock=self.clock, clients={"app": CLIENT_SECRET})
        self.owners = Owners()
        self.tap = Tap(self.idp.transport(), self.owners, rnd, self.clock)
        self.captured = capture_telemetry()
        self.scanner = Scanner()
        client = oauth_client(self.tap, self.clock, self.captured)
        self.refresher = Refresher(client, jitter=0.0)
        self.store = RedisSessionStore(
            server.url, secret_keys=[SESSION_KEY], prefix="atr-matrix", timeout=1.0
        )
        self.app = app_for(self.store, self.refresher, self.scanner, self.idp, self.owners)
        self.browsers: list[Browser] = []
        self.answered = 0
        self._progress = asyncio.Condition()
        self.slowest_503 = 0.0
        self.revoked = 0  # grants the FakeIdP revoked for reuse, so far
        self.flowing = False  # traffic is running

    async def login(self, browser: Browser, tally: Tally) -> None:
        reply = await call(self.app, "POST", "/login", browser.cookies(), f"user={browser.user}")
        tally.inputs += 1
        self.judge(browser, reply, tally, "/login")
        if reply.status == 200:
            browser.absorb(reply)
            browser.logged_in, browser.may_end = True, False

    def judge(self, browser: Browser, reply: Reply, tally: Tally, route: str) -> None:
        """The contract: 200 with the browser's own token (or none where none is due), 401
        only when the session may end, 503 with Retry-After; never a 500."""
        tally.answers[str(reply.status)] += 1
        what = f"{browser.user} {route}"
        if reply.status != 200:
            self.scanner.reply(route, reply)
        if reply.error is not None or reply.status == 500:
            if reply.error:
                self.scanner.text("log: traceback of a 500", reply.error)
            tally.count("server_errors", f"{what} -> {reply.status} {_last_line(reply.error)}")
        elif reply.status == 200:
            token = reply.token()
            if token is None and route != "/whoami":
                tally.count("undefined", f"{what} -> 200 without a token")
            elif token is None and browser.logged_in and not browser.may_end:
                tally.count("lost", f"{what} -> 200, no session")  # the session went unseen
            elif token is not None and self.owners.of.get(token) != browser.user:
                tally.count("leaks", f"{what} -> {self.owners.of.get(token)}'s token")
        elif reply.status == 401:
            if browser.logged_in and not browser.may_end:
                tally.count("lost", f"{what} -> 401 {reply.body[:80]!r}")
            browser.logged_in = False
        elif reply.status == 503:
            if not reply.retry_after_ok():
                tally.count("undefined", f"{what} -> 503 without Retry-After")
        else:
            tally.count("undefined", f"{what} -> {reply.status} {reply.body[:80]!r}")
        if reply.status not in (503, 500):
            browser.absorb(reply)

    async def request(self, browser: Browser, routes: Sequence[str], tally: Tally) -> None:
        """One request of a browser no other task is using, to one of ``routes``; a few are
        cancelled midway, like a client that went away."""
        route = self.rnd.choice(routes)
        task = asyncio.ensure_future(call(self.app, "GET", route, browser.cookies()))
        tally.inputs += 1
        started = time.perf_counter()
        if self.rnd.random() < 0.05:
            for _ in range(self.rnd.randint(1, 30)):
                await asyncio.sleep(0)
            if task.cancel():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                tally.answers["cancelled"] += 1
                return
        reply = await task
        if reply.status == 503:
            self.slowest_503 = max(self.slowest_503, time.perf_counter() - started)
        self.judge(browser, reply, tally, route)

    async def traffic(
        self, done: asyncio.Event, routes: Sequence[str], tally: Tally, workers: int = 8
    ) -> None:
        async def worker() -> None:
            while not done.is_set():
                idle = [b for b in self.browsers if b.logged_in and not b.busy]
                if not idle:
                    if not any(b.logged_in for b in self.browsers):
                        return  # every session is gone: nothing left to send
                    await asyncio.sleep(0.001)
                    continue
                browser = self.rnd.choice(idle)
                browser.busy = True
                try:
                    await self.request(browser, routes, tally)
                finally:
                    browser.busy = False
                async with self._progress:
                    self.answered += 1
                    self._progress.notify_all()

        try:
            await asyncio.gather(*(worker() for _ in range(workers)))
        finally:
            async with self._progress:
                self.flowing = False
                self._progress.notify_all()

    def start_traffic(
        self, routes: Sequence[str], tally: Tally
    ) -> tuple[asyncio.Event, asyncio.Future[None]]:
        """Traffic until the returned event is set; the task that runs it."""
        done = asyncio.Event()
        self.flowing = True
        return done, asyncio.ensure_future(self.traffic(done, routes, tally))

    async def until_answered(self, more: int, traffic: asyncio.Future[None]) -> None:
        """Until ``more`` requests have been answered (or the traffic failed)."""
        async with self._progress:
            target = self.answered + more
            await self._progress.wait_for(lambda: self.answered >= target or not self.flowing)
        if not self.flowing:
            await traffic  # its exception, if it failed

    async def verify(self, tally: Tally) -> None:
        """Every session that should exist answers 200 with its own token. Redis is back, but
        each pooled connection may still fail once: a 503 is asked again (bounded)."""
        for browser in self.browsers:
            if not browser.logged_in:
                continue
            for _ in range(100):
                reply = await call(self.app, "GET", "/api", browser.cookies())
                if reply.status != 503:
                    break
            tally.inputs += 1
            self.judge(browser, reply, tally, "/api after recovery")
            if reply.status == 503:
                tally.count("lost", f"{browser.user}: still 503 once Redis is back")

    async def session_keys(self) -> set[bytes]:
        with contextlib.closing(redis.Redis.from_url(self.server.url)) as raw:
            return set(raw.scan_iter(match="atr-matrix:session:*"))

    async def close(self) -> None:
        self.scanner.telemetry(self.captured)
        self.captured.shutdown()
        await self.store.aclose()
        await self.refresher.client.aclose()


async def redis_fault_matrix(
    sessions: int, phase: int, rnd: random.Random, faults: Sequence[RedisFault] = REDIS_FAULTS
) -> tuple[list[Tally], Scanner]:
    """Part c: every fault mid-traffic on one durable redis-server, in turn. ``phase``
    requests are answered before the fault, while it lasts, and after it is undone; then
    every session is verified."""
    tallies: list[Tally] = []
    with durable_redis() as server:
        rig = MatrixRig(server, rnd)
        setup = Tally("c", "setup")
        with rig.scanner.logs():
            try:
                for i in range(sessions):
                    rig.browsers.append(Browser(f"user{i:03d}"))
                    await rig.login(rig.browsers[-1], setup)
                check(setup.clean, setup.summary())
                for number, fault in enumerate(faults):
                    logger.info("Redis fault matrix: %s", fault.name)
                    tally = Tally("c", f"Redis: {fault.name}", known=fault.known)
                    tallies.append(tally)
                    await _fault_row(rig, fault, phase, tally, number)
            finally:
                await rig.close()
    rig.scanner.into(tallies[-1] if tallies else setup)
    return tallies, rig.scanner


async def _fault_row(
    rig: MatrixRig, fault: RedisFault, phase: int, tally: Tally, number: int
) -> None:
    victims: list[Browser] = []
    keys: list[bytes] = []
    for i in range(fault.victims):  # fresh sessions, one at a time: their keys are known
        before = await rig.session_keys()
        victim = Browser(f"victim{number}-{i}")
        await rig.login(victim, tally)
        [key] = await rig.session_keys() - before
        victims.append(victim)
        keys.append(key)
    rig.browsers += victims
    if fault.expire:
        rig.clock.advance(EXPIRED)  # the row's first requests refresh
    if not fault.before:
        await asyncio.to_thread(fault.inject, rig.server, keys)
    done, traffic = rig.start_traffic(fault.routes, tally)
    try:
        if fault.before:
            await rig.until_answered(phase, traffic)
            for victim in victims:
                victim.may_end = True
            await asyncio.to_thread(fault.inject, rig.server, keys)
        await rig.until_answered(phase, traffic)
        if fault.routes_after is not None or not fault.after:
            done.set()
            await traffic
        await asyncio.to_thread(fault.recover, rig.server)
        if fault.after:
            if fault.routes_after is not None:
                done, traffic = rig.start_traffic(fault.routes_after, tally)
            await rig.until_answered(phase, traffic)
    finally:
        done.set()
        await traffic
    if rig.slowest_503:
        tally.notes.append(f"slowest 503: {rig.slowest_503:.2f} s, RedisSessionStore(timeout=1.0)")
        rig.slowest_503 = 0.0
    rig.clock.advance(fault.later)
    await rig.verify(tally)
    revoked = rig.idp.token_calls("refresh_token", "reuse_revoked") - rig.revoked
    if revoked:  # the strict provider saw a spent refresh token again
        tally.problem("lost", f"{revoked} grants revoked for reuse of a refresh token")
        rig.revoked += revoked
    for victim in victims:  # whatever happened to them, they can log in again
        await rig.login(victim, tally)
        if not victim.logged_in:
            tally.count("lost", f"{victim.user} cannot log in again")
    rig.browsers = [b for b in rig.browsers if b not in victims]
    for browser in rig.browsers:  # whoever lost a session logs in again, for the next row
        if not browser.logged_in:
            await rig.login(browser, tally)


# -- d. randomized interleaving -----------------------------------------------------------------


class Interleaving:
    """Browsers doing random things in rounds, concurrently; the fake clock moves between
    rounds (no request is in flight when time jumps, as in life)."""

    def __init__(
        self, kind: StoreKind, sessions: int, rnd: random.Random, redis_url: str | None
    ) -> None:
        self.kind = kind
        self.rnd = rnd
        self.clock = FakeClock()
        # Strict: rotation, and a reused refresh token revokes the grant.
        self.idp = FakeIdP(issuer=ISSUER, clock=self.clock, clients={"app": CLIENT_SECRET})
        self.owners = Owners()
        self.tap = Tap(self.idp.transport(), self.owners, rnd, self.clock)
        self.captured = capture_telemetry()
        self.scanner = Scanner()
        client = oauth_client(self.tap, self.clock, self.captured)
        self.refresher = Refresher(client)  # default skew, jitter and grace
        self.redis_url = redis_url
        self.store = make_store(kind, self.clock, redis_url)
        self.app = app_for(self.store, self.refresher, self.scanner, self.idp, self.owners)
        self.browsers = [Browser(f"user{i:04d}") for i in range(sessions)]
        # Cancelling a request that refreshed loses its Set-Cookie: with the cookie store the
        # browser keeps the spent refresh token, which the grace cache covers only for a
        # minute (the README says so). Server-side stores persist without the response.
        self.cancel_rate = 0.0 if kind == "cookie" else 0.05

    async def send(self, browser: Browser, method: str, route: str, tally: Tally) -> Reply | None:
        tally.inputs += 1
        query = f"user={browser.user}" if route == "/login" else ""
        coroutine = call(self.app, method, route, browser.cookies(), query)
        if route not in ("/login", "/logout") and self.rnd.random() < self.cancel_rate:
            task = asyncio.ensure_future(coroutine)
            for _ in range(self.rnd.randint(1, 40)):
                await asyncio.sleep(0)
            if task.cancel():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                tally.answers["cancelled"] += 1
                return None
            return await task
        return await coroutine

    def judge(self, browser: Browser, route: str, reply: Reply, tally: Tally) -> None:
        tally.answers[f"{route} {reply.status}"] += 1
        what = f"{browser.user} {route}"
        if reply.status != 200:
            self.scanner.reply(route, reply)
        if reply.error is not None or reply.status == 500:
            if reply.error:
                self.scanner.text("log: traceback of a 500", reply.error)
            tally.count("server_errors", f"{what} -> {_last_line(reply.error)}")
        elif reply.status == 200:
            token = reply.token()
            scripted = browser.user in self.tap.refused
            if token is not None and self.owners.of.get(token) != browser.user:
                tally.count("leaks", f"{what} -> {self.owners.of.get(token)}'s token")
            if token is None and route in ("/api", "/renew"):
                tally.count("undefined", f"{what} -> 200 without a token")
            elif token is None and route == "/whoami" and browser.logged_in and not scripted:
                tally.count("lost", f"{what} -> 200, no session")  # the session went unseen
        elif reply.status == 401:
            scripted = browser.user in self.tap.refused
            if browser.logged_in and not scripted:
                tally.count("lost", f"{what} -> 401 {reply.body[:80]!r}")
            browser.logged_in = False
        elif reply.status == 503:
            if not reply.retry_after_ok():
                tally.count("undefined", f"{what} -> 503 without Retry-After")
        else:
            tally.count("undefined", f"{what} -> {reply.status}")

    async def burst(self, browser: Browser, tally: Tally) -> None:
        """One browser's turn: a login, concurrent tabs, a logout, or a scripted provider
        error for its next refresh."""
        rnd = self.rnd
        if not browser.logged_in:
            if rnd.random() < 0.85:
                await self._exclusive(browser, "POST", "/login", tally)
            else:
                await self._tabs(browser, ["/api", "/whoami"], tally)
            return
        roll = rnd.random()
        if roll < 0.04:
            await self._exclusive(browser, "POST", "/logout", tally)
        elif roll < 0.07:
            await self._exclusive(browser, "POST", "/login", tally)  # again: a new session
        elif roll < 0.10:
            self.tap.doomed.add(browser.user)  # its next refresh: invalid_grant
        elif roll < 0.13:
            self.tap.troubled.add(browser.user)  # its next refresh: 503, 429 or 500
        elif roll < 0.85:
            routes = rnd.choices(("/api", "/renew", "/whoami"), (7, 2, 1), k=rnd.randint(1, 4))
            await self._tabs(browser, routes, tally)

    async def _exclusive(self, browser: Browser, method: str, route: str, tally: Tally) -> None:
        reply = await self.send(browser, method, route, tally)
        assert reply is not None
        self.judge(browser, route, reply, tally)
        if reply.status == 200:
            browser.absorb(reply)
            if route == "/login":
                browser.logged_in = True
                self.tap.refused.discard(browser.user)
                self.tap.doomed.discard(browser.user)
            elif route == "/logout":
                browser.logged_in = False

    async def _tabs(self, browser: Browser, routes: Sequence[str], tally: Tally) -> None:
        """Several requests at once with the same cookies, as tabs send them, some a little
        later than others (stragglers that arrive after a refresh landed)."""

        async def tab(route: str) -> Reply | None:
            for _ in range(self.rnd.choice((0, 0, 1, 5, 20, 60))):
                await asyncio.sleep(0)
            return await self.send(browser, "GET", route, tally)

        replies = await asyncio.gather(*(tab(route) for route in routes))
        for route, reply in zip(routes, replies, strict=True):
            if reply is not None:
                self.judge(browser, route, reply, tally)
                if reply.status not in (500, 503):
                    browser.absorb(reply)

    async def run(self, rounds: int, tally: Tally) -> None:
        for _ in range(rounds):
            await asyncio.gather(*(self.burst(b, tally) for b in self.browsers))
            self.clock.advance(self.rnd.choice((0, 5, 30, 90, 250, 301, 400, 1000)))
        self.clock.advance(EXPIRED)
        self.cancel_rate = 0.0
        unavailable = []
        for browser in self.browsers:  # every session left is there, and refreshes
            if browser.logged_in:
                reply = await self.send(browser, "GET", "/api", tally)
                assert reply is not None
                self.judge(browser, "/api (final)", reply, tally)
                if reply.status == 503:
                    unavailable.append(browser)
        self.tap.troubled.clear()
        self.clock.advance(10)  # past any Retry-After the provider asked for
        for browser in unavailable:  # the provider is fine again: so is the session
            reply = await self.send(browser, "GET", "/api", tally)
            assert reply is not None
            self.judge(browser, "/api (final, again)", reply, tally)
            if reply.status != 200 and browser.logged_in:
                tally.count("lost", f"{browser.user} /api (final, again) -> {reply.status}")
        revoked = self.idp.token_calls("refresh_token", "reuse_revoked")
        if revoked:  # the strict provider saw a spent refresh token again: a session killed
            tally.count("lost", f"{revoked} grants revoked for reuse")
        tally.notes.append(
            f"{self.tap.calls} token calls, {len(self.tap.refused)} sessions ended by script"
        )

    async def close(self) -> None:
        self.scanner.telemetry(self.captured)
        self.captured.shutdown()
        await close_store(self.store, self.redis_url)


async def interleaving(
    kind: StoreKind, sessions: int, rounds: int, rnd: random.Random, redis_url: str | None = None
) -> tuple[Tally, Scanner]:
    """Part d for one store."""
    tally = Tally("d", f"interleaving, {STORE_NAMES[kind]}")
    run = Interleaving(kind, sessions, rnd, redis_url)
    with run.scanner.logs():
        try:
            await run.run(rounds, tally)
        finally:
            await run.close()
    run.scanner.into(tally)
    return tally, run.scanner


# -- f. negative-cache memory -------------------------------------------------------------------


@dataclass
class Memory:
    entries: int
    traced_per_entry: float  # bytes, tracemalloc
    rss_per_entry: float  # bytes, VmRSS growth
    exceptions_kept: int  # exception objects alive after filling, beyond those before
    provider_calls_on_replay: int  # asking again for every dead session: served from the cache


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _exceptions() -> int:
    return sum(isinstance(o, BaseException) for o in gc.get_objects())


async def negative_cache_memory(entries: int) -> Memory:
    """Part f: ``entries`` dead sessions (a refresh token the FakeIdP does not know:
    ``invalid_grant``) fill the refresher's remembered refusals; the memory they keep. Filled
    twice: once for RSS, once under tracemalloc (which inflates RSS with its own records)."""
    clock = FakeClock()
    idp = FakeIdP(issuer=ISSUER, clock=clock, clients={"app": CLIENT_SECRET})
    client = common.client(idp.transport(), clock)
    refresher = Refresher(client, jitter=0.0, max_entries=2 * entries + 1_000)

    def dead(n: int) -> list[TokenSet]:
        return [expired_token_set(clock, "rt_" + secrets.token_urlsafe(32)) for _ in range(n)]

    async def fill(token_sets: Sequence[TokenSet]) -> None:
        for token_set in token_sets:
            with contextlib.suppress(ReauthenticationRequired):
                await refresher.ensure_fresh(token_set)

    await fill(dead(500))  # warm: pools, parameter keys, first-use structures
    for_rss, traced_sessions = dead(entries), dead(entries)
    gc.collect()
    exceptions, rss = _exceptions(), _rss()
    await fill(for_rss)
    gc.collect()
    rss, exceptions = _rss() - rss, _exceptions() - exceptions
    tracemalloc.start()
    try:
        traced = tracemalloc.get_traced_memory()[0]
        await fill(traced_sessions)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - traced
    finally:
        tracemalloc.stop()
    calls = idp.token_calls("refresh_token")
    await fill(for_rss + traced_sessions)  # every one is remembered: no provider call
    replay = idp.token_calls("refresh_token") - calls
    await client.aclose()
    return Memory(entries, traced / entries, rss / entries, exceptions, replay)


# -- the report -------------------------------------------------------------------------------


def _n(value: int) -> str:
    return f"{value:,}"


@dataclass
class Results:
    tallies: list[Tally] = field(default_factory=list)
    scanners: list[tuple[str, Scanner]] = field(default_factory=list)
    memory: Memory | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        memory_ok = self.memory is None or (
            self.memory.traced_per_entry <= 1024
            and self.memory.exceptions_kept <= 0
            and self.memory.provider_calls_on_replay == 0
        )
        return all(t.clean for t in self.tallies if not t.known) and memory_ok


def report(run: common.Run, sizes: Sizes, results: Results, seed: int) -> str:
    lines = run.environment(
        ["httpx", "starlette", "redis", "uvicorn", "hypothesis"],
        f"a: {_n(sizes.cookies)} cookies per store; b: {_n(sizes.answers)} answers per mode; "
        f"c: {sizes.matrix_sessions} sessions, {sizes.matrix_requests} requests per phase; "
        f"d: {sizes.sessions} sessions x {sizes.rounds} rounds per store; "
        f"f: {_n(sizes.dead)} dead sessions; seed {seed}",
    )
    lines += ["", *table("part", "inputs tried", "500s", "lost sessions", "leaks", "other")]
    known = list(dict.fromkeys(t.known for t in results.tallies if t.known))
    for t in results.tallies:
        mark = f" (known bug {known.index(t.known) + 1})" if t.known else ""
        lines.append(
            row(
                f"{t.part}. {t.what}{mark}",
                _n(t.inputs),
                t.server_errors,
                t.lost,
                t.leaks,
                t.undefined if t.undefined else "",
            )
        )
    scanned = sum(s.items for _, s in results.scanners)
    leaked = sum(s.leaks for _, s in results.scanners)
    lines.append(
        row("e. secrets scan of all the above", f"{_n(scanned)} items", "", "", leaked, "")
    )
    for number, bug in enumerate(known, start=1):
        lines += ["", f"Known bug {number}: {bug}. An xfail(strict) test pins it."]
    memory = results.memory
    if memory is not None:
        lines += [
            "",
            *table("f. negative cache", "measured", "target"),
            row("dead sessions, per fill", _n(memory.entries), ""),
            row(
                "bytes per entry (tracemalloc)",
                f"{memory.traced_per_entry:.0f} B",
                f"≤ 1,024 B {common.verdict(memory.traced_per_entry <= 1024)}",
            ),
            row("bytes per entry (RSS growth)", f"{memory.rss_per_entry:.0f} B", ""),
            row("exception objects kept", memory.exceptions_kept, "0"),
            row(
                "provider calls when every dead session asks again",
                memory.provider_calls_on_replay,
                "0",
            ),
        ]
    lines += ["", "What the parts answered (status or outcome: count):", ""]
    for t in results.tallies:
        answers = ", ".join(f"{k}: {_n(v)}" for k, v in sorted(t.answers.items()))
        notes = "; ".join(dict.fromkeys(t.notes))
        lines.append(f"- {t.part}. {t.what}: {answers}" + (f" ({notes})" if notes else ""))
    emitted = Counter[str]()
    for _, scanner in results.scanners:
        emitted.update(scanner.kinds)
    lines.append("- e. scanned: " + ", ".join(f"{k} {_n(v)}" for k, v in sorted(emitted.items())))
    problems = [f"- {t.part}. {t.what}: {p}" for t in results.tallies for p in t.problems[:3]]
    if problems:
        lines += ["", "Problems found (the first three of each part):", "", *problems]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in results.seconds.items())
    lines += ["", f"Wall time per part: {timing}."]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------


async def run_parts(parts: str, sizes: Sizes, seed: int, redis_url: str | None) -> Results:
    results = Results()

    async def timed(name: str, step: Awaitable[Any]) -> Any:
        logger.info("part %s", name)
        started = time.perf_counter()
        try:
            return await step
        finally:
            results.seconds[name] = results.seconds.get(name, 0.0) + time.perf_counter() - started

    def take(tally_scanner: tuple[Tally, Scanner]) -> None:
        tally, scanner = tally_scanner
        results.tallies.append(tally)
        results.scanners.append((tally.what, scanner))

    if "f" in parts:  # first: in a heap that no other part has grown, RSS growth means something
        results.memory = await timed("f", negative_cache_memory(sizes.dead))
    if "a" in parts:
        for kind in STORES:
            rnd = random.Random(f"{seed}-a-{kind}")
            take(await timed("a", cookie_fuzz(kind, sizes.cookies, rnd, redis_url)))
    if "b" in parts:
        for mode in MODES:
            rnd = random.Random(f"{seed}-b-{mode}")
            take(await timed("b", provider_fuzz(mode, sizes.answers, rnd)))
    if "c" in parts:
        rnd = random.Random(f"{seed}-c")
        tallies, scanner = await timed(
            "c", redis_fault_matrix(sizes.matrix_sessions, sizes.matrix_requests, rnd)
        )
        results.tallies += tallies
        results.scanners.append(("Redis fault matrix", scanner))
    if "d" in parts:
        for kind in STORES:
            rnd = random.Random(f"{seed}-d-{kind}")
            take(await timed("d", interleaving(kind, sizes.sessions, sizes.rounds, rnd, redis_url)))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--parts", default="abcdf", help="parts to run (default: abcdf)")
        parser.add_argument("--seed", type=int, default=1, help="seed of every fuzzer")

    run_ = common.parse(
        "reliability.py",
        "Fuzz cookies and provider answers, break Redis, interleave sessions; count failures.",
        argv,
        SIZES,
        add_arguments,
    )
    args = run_.args
    sizes = common.sizes(args, FULL, QUICK)
    parts = args.parts.replace(",", "")
    progress = logging.StreamHandler()  # what is running now, on stderr
    progress.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    with contextlib.ExitStack() as stack:
        needs_redis = "a" in parts or "d" in parts
        url = stack.enter_context(running_redis()).url if needs_redis else None
        results = asyncio.run(run_parts(parts, sizes, args.seed, url))
    common.publish(run_, "Reliability", report(run_, sizes, results, args.seed))
    return 0 if results.clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
