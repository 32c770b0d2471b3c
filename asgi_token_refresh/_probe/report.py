"""``probe``'s output: the table for people, the JSON for machines. Pure.

The JSON's keys are stable (``schema`` 1): add keys, never rename or remove one.
"""

from __future__ import annotations

import textwrap
from typing import Any
from urllib.parse import urlsplit

from .findings import Findings, Refusal, Reuse, SearchBounds
from .provider import ENDPOINT_FIELDS
from .rules import GRACE_TTL, SKEW, policy, recommend, settings
from .rules import duration as _s

__all__ = ["SCHEMA", "table", "to_json"]

SCHEMA = 1
_WIDTH = 100
_LABEL = 37


def to_json(findings: Findings) -> dict[str, Any]:
    """The stable machine form (``schema`` 1)."""
    e, reuse, dead, chosen = findings.endpoints, findings.reuse, findings.dead, settings(findings)
    return {
        "schema": SCHEMA,
        "issuer": findings.issuer,
        "client_id": findings.client_id,
        "grants_spent": findings.grants_spent,
        "discovery": {
            "oidc": e.oidc,
            "rfc8414": e.rfc8414_url is not None,
            "rfc8414_url": e.rfc8414_url,
            "endpoints": dict(e.urls),
            "revocation_published_in": e.revocation_in,
        },
        "policy": policy(findings),
        "rotation": findings.rotation,
        "access_token_expires_in": findings.access_expires_in,
        "refresh_token_expires_in": findings.refresh_expires_in,
        "id_token_on_refresh": findings.id_token_on_refresh,
        "reuse": None if reuse is None else {
            "policy": reuse.policy,
            "accepted": reuse.accepted,
            "accepted_until_s": _round(reuse.accepted_until),
            "refused_at_s": _round(reuse.refused_at),
            "count": reuse.count,
            "answer": reuse.answer,
            "fresh_expires_in": reuse.fresh_expires_in,
            "revokes_family": reuse.revokes_family,
            "grants_used": reuse.grants_used,
        },
        "search": {
            "immediate": findings.bounds.immediate,
            "waits_s": findings.bounds.schedule(),
            "max_grace_s": findings.bounds.max_grace,
        },
        "dead_refresh_token": None if dead is None else {
            "status": dead.status,
            "error": dead.error,
            "of": dead.of,
            "terminal": dead.terminal,
        },
        "old_access_token_after_refresh": findings.old_access_token,
        "revocation": {
            "result": findings.revocation,
            "status": findings.revocation_status,
            "supported": findings.revocation == "supported",
        },
        "grant_left_alive": findings.grant_left_alive,
        "settings": {
            "coordinator": chosen.coordinator,
            "grace_ttl_s": chosen.grace_ttl,
            "skew_s": chosen.skew,
            "lost_response": chosen.lost_response,
        },
        "recommendations": [{"rule": r.rule, "text": r.text} for r in recommend(findings)],
    }  # fmt: skip


def table(findings: Findings) -> str:
    """The findings, the recommended settings and the recommendations, for a terminal."""
    e, chosen = findings.endpoints, settings(findings)
    found = ", ".join(name for name in ENDPOINT_FIELDS if e.urls[name] is not None)
    missing = ", ".join(name for name in ENDPOINT_FIELDS if e.urls[name] is None)
    rows = [
        ("provider", f"{findings.issuer} (client {findings.client_id})"),
        ("grants spent", str(findings.grants_spent)),
        ("OIDC discovery", "found" if e.oidc else "not found"),
        ("RFC 8414 metadata", f"found at {_path(e.rfc8414_url)}" if e.rfc8414_url else "not found"),
        ("endpoints", found + (f"; not published: {missing}" if missing else "")),
        (
            "rotation",
            "on: each refresh returns a new refresh token" if findings.rotation else "off",
        ),
        ("access token expires_in", _given(findings.access_expires_in)),
        ("refresh token expires_in", _given(findings.refresh_expires_in)),
        ("ID token on refresh", "yes" if findings.id_token_on_refresh else "no"),
        *_reuse_rows(findings),
        ("dead refresh token", _dead(findings.dead)),
        ("old access token after a refresh", _old_access(findings)),
        ("revocation", _revocation(findings)),
        ("the probed grant afterwards", "still alive" if findings.grant_left_alive else "dead"),
    ]
    lines = [_row("measured", "found"), "-" * _WIDTH, *(_row(k, v) for k, v in rows)]
    if findings.reuse is not None:
        lines += ["", *_wrap(_search_bound(findings.reuse, findings.bounds), "")]
    default = {True: " (the default)", False: ""}
    lines += [
        "",
        _row("recommended setting", "value"),
        "-" * _WIDTH,
        _row("coordinator (more than one worker)", chosen.coordinator),
        _row("grace_ttl", _s(chosen.grace_ttl) + default[chosen.grace_ttl == GRACE_TTL]),
        _row("skew", _s(chosen.skew) + default[chosen.skew == SKEW]),
        _row("a lost refresh response", chosen.lost_response),
        "",
        "Recommendations",
    ]
    for item in recommend(findings):
        lines += _wrap(item.text, "- ")
    return "\n".join(lines)


