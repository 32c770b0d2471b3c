"""What ``probe``'s findings mean: the settings and recommendations, in plain words. Pure.

One rule per policy (no rotation; refused at once, revoking the grant or not; a grace window;
a reuse count; no refusal within the search's bound), then one per notable detail: what a
replay answers, old access tokens, dead-token answers, lifetimes, revocation, metadata. Each
recommendation carries a stable ``rule`` name for ``--json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._oauth_messages import DEFAULT_RETRY_AFTER
from .findings import Findings, Refusal, Reuse
from .provider import Endpoints

__all__ = [
    "GRACE_TTL",
    "SKEW",
    "Recommendation",
    "Settings",
    "duration",
    "policy",
    "recommend",
    "settings",
]

GRACE_TTL = 60.0  # the Refresher's defaults, which the settings are stated against
SKEW = 60.0
_RETRY = DEFAULT_RETRY_AFTER  # how long after a lost response the library retries, at least


@dataclass(frozen=True)
class Recommendation:
    rule: str
    text: str


@dataclass(frozen=True)
class Settings:
    coordinator: str  # with more than one worker: "required", "recommended" or "optional"
    lost_response: str  # what a refresh response lost on the way costs
    grace_ttl: float = GRACE_TTL
    skew: float = SKEW


def policy(findings: Findings) -> str:
    """``no_rotation``, ``strict`` (refused at once, the grant revoked),
    ``refused_grant_survives``, ``window``, ``count`` or ``unbounded``."""
    reuse = findings.reuse
    if not findings.rotation or reuse is None:
        return "no_rotation"
    if reuse.policy == "refused":
        return "refused_grant_survives" if reuse.revokes_family is False else "strict"
    return reuse.policy


def settings(findings: Findings) -> Settings:
    reuse, kind = findings.reuse, policy(findings)
    skew = SKEW
    if reuse is not None and reuse.answer == "same" and reuse.fresh_expires_in:
        skew = max(SKEW, math.ceil(reuse.refused_at or findings.bounds.max_grace))
    if kind in ("strict", "refused_grant_survives"):
        return Settings("required", "logs the user out", skew=skew)
    if kind == "count" and reuse is not None:
        return Settings("required", f"costs nothing for up to {reuse.count} retries", skew=skew)
    if kind == "window" and reuse is not None:
        within = duration(reuse.accepted_until or 0.0)
        lost = f"costs nothing if retried within {within}"
        if (reuse.refused_at or 0.0) <= _RETRY:
            lost = f"logs the user out, mostly (the retry comes after {duration(_RETRY)})"
        return Settings("recommended", lost, skew=skew)
    return Settings("optional", "costs nothing", skew=skew)


def recommend(findings: Findings) -> list[Recommendation]:
    """Plain words, derived from the findings: the policy's rule first, then the details."""
    out = [_policy_rule(findings)]
    out += _replay_rules(findings)
    out += _old_access_rules(findings)
    out += _dead_token_rules(findings.dead)
    out += _lifetime_rules(findings)
    out += _revocation_rules(findings)
    out += _metadata_rules(findings.endpoints)
    return out


