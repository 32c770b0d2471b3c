"""The refresher's memory: the grace chain, remembered failures and machine tokens.

Pure data structures: no I/O, no event loop, no lock of their own (the refresher's lock
guards them, together with its flights). Time comes from the injected clock's monotonic
reading. Every entry is bounded in number and in size: a remembered failure is a few fields,
never an exception with its traceback (invariant 12).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from ._errors import (
    ReauthenticationRequired,
    RefreshUnavailable,
    TokenEndpointError,
    TokenRefreshError,
)
from ._keys import KeyMaker, TokenParams
from ._logs import fingerprint
from ._tokens import TokenSet

__all__ = [
    "LOGGED_OUT",
    "Caches",
    "ExpiringMap",
    "GraceCache",
    "MachineTokenCache",
    "Refusal",
    "RefusalCache",
]

logger = logging.getLogger(__name__)

# A chain of rotations longer than this inside one grace TTL is not a chain but a bug.
_MAX_CHAIN = 32

V = TypeVar("V")


class ExpiringMap(Generic[V]):
    """Key -> value until a monotonic deadline; at most ``max_entries``, the oldest write
    dropped first. Lookups take ``now`` from the caller, so one clock reading serves several
    lookups, and an empty map is answered without reading the clock at all."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: dict[bytes, tuple[V, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def get(self, key: bytes, now: float) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: bytes, value: V, deadline: float, now: float) -> None:
        entries = self._entries
        entries.pop(key, None)  # re-inserted last: the newest write
        entries[key] = (value, deadline)
        # Drop expired entries from the old end, then the oldest while over the bound.
        for old in list(itertools.islice(entries, 4)):
            if entries[old][1] > now:
                break
            del entries[old]
        while len(entries) > self._max_entries:
            del entries[next(iter(entries))]


class GraceCache:
    """Old refresh token's key -> the token set that replaced it, for ``ttl`` seconds.

    Stragglers that still hold an old refresh token are served its newest successor
    (invariant 2): :meth:`newest` follows the chain, so nobody is handed a token set whose
    refresh token has already been rotated.
    """

    def __init__(self, max_entries: int, ttl: float) -> None:
        self.ttl = ttl
        self._successors: ExpiringMap[TokenSet] = ExpiringMap(max_entries)

    def __bool__(self) -> bool:
        return bool(self._successors)

    def remember(self, key: bytes, successor: TokenSet, now: float) -> None:
        self._successors.put(key, successor, now + self.ttl, now)

    def newest(
        self, key: bytes, token_set: TokenSet, key_of: Callable[[str], bytes], now: float
    ) -> tuple[bytes, TokenSet]:
        """The newest known generation after ``token_set`` (whose key is ``key``), and its
        key. ``key_of`` makes the key of a refresh token."""
        for _ in range(_MAX_CHAIN):
            successor = self._successors.get(key, now)
            if successor is None or not successor.newer_than(token_set):
                break
            token_set = successor
            if successor.refresh_token is None:
                break
            next_key = key_of(successor.refresh_token)
            if next_key == key:  # the provider does not rotate: same refresh token, new access
                break
            key = next_key
        return key, token_set


@dataclass(frozen=True, slots=True)
class Refusal:
    """A failure remembered for a while: what to raise again, as a few plain fields."""

    kind: Literal["terminal", "unavailable", "endpoint"]
    reason: str  # the error's reason, or the provider's error code for "endpoint"
    detail: str | None = None
    retry_after: float | None = None
    status: int | None = None

    @classmethod
    def of(cls, error: BaseException) -> Refusal | None:
        """The compact form of ``error``, or ``None`` if it is not worth remembering."""
        if isinstance(error, ReauthenticationRequired):
            return cls("terminal", error.reason, error.detail)
        if isinstance(error, RefreshUnavailable):
            return cls("unavailable", error.reason, error.detail, error.retry_after)
        if isinstance(error, TokenEndpointError):
            return cls("endpoint", error.error, None, error.retry_after, error.status)
        return None

    def error(self) -> TokenRefreshError:
        """A new exception to raise for this refusal (each caller gets its own)."""
        if self.kind == "terminal":
            return ReauthenticationRequired(self.reason, self.detail)
        if self.kind == "unavailable":
            return RefreshUnavailable(
                self.reason, retry_after=self.retry_after or 0.0, detail=self.detail
            )
        return TokenEndpointError(self.reason, status=self.status, retry_after=self.retry_after)


