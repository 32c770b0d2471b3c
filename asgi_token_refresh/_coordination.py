"""Coordinators: one flight per grant across processes and hosts.

The refresher first deduplicates inside the process; the one local flight per grant then asks
its coordinator before calling the provider. The protocol is four steps: try to lead (which
also finds a result another process already published), publish, release, wait.
:class:`LocalCoordinator`, the default, always lets the local flight lead and costs nothing.
``RedisCoordinator`` (``asgi_token_refresh.redis``)
and :class:`FileCoordinator` share results between processes, sealed so that neither Redis
nor the disk ever holds a plaintext token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ._errors import ReauthenticationRequired, RefreshUnavailable
from ._sealing import Sealer
from ._tokens import TokenSet

__all__ = [
    "Coordinator",
    "Lease",
    "LocalCoordinator",
    "Published",
    "decode_outcome",
    "encode_outcome",
]

#: What a leader publishes for its followers: the new token set, or why there is none.
Published = TokenSet | ReauthenticationRequired | RefreshUnavailable


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to call the provider for one grant, held by one process until released."""

    key: str
    owner: str


@runtime_checkable
class Coordinator(Protocol):
    """Decides which process calls the token endpoint for a grant; the others wait for it.

    Ordinary async code, called on the event loop of the flight's leader: keep loop-bound
    clients in a :class:`PerLoop`. ``docs/extending.md`` walks through writing one.
    """

    #: A short label for logs and the ``coordinator`` metric attribute.
    name: str

    def grant_key(self, *parts: str | None) -> str:
        """The grant's name, the same in every process (a keyed hash: it reveals nothing)."""
        ...

    async def try_lead(self, key: str, ttl: float) -> Lease | Published | None:
        """A lease to call the provider (held at most ``ttl`` seconds unless renewed), or the
        outcome another process already published, or ``None`` if another process leads."""
        ...

    async def publish(self, lease: Lease, outcome: Published, ttl: float) -> None:
        """Keep ``outcome`` for ``ttl`` seconds, wake the followers and release the lease."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give the lease up without an outcome (the next process will try itself)."""
        ...

    async def wait(self, key: str, timeout: float) -> Published | None:  # noqa: ASYNC109
        """Wait until an outcome is published (returned) or the leader's lease is gone or
        ``timeout`` passed (``None``: try to lead)."""
        ...


class LocalCoordinator:
    """One process: the in-process single flight is all the coordination there is."""

    name = "local"

    def __repr__(self) -> str:
        return "LocalCoordinator()"

    def grant_key(self, *parts: str | None) -> str:
        return ""  # never stored or compared: every flight leads

    async def try_lead(self, key: str, ttl: float) -> Lease | Published | None:
        return Lease(key, "local")

    async def publish(self, lease: Lease, outcome: Published, ttl: float) -> None:
        return None

    async def release(self, lease: Lease) -> None:
        return None

    async def wait(self, key: str, timeout: float) -> Published | None:  # noqa: ASYNC109
        return None


def encode_outcome(sealer: Sealer, key: str, outcome: Published) -> bytes:
    """``outcome`` sealed for storage under ``key`` (the key is bound in as associated data)."""
    if isinstance(outcome, TokenSet):
        document: dict[str, object] = {"token_set": outcome.to_dict()}
    elif isinstance(outcome, ReauthenticationRequired):
        document = {"terminal": outcome.reason}
    else:
        document = {"transient": outcome.reason, "retry_after": outcome.retry_after}
    return sealer.seal(json.dumps(document, separators=(",", ":")).encode(), key.encode())


def decode_outcome(sealer: Sealer, key: str, blob: bytes) -> Published:
    """Inverse of :func:`encode_outcome`; ``ValueError`` for a tampered or foreign value."""
    document = json.loads(sealer.open(blob, key.encode()))
    if not isinstance(document, dict):
        raise ValueError("not a published outcome")
    if "token_set" in document:
        return TokenSet.from_dict(document["token_set"])
    if isinstance(document.get("terminal"), str):
        return ReauthenticationRequired(document["terminal"], "another process was refused")
    retry_after = document.get("retry_after")
    if (
        isinstance(document.get("transient"), str)
        and isinstance(retry_after, int | float)
        and math.isfinite(retry_after)
        and retry_after >= 0
    ):
        return RefreshUnavailable(document["transient"], retry_after=float(retry_after))
    raise ValueError("not a published outcome")