def _policy_rule(findings: Findings) -> Recommendation:
    kind, reuse = policy(findings), findings.reuse
    safe = f"grace_ttl {duration(GRACE_TTL)} is safe."
    if kind == "no_rotation" or reuse is None:
        text = (
            "The provider does not rotate refresh tokens: a lost refresh response costs "
            "nothing and concurrent refreshes cannot log a user out. A coordinator is optional "
            f"(it only saves duplicate provider calls); {safe} A leaked refresh token stays "
            "valid until it expires or is revoked: keep it server-side or in "
            "CookieSessionStore's encrypted cookies, and keep logout's revocation."
        )
        return Recommendation("no_rotation", text)
    after = _after_refusal(reuse)
    if kind == "strict":
        text = (
            "Reuse revokes the grant and there is no grace window: a lost refresh response "
            "logs the user out. Turn on your provider's reuse interval if it has one; use a "
            f"coordinator (FileCoordinator, RedisCoordinator) with more than one worker; {safe}"
        )
    elif kind == "refused_grant_survives":
        text = (
            "A consumed refresh token is refused at once, but the reuse does not revoke the "
            "grant: a lost refresh response still logs the user out (the session holds only "
            "the consumed token). Turn on your provider's reuse interval if it has one; use a "
            "coordinator with more than one worker, or a second worker's refresh of the same "
            f"session fails; {safe}"
        )
    elif kind == "count":
        text = (
            f"The provider accepts a consumed refresh token {reuse.count} more time(s) (a "
            f"reuse count, like Keycloak's Refresh Token Max Reuse), then refuses it{after}: "
            "a lost refresh response costs nothing while the retry is among them. Every "
            "duplicate refresh spends one: use a coordinator with more than one worker, so "
            f"that they are left for lost responses; {safe}"
        )
    elif kind == "window":
        low, high = duration(reuse.accepted_until or 0.0), duration(reuse.refused_at or 0.0)
        text = (
            f"The provider accepts a consumed refresh token for at least {low} and less than "
            f"{high} after the rotation (a grace window), then refuses it{after}: a lost "
            "refresh response costs nothing if the retry comes within the window (the library "
            f"retries on the user's next request, after Retry-After, {duration(_RETRY)} by "
            "default). A coordinator with more than one worker is recommended: without it each "
            f"worker refreshes once and the provider accepts the duplicates; {safe}"
        )
        if (reuse.refused_at or 0.0) <= _RETRY:
            text += (
                f" The window is shorter than the retry delay ({duration(_RETRY)}): most lost "
                "responses will still log the user out; lengthen it to 30 s or more."
            )
    else:
        text = (
            "A consumed refresh token was still accepted "
            f"{duration(reuse.accepted_until or 0.0)} after the rotation (the search stops at "
            f"--max-grace, {duration(findings.bounds.max_grace)}): lost responses cost "
            "nothing, but a stolen refresh token keeps working as long as the real one does. "
            f"A coordinator is optional (it saves duplicate calls); {safe}"
        )
    return Recommendation(kind, text)


def _after_refusal(reuse: Reuse) -> str:
    if reuse.revokes_family is True:
        return ", and that revokes the grant, newest refresh token included"
    if reuse.revokes_family is False:
        return "; the grant survives"
    return ""


def _replay_rules(findings: Findings) -> list[Recommendation]:
    reuse = findings.reuse
    if reuse is None or reuse.answer is None:
        return []
    if reuse.answer == "same" and reuse.fresh_expires_in:
        rule = "replay_original_access_token"
        text = (
            "A replay returns the original access token with a fresh expires_in: it expires "
            "earlier than the answer says, by up to the window. Keep skew at least the window "
            f"({duration(settings(findings).skew)}), so that the library refreshes before the "
            "real expiry."
        )
    elif reuse.answer == "same":
        rule = "replay_same_tokens"
        text = (
            "A replay returns the same token set as the first answer: stragglers and retries "
            "converge on one session state. Nothing to do."
        )
    elif reuse.answer == "new":
        rule = "replay_new_branch"
        text = (
            "A replay returns a new refresh token, another branch of the grant: two workers "
            "that refresh one session without a coordinator leave it on two branches. Use a "
            "coordinator with more than one worker."
        )
    else:  # the newest refresh token with a new access token: the family stays one chain
        return []
    return [Recommendation(rule, text)]


def _old_access_rules(findings: Findings) -> list[Recommendation]:
    if findings.old_access_token == "refused":
        rule = "previous_access_token_revoked"
        text = (
            "The provider invalidates the previous access token at each refresh: a request "
            "still holding it (another worker, a streamed response) gets a 401 from your API. "
            "Call APIs through request.state.token.client() or TokenAuth: a 401 makes one "
            "compare-and-refresh with the failed token, which hands out the newer token "
            "without a provider call."
        )
    elif findings.old_access_token == "unknown":
        rule = "previous_access_token_unknown"
        text = (
            "Whether the previous access token survives a refresh is unknown "
            f"({findings.old_access_detail}). Call APIs through request.state.token.client() "
            "or TokenAuth, which recover from one 401 with the newer token."
        )
    else:
        return []
    return [Recommendation(rule, text)]