#: What a logged-out session's stragglers (and a refresh that was in flight) are told.
LOGGED_OUT = Refusal("terminal", "no_session", "logged out")


class RefusalCache:
    """Key -> :class:`Refusal`, each kept for its own number of seconds (invariant 5)."""

    def __init__(self, max_entries: int) -> None:
        self._refusals: ExpiringMap[Refusal] = ExpiringMap(max_entries)

    def __bool__(self) -> bool:
        return bool(self._refusals)

    def get(self, key: bytes, now: float) -> Refusal | None:
        return self._refusals.get(key, now)

    def remember(self, key: bytes, refusal: Refusal, seconds: float, now: float) -> None:
        self._refusals.put(key, refusal, now + seconds, now)


class MachineTokenCache:
    """Client-credentials token sets by parameter key, oldest dropped first when full.
    Reads need no lock (``dict.get`` is atomic); writers hold the refresher's."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._tokens: dict[bytes, TokenSet] = {}

    def get(self, key: bytes) -> TokenSet | None:
        return self._tokens.get(key)

    def remember(self, key: bytes, token_set: TokenSet) -> None:
        tokens = self._tokens
        tokens.pop(key, None)
        tokens[key] = token_set
        while len(tokens) > self._max_entries:
            del tokens[next(iter(tokens))]


class Caches:
    """The refresher's three caches and the keys into them. Its callers hold the refresher's
    lock around every call: checking the caches and boarding a flight are one step."""

    def __init__(
        self,
        keys: KeyMaker,
        *,
        max_entries: int,
        grace_ttl: float,
        default_retry_after: float,
        timer: Callable[[], float],
    ) -> None:
        self.keys = keys
        self.grace_ttl = grace_ttl
        self._default_retry_after = default_retry_after
        self._timer = timer
        self.grace = GraceCache(max_entries, grace_ttl)
        self.refusals = RefusalCache(max_entries)
        self.machine_tokens = MachineTokenCache(max_entries)

    def lookup(
        self, token_set: TokenSet, params: TokenParams
    ) -> tuple[bytes, TokenSet, Refusal | None]:
        """The newest known generation of ``token_set``'s session, its key, and the refusal
        remembered for that key. Reads the clock once, and not at all when both are empty
        (the common case, asked once per caller in a storm)."""
        assert token_set.refresh_token is not None
        keys = self.keys
        key = keys.refresh_token(token_set.refresh_token, params)
        if not self.grace and not self.refusals:
            return key, token_set, None
        now = self._timer()
        if self.grace:
            key, token_set = self.grace.newest(
                key, token_set, lambda rt: keys.refresh_token(rt, params), now
            )
        return key, token_set, self.refusals.get(key, now) if self.refusals else None

    def refusal(self, key: bytes) -> Refusal | None:
        return self.refusals.get(key, self._timer()) if self.refusals else None

    def remember(
        self, key: bytes, machine: bool, result: TokenSet | None, error: BaseException | None
    ) -> None:
        """Remember a flight's outcome: a new token set (in the grace cache, or as the machine
        token), a dead session for the grace TTL (invariant 5), a provider in trouble for its
        Retry-After, capped, so that a crowd of requests cannot hammer it."""
        now = self._timer()
        if result is not None:
            if machine:
                self.machine_tokens.remember(key, result)
            else:
                self.grace.remember(key, result, now)
            return
        refusal = None if error is None else Refusal.of(error)
        if refusal is None:
            return
        if refusal.kind == "terminal":
            self.refusals.remember(key, refusal, self.grace_ttl, now)
            logger.info("session %s needs reauthentication: %s", fingerprint(key), refusal.reason)
        else:
            ttl = refusal.retry_after or self._default_retry_after
            self.refusals.remember(key, refusal, min(ttl, self.grace_ttl), now)
            logger.warning("token refresh for %s failed: %s", fingerprint(key), error)

    def logged_out(self, token_set: TokenSet, params: TokenParams) -> None:
        """Refuse stragglers of a session that logged out, for the grace TTL."""
        key, _, _ = self.lookup(token_set, params)
        self.tombstone(key)

    def tombstone(self, key: bytes) -> None:
        """Mark the refresh token behind ``key`` as logged out, for the grace TTL."""
        self.refusals.remember(key, LOGGED_OUT, self.grace_ttl, self._timer())

    def is_logged_out(self, key: bytes) -> bool:
        return self.refusal(key) is LOGGED_OUT
