"""``probe``'s measurements: a fixed sequence of token requests that spends the grant.

On the first grant (refresh token R0):

1. refresh R0 -> R1, A1: rotation, ``expires_in``, ``refresh_expires_in``, an ID token;
2. userinfo with A1 (the baseline), refresh R1 -> R2, A2 (R1 is now consumed), userinfo with
   A1 again: does the old access token survive the rotation;
3. with rotation, reuse R1: up to ``immediate`` times at once (a reuse count shows here), then
   after 1, 2, 4... s up to ``max_grace`` (a grace window). The first refusal ends the search,
   and gives the dead token's status and ``error``; then the newest refresh token is tried:
   did the reuse revoke the family? Each further grant bisects the window left;
4. the newest refresh token is revoked and tried again: revocation. A provider that never
   refused anything is asked for a refresh token it never issued.

Time comes from the injected clock and waits go through the injected ``sleep``, so tests run
a 30 s grace window in no time against a FakeIdP on the same FakeClock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from .._clock import Clock
from .findings import Findings, Refusal, Reuse, SearchBounds
from .provider import ProbeError, ProbeProvider, TokenAnswer

__all__ = ["Prober", "Sleep"]

Sleep = Callable[[float], Awaitable[None]]


class Prober:
    def __init__(
        self,
        provider: ProbeProvider,
        *,
        clock: Clock,
        sleep: Sleep,
        bounds: SearchBounds,
        say: Callable[[str], None],
    ) -> None:
        self.provider = provider
        self.clock = clock
        self.sleep = sleep
        self.bounds = bounds
        self.say = say

    async def run(self, first: TokenAnswer | str, spare: Sequence[str] = ()) -> Findings:
        """Probe with ``first`` (a login's answer, or a refresh token); ``spare`` refresh
        tokens of other grants refine the grace window."""
        p = self.provider
        findings = Findings(p.issuer, p.client_id, p.endpoints, self.bounds)
        findings.grants_spent = 1
        start = first if isinstance(first, str) else first.refresh_token
        assert start is not None
        p.remember_secret(start)
        self.say("refresh 1 of the probed grant")
        r1 = await self._first_refresh(start, what="the refresh token")
        assert r1.access_token is not None
        findings.rotation = r1.refresh_token is not None and r1.refresh_token != start
        findings.access_expires_in = r1.expires_in
        findings.refresh_expires_in = r1.refresh_expires_in
        findings.id_token_on_refresh = r1.id_token
        current = r1.refresh_token or start

        before = await p.userinfo(r1.access_token)
        self.say("refresh 2: the first refresh's tokens become the old ones")
        r2 = _must(await p.refresh(current), "a second refresh")
        rotated_at = self.clock.monotonic()
        after = await p.userinfo(r1.access_token) if before == 200 else None
        findings.old_access_token, findings.old_access_detail = _old_access(before, after)
        newest, alive = r2.refresh_token or current, True

        if findings.rotation:
            reuse, newest, alive, findings.dead = await self._reuse(current, r2, rotated_at)
            if reuse.policy == "window" and spare:
                await self._bisect(reuse, spare)
                findings.grants_spent += reuse.grants_used - 1
            findings.reuse = reuse
        await self._revocation(findings, newest, alive)
        unused = spare[findings.grants_spent - 1 :]
        if unused:  # given to be spent: not left alive
            self.say(f"revoking the {len(unused)} further grant(s) the search did not need")
            for token in unused:
                p.remember_secret(token)
                await p.revoke(token)
        if findings.dead is None:
            self.say("asking for a refresh token the provider never issued")
            unknown = await p.refresh(p.never_issued_token())
            if unknown.ok:
                raise ProbeError(
                    "the provider accepted a refresh token it never issued", exit_code=1
                )
            findings.dead = _refusal(unknown, "never_issued")
        return findings

    # -- steps --------------------------------------------------------------------------------

    async def _reuse(
        self, consumed: str, first_answer: TokenAnswer, rotated_at: float
    ) -> tuple[Reuse, str, bool, Refusal | None]:
        """Reuse ``consumed`` until refused or out of bounds; then try the newest token."""
        bounds, p = self.bounds, self.provider
        reuse = Reuse(policy="unbounded")
        newest = first_answer.refresh_token or consumed
        refusal: Refusal | None = None
        waits: list[float | None] = [None] * bounds.immediate + list(bounds.schedule())
        self.say(f"reusing the consumed refresh token (at once, up to {bounds.immediate} times)")
        for wait in waits:
            if wait is not None:
                await self._wait_until(rotated_at, wait)
            answer = await p.refresh(consumed)
            elapsed = self.clock.monotonic() - rotated_at
            if not answer.ok:
                self._check_not_transient(answer, "the reuse test")
                refusal = _refusal(answer, "reused")
                reuse.refused_at = elapsed
                if reuse.accepted == 0:
                    reuse.policy = "refused"
                elif wait is None:
                    reuse.policy, reuse.count = "count", reuse.accepted
                else:
                    reuse.policy = "window"
                break
            reuse.accepted += 1
            reuse.accepted_until = elapsed
            reuse.answer = reuse.answer or _compare(answer, first_answer)
            if wait is not None and answer.access_token == first_answer.access_token:
                reuse.fresh_expires_in = answer.expires_in == first_answer.expires_in
            if answer.refresh_token is not None and answer.refresh_token != newest:
                newest = answer.refresh_token  # another branch: the latest is the newest
        if refusal is None:
            return reuse, newest, True, None
        self.say("trying the newest refresh token after the refused reuse")
        family = await p.refresh(newest)
        if family.ok:
            reuse.revokes_family = False
            return reuse, family.refresh_token or newest, True, refusal
        self._check_not_transient(family, "the family test")
        reuse.revokes_family = True
        return reuse, newest, False, refusal

    async def _bisect(self, reuse: Reuse, spare: Sequence[str]) -> None:
        """Halve ``[accepted_until, refused_at)`` with further grants, one refusal each."""
        assert reuse.accepted_until is not None
        assert reuse.refused_at is not None
        low, high = reuse.accepted_until, reuse.refused_at
        for token in spare:
            if high - low <= self.bounds.resolution:
                break
            reuse.grants_used += 1
            self.provider.remember_secret(token)
            self.say(f"grant {reuse.grants_used}: narrowing the window ({low:.1f}-{high:.1f} s)")
            answer = await self._first_refresh(token, what="a further --refresh-token")
            rotated_at = self.clock.monotonic()
            newest = answer.refresh_token or token
            while high - low > self.bounds.resolution:
                await self._wait_until(rotated_at, (low + high) / 2)
                again = await self.provider.refresh(token)
                elapsed = self.clock.monotonic() - rotated_at
                if not again.ok:
                    self._check_not_transient(again, "the reuse test")
                    high = min(high, elapsed)
                    break
                low = max(low, elapsed)
                reuse.accepted += 1
                newest = again.refresh_token or newest
            await self.provider.revoke(newest)  # this grant is spent either way
        reuse.accepted_until, reuse.refused_at = low, high

    async def _revocation(self, findings: Findings, newest: str, alive: bool) -> None:
        p = self.provider
        self.say("revoking the newest refresh token")
        status = await p.revoke(newest)
        findings.revocation_status = status
        findings.grant_left_alive = alive
        if status is None:
            findings.revocation = "not_published"
            return
        if status != 200:
            findings.revocation = "failed"
            return
        findings.revocation = "supported"
        if alive:
            check = await p.refresh(newest)
            if check.ok:
                findings.revocation = "ineffective"
                if check.refresh_token is not None and check.refresh_token != newest:
                    await p.revoke(check.refresh_token)
                return
            self._check_not_transient(check, "the revocation test")
            findings.grant_left_alive = False
            findings.dead = findings.dead or _refusal(check, "revoked")

    # -- helpers ------------------------------------------------------------------------------

    async def _first_refresh(self, token: str, *, what: str) -> TokenAnswer:
        answer = await self.provider.refresh(token)
        if answer.ok:
            return answer
        if answer.error in ("invalid_client", "unauthorized_client"):
            raise ProbeError(
                f"the provider refused the client (HTTP {answer.status} {answer.error}): check "
                "--client-id, --client-secret and --auth-method",
                exit_code=2,
            )
        if answer.error == "invalid_grant":
            raise ProbeError(
                f"the provider refused {what} (HTTP {answer.status} invalid_grant): it is "
                "spent, expired or revoked; log in again for a fresh one",
                exit_code=2,
            )
        return _must(answer, "the first refresh")

    def _check_not_transient(self, answer: TokenAnswer, step: str) -> None:
        """A 5xx or 429 says nothing about the token: the probe cannot conclude."""
        if answer.status == 429 or answer.status >= 500:
            raise ProbeError(
                f"the provider failed during {step} (HTTP {answer.status} {answer.error})",
                exit_code=1,
            )

    async def _wait_until(self, since: float, seconds: float) -> None:
        delay = since + seconds - self.clock.monotonic()
        if delay > 0:
            self.say(f"waiting {delay:.1f} s, to reuse it {seconds:g} s after the rotation")
            await self.sleep(delay)


def _must(answer: TokenAnswer, step: str) -> TokenAnswer:
    if answer.status == 429 or answer.status >= 500:
        raise ProbeError(
            f"the provider failed {step} (HTTP {answer.status} {answer.error})", exit_code=1
        )
    if not answer.ok:
        raise ProbeError(
            f"the provider refused {step} of a live refresh token "
            f"(HTTP {answer.status} {answer.error})",
            exit_code=1,
        )
    return answer


def _refusal(answer: TokenAnswer, of: str) -> Refusal:
    return Refusal(answer.status, answer.error or "invalid_response", of)


def _compare(answer: TokenAnswer, first: TokenAnswer) -> str:
    """An accepted reuse, against the answer the consumed token got first."""
    same_refresh = answer.refresh_token in (None, first.refresh_token)
    if same_refresh and answer.access_token == first.access_token:
        return "same"
    return "same_refresh_token" if same_refresh else "new"


def _old_access(before: int | None, after: int | None) -> tuple[str, str]:
    if before is None:
        return "unknown", "no userinfo endpoint published"
    if before != 200:
        return "unknown", f"userinfo refused it before the next refresh too, HTTP {before}"
    if after == 200:
        return "works", "userinfo answered 200 after the next refresh"
    if after in (401, 403):
        return "refused", f"userinfo answered {after} after the next refresh"
    return "unknown", f"userinfo answered HTTP {after} after the next refresh"
