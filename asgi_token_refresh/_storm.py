"""A refresh storm, in-process: naive per-request refresh versus the single-flight refresher.

Sessions of a strict provider (rotating refresh tokens, reuse revokes the grant) each send a
burst of concurrent requests at every expiry boundary. Every request reads its session's token
set, refreshes it if due, stores what it got, and calls a protected API with it. The naive mode
is what the field reports describe teams shipping first: each request refreshes on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from ._errors import TokenRefreshError
from ._oauth import OAuth2Client
from ._refresher import Refresher
from ._tokens import TokenSet
from .testing import FakeClock, FakeIdP

__all__ = ["StormReport", "run_storm", "side_by_side"]

_ISSUER = "https://idp.storm"


@dataclass
class StormReport:
    mode: str
    requests: int = 0
    provider_calls: int = 0
    invalid_grant: int = 0
    sessions: int = 0
    sessions_lost: int = 0
    failures: int = 0  # requests that could not call the API with a valid token
    errors: dict[str, int] = field(default_factory=dict)


async def _storm(mode: str, sessions: int, callers: int, rotations: int) -> StormReport:
    clock = FakeClock()
    idp = FakeIdP(issuer=_ISSUER, clock=clock, access_token_lifetime=300)
    client = OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{_ISSUER}/token",
        transport=idp.transport(),
        clock=clock,
        name="storm",
    )
    refresher = Refresher(client, jitter=0)
    store: dict[int, TokenSet] = {}
    for user in range(sessions):
        store[user] = TokenSet.from_token_response(
            idp.issue(f"user{user}"), issued_at=clock.time(), default_lifetime=300
        )
    report = StormReport(mode=mode, sessions=sessions)

    def keep(user: int, token_set: TokenSet) -> None:
        # A store never goes back to an older generation.
        if token_set.issued_at >= store[user].issued_at:
            store[user] = token_set

    async def naive(user: int, token_set: TokenSet) -> TokenSet:
        if not refresher.refresh_due(token_set):
            return token_set
        assert token_set.refresh_token is not None
        return await client.refresh(token_set.refresh_token, previous=token_set)

    async def single_flight(user: int, token_set: TokenSet) -> TokenSet:
        return await refresher.ensure_fresh(
            token_set,
            current=lambda: store[user],
            on_refreshed=lambda new: keep(user, new),
        )

    acquire: Callable[[int, TokenSet], Awaitable[TokenSet]] = (
        naive if mode == "naive" else single_flight
    )
    async with httpx.AsyncClient(transport=idp.transport(), base_url=_ISSUER) as api:

        async def request(user: int) -> None:
            try:
                token_set = await acquire(user, store[user])
            except TokenRefreshError as exc:
                name = str(
                    getattr(exc, "reason", None) or getattr(exc, "error", type(exc).__name__)
                )
                report.errors[name] = report.errors.get(name, 0) + 1
                report.failures += 1
                return
            keep(user, token_set)
            answer = await api.get(
                "/userinfo", headers={"Authorization": f"Bearer {token_set.access_token}"}
            )
            if answer.status_code != 200:
                report.failures += 1

        for _ in range(rotations):
            clock.advance(300)  # every session's access token is now expired
            burst = [request(user) for user in range(sessions) for _ in range(callers)]
            report.requests += len(burst)
            await asyncio.gather(*burst)

    report.provider_calls = idp.token_calls("refresh_token")
    report.invalid_grant = idp.token_calls("refresh_token", "invalid_grant") + idp.token_calls(
        "refresh_token", "reuse_revoked"
    )
    report.sessions_lost = sum(
        not idp.is_grant_active(ts.refresh_token or "") for ts in store.values()
    )
    await client.aclose()
    return report


def run_storm(sessions: int = 50, callers: int = 20, rotations: int = 3) -> list[StormReport]:
    """Run the naive and the single-flight storm; returns their reports in that order."""
    return [
        asyncio.run(_storm(mode, sessions, callers, rotations))
        for mode in ("naive", "single-flight")
    ]


def side_by_side(modes: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A plain-text table: one column per mode, one labelled row per measure."""
    header = f"{'':<24}" + "".join(f"{mode:>16}" for mode in modes)
    lines = [header, "-" * len(header)]
    lines += [f"{label:<24}" + "".join(f"{v:>16}" for v in values) for label, values in rows]
    return "\n".join(lines)
