"""What ``probe`` found: plain data, filled by :mod:`.measure`, read by
:mod:`.rules` (what it means) and :mod:`.report` (how it is shown)."""

from __future__ import annotations

from dataclasses import dataclass

from .._oauth_messages import TERMINAL_ERRORS
from .provider import Endpoints

__all__ = ["Findings", "Refusal", "Reuse", "SearchBounds"]


@dataclass(frozen=True)
class SearchBounds:
    """How far the reuse search goes: ``immediate`` reuses at once, then one after
    ``first_wait`` s, doubling up to ``max_grace`` s after the rotation; further grants halve
    the interval down to ``resolution`` s."""

    max_grace: float = 60.0
    immediate: int = 5
    first_wait: float = 1.0
    resolution: float = 1.0

    def schedule(self) -> list[float]:
        """The waits of the first grant's search, in seconds after the rotation."""
        waits, wait = [], self.first_wait
        while wait < self.max_grace:
            waits.append(wait)
            wait *= 2
        return [*waits, self.max_grace]


@dataclass(frozen=True)
class Refusal:
    """How the provider answered a dead refresh token: ``of`` a ``reused``, ``revoked`` or
    ``never_issued`` one."""

    status: int
    error: str
    of: str

    @property
    def terminal(self) -> bool:
        return self.error in TERMINAL_ERRORS


@dataclass
class Reuse:
    """What a consumed refresh token still does. ``policy``: ``refused`` (at once), ``count``
    (accepted ``count`` times), ``window`` (accepted until ``accepted_until``, refused at
    ``refused_at`` s after the rotation) or ``unbounded`` (never refused within the bound)."""

    policy: str
    accepted: int = 0
    accepted_until: float | None = None
    refused_at: float | None = None
    count: int | None = None
    answer: str | None = None  # "same", "same_refresh_token" or "new"
    fresh_expires_in: bool | None = None  # a replayed access token's expires_in, as if new
    revokes_family: bool | None = None
    grants_used: int = 1


@dataclass
class Findings:
    issuer: str
    client_id: str
    endpoints: Endpoints
    bounds: SearchBounds
    rotation: bool = False
    access_expires_in: float | None = None
    refresh_expires_in: float | None = None
    id_token_on_refresh: bool = False
    reuse: Reuse | None = None  # None without rotation
    dead: Refusal | None = None
    old_access_token: str = "unknown"  # "works", "refused" or "unknown"
    old_access_detail: str = ""
    revocation: str = "not_published"  # "supported", "ineffective", "failed", "not_published"
    revocation_status: int | None = None
    grants_spent: int = 1
    grant_left_alive: bool = False
