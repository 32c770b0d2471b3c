"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from asgi_token_refresh import Refresher, TokenSet
from asgi_token_refresh.testing import FakeClock, FakeIdP

ISSUER = "https://idp.test"


def login(idp: FakeIdP, clock: FakeClock, subject: str = "alice") -> TokenSet:
    """A session's first token set, as the login callback would store it."""
    return TokenSet.from_token_response(
        idp.issue(subject), issued_at=clock.time(), default_lifetime=3600.0
    )


def waiting(refresher: Refresher) -> int:
    """Callers currently parked on a flight (to line up concurrency; never asserted on)."""
    return refresher.waiting