def _dead_token_rules(dead: Refusal | None) -> list[Recommendation]:
    if dead is None:
        return []
    answer = f"HTTP {dead.status} {dead.error}"
    if not dead.terminal:
        rule = "dead_token_not_terminal"
        text = (
            f"A dead refresh token is answered {answer}, not invalid_grant: the library treats "
            "that as transient (503 with Retry-After, session kept), so users whose grant died "
            "get 503s instead of a new login until their session expires. Report it to the "
            "provider."
        )
    elif dead.status != 400:
        rule = "dead_token_status"
        text = (
            f"A dead refresh token is answered {answer} (RFC 6749 says 400): the library "
            "decides on the error, not the status. Nothing to do."
        )
    else:
        return []
    return [Recommendation(rule, text)]


def _lifetime_rules(findings: Findings) -> list[Recommendation]:
    out = []
    lifetime = findings.access_expires_in
    if lifetime is None:
        text = (
            "The provider sends no expires_in: set OAuth2Client(default_token_lifetime=...) to "
            "the access tokens' real lifetime (3600 s is assumed)."
        )
        out.append(Recommendation("no_expires_in", text))
    elif lifetime < 2 * SKEW:
        text = (
            f"Access tokens live {duration(lifetime)}: the skew ({duration(SKEW)}) is clamped "
            f"to half that, so they are refreshed {duration(lifetime / 2)} before expiry. "
            "Nothing to do."
        )
        out.append(Recommendation("short_access_tokens", text))
    if findings.refresh_expires_in is not None:
        text = (
            f"Refresh tokens expire {duration(findings.refresh_expires_in)} after issue: "
            "CookieSessionStore and RedisSessionStore keep a session that long; a user idle "
            "longer logs in again."
        )
        out.append(Recommendation("refresh_token_lifetime", text))
    return out


def _revocation_rules(findings: Findings) -> list[Recommendation]:
    result, status = findings.revocation, findings.revocation_status
    alive = " The probed grant is still alive: end it at the provider."
    alive = alive if findings.grant_left_alive else ""
    if result == "not_published":
        rule = "revocation_missing"
        text = (
            "No revocation endpoint is published: logout clears the session but cannot end "
            "the grant at the provider, whose refresh token lives until it expires. If the "
            "provider has one, pass OAuth2Client(revocation_endpoint=...)."
        )
    elif result == "failed":
        rule = "revocation_failed"
        text = (
            f"The revocation endpoint answered HTTP {status}: logout's revocation will fail "
            "(logged, counted in asgi_token_refresh.logouts); the session is still cleared."
        )
    elif result == "ineffective":
        rule = "revocation_ineffective"
        text = (
            "The revocation endpoint answered 200, but the refresh token kept working: logout "
            "does not end the grant at the provider."
        )
    elif findings.endpoints.revocation_in == "rfc8414":
        rule = "revocation_in_rfc8414_only"
        text = (
            "Revocation is published only in RFC 8414 metadata, not in OIDC discovery: "
            "OAuth2Client.from_discovery finds it there. Nothing to do."
        )
    else:
        return []
    return [Recommendation(rule, text + alive)]


def _metadata_rules(endpoints: Endpoints) -> list[Recommendation]:
    out = []
    if not endpoints.oidc:
        text = (
            "The provider has no OIDC discovery document: OAuth2Client.from_discovery cannot "
            "be used; pass token_endpoint= (and revocation_endpoint=, "
            "authorization_endpoint=) to OAuth2Client."
        )
        out.append(Recommendation("no_oidc_discovery", text))
    elif endpoints.urls["end_session"] is None:
        text = (
            "No end_session_endpoint: logout ends the app's session and revokes the grant, "
            "but the user stays logged in at the provider."
        )
        out.append(Recommendation("no_end_session", text))
    if endpoints.rfc8414_url is not None and not endpoints.rfc8414_compliant:
        text = (
            f"RFC 8414 metadata is served under the issuer's path ({endpoints.rfc8414_url}), "
            "not where RFC 8414 section 3.1 puts it: the library looks only there, so pass "
            "revocation_endpoint= explicitly if it is published only in that document."
        )
        out.append(Recommendation("rfc8414_under_issuer_path", text))
    return out


def duration(seconds: float) -> str:
    """Seconds: ``60 s``, ``1.5 s``; long ones also in a larger unit: ``300 s (5 min)``."""
    rounded = round(float(seconds), 1)
    text = f"{int(rounded) if rounded.is_integer() else rounded} s"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size * 2 and seconds % size == 0:
            return f"{text} ({seconds / size:g} {unit})"
    return text