def _given(seconds: float | None) -> str:
    return "not given" if seconds is None else _s(seconds)


def _reuse_rows(findings: Findings) -> list[tuple[str, str]]:
    reuse = findings.reuse
    if reuse is None:
        na = "not applicable (no rotation)"
        return [("reuse of a consumed refresh token", na), ("reuse revokes the family", na)]
    if reuse.policy == "refused":
        what = "refused at once: no grace window"
    elif reuse.policy == "count":
        what = f"accepted {reuse.count} time(s) at once, then refused: a reuse count"
    elif reuse.policy == "window":
        what = (
            f"accepted {_s(reuse.accepted_until or 0.0)} after the rotation, refused at "
            f"{_s(reuse.refused_at or 0.0)}: a grace window between the two"
        )
    else:
        what = f"still accepted {_s(reuse.accepted_until or 0.0)} after the rotation (the bound)"
    answers = {
        "same": "the same token set as the first answer",
        "same_refresh_token": "the newest refresh token, with a new access token",
        "new": "a new refresh token: another branch of the grant",
        None: "-",
    }
    answer = answers[reuse.answer]
    if reuse.answer == "same" and reuse.fresh_expires_in:
        answer += ", expires_in as if new"
    family = {
        True: "yes, the newest refresh token too",
        False: "no, the newest refresh token still works",
        None: "unknown: reuse was never refused",
    }[reuse.revokes_family]
    return [
        ("reuse of a consumed refresh token", what),
        ("answer to an accepted reuse", answer),
        ("reuse revokes the family", family),
    ]


def _dead(dead: Refusal | None) -> str:
    if dead is None:
        return "not seen"
    of = {
        "reused": "a reused one",
        "revoked": "a revoked one",
        "never_issued": "one it never issued",
    }
    return f"HTTP {dead.status} {dead.error} (for {of.get(dead.of, dead.of)})"


def _old_access(findings: Findings) -> str:
    verdict = {"works": "still works", "refused": "refused", "unknown": "unknown"}
    return f"{verdict[findings.old_access_token]} ({findings.old_access_detail})"


def _revocation(findings: Findings) -> str:
    status = findings.revocation_status
    return {
        "supported": f"supported (revoke answered {status})",
        "ineffective": f"answered {status}, but the refresh token kept working",
        "failed": f"failed (revoke answered HTTP {status})",
        "not_published": "not supported (no revocation endpoint published)",
    }[findings.revocation]


def _search_bound(reuse: Reuse, bounds: SearchBounds) -> str:
    """What the reuse search did, and why it stops where it does."""
    if reuse.policy == "refused":
        return (
            "Search: the consumed refresh token was refused at its first reuse, right after "
            "the rotation, so no window was searched."
        )
    if reuse.policy == "count":
        return (
            f"Search: the consumed refresh token was reused at once (up to {bounds.immediate} "
            f"times) until refused; {reuse.accepted} reuse(s) were accepted."
        )
    waits = ", ".join(f"{w:g}" for w in bounds.schedule())
    text = (
        f"Search bound: the consumed refresh token was reused {bounds.immediate} times at "
        f"once, then at {waits} s after the rotation until refused (--max-grace "
        f"{_s(bounds.max_grace)}). The "
        "first refusal ends a grant's search, since it may revoke the grant: one grant places "
        "the window between two tries; each further --refresh-token halves that interval (to "
        f"{_s(bounds.resolution)}). A reuse count above {bounds.immediate} would look like a "
        "window."
    )
    if reuse.grants_used > 1:
        text += f" {reuse.grants_used} grants were used."
    return text


def _row(label: str, value: str) -> str:
    return "\n".join(
        textwrap.wrap(
            value or " ",
            _WIDTH,
            initial_indent=f"{label:<{_LABEL}}",
            subsequent_indent=" " * _LABEL,
            break_on_hyphens=False,
        )
    ).rstrip()


def _wrap(text: str, bullet: str) -> list[str]:
    return textwrap.wrap(
        text, _WIDTH, initial_indent=bullet, subsequent_indent=" " * len(bullet),
        break_on_hyphens=False, break_long_words=False,
    )  # fmt: skip


def _path(url: str) -> str:
    return urlsplit(url).path


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
