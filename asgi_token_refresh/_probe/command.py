"""The ``probe`` command: how does your provider rotate, and what should you configure?

    asgi-token-refresh probe --issuer URL --client-id ID [--client-secret SECRET]
        [--refresh-token TOKEN ...] [--redirect-port 8252] [--max-grace 60] [--json]

It spends the grant it probes (says so first), measures with :mod:`.measure`, prints
:mod:`.report`'s table (or ``--json``) on stdout and its progress on stderr. Exit codes:
0 probed; 2 usage or configuration (arguments, client refused, no refresh token, a spent
token); 1 the provider is unreachable or misbehaving (network, 5xx, answers that are no token
response). Whatever happens, no token is printed: errors carry statuses and OAuth error codes,
never a provider's text unredacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import TextIO
from urllib.parse import urlsplit

from .._clock import SYSTEM_CLOCK, Clock
from .._oauth_messages import ClientAuthMethod
from .findings import Findings, SearchBounds
from .login import SCOPE, browser_login
from .measure import Prober, Sleep
from .provider import ProbeError, ProbeProvider, TokenAnswer
from .report import table, to_json

__all__ = ["add_probe_arguments", "add_probe_command", "run_probe"]

DEFAULT_REDIRECT_PORT = 8252  # after RFC 8252, OAuth for native apps (loopback redirects)
SECRET_ENV = "ASGI_TOKEN_REFRESH_CLIENT_SECRET"
NOTICE = (
    "This probe spends the grant it probes: it refreshes it, reuses a consumed refresh token "
    "on purpose (which may revoke the whole grant) and revokes it at the end. Use a throwaway "
    "login, never a real user's session."
)
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds, not {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 (any free port) to 65535, not {value}")
    return value


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``probe`` options (also for a parser of its own, as the tests build one)."""
    parser.add_argument("--issuer", required=True, metavar="URL", help="the provider's issuer")
    parser.add_argument(
        "--client-id", required=True, metavar="ID", help="a client registered there"
    )
    parser.add_argument(
        "--client-secret",
        metavar="SECRET",
        help=f"its secret, for confidential clients (or set {SECRET_ENV}; a secret in the "
        "command line shows in the process list)",
    )
    parser.add_argument(
        "--auth-method",
        choices=("client_secret_basic", "client_secret_post", "none"),
        help="client authentication (client_secret_basic with a secret, none without)",
    )
    parser.add_argument(
        "--refresh-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="probe this grant instead of logging in (from a throwaway login; '-' reads a "
        "line from stdin). Repeat it with more grants to narrow a grace window",
    )
    parser.add_argument(
        "--redirect-port",
        type=_port,
        default=DEFAULT_REDIRECT_PORT,
        metavar="PORT",
        help=f"the login's loopback redirect, http://127.0.0.1:PORT/callback "
        f"({DEFAULT_REDIRECT_PORT}; 0 picks a free port)",
    )
    parser.add_argument(
        "--login-timeout",
        type=_seconds,
        default=300.0,
        metavar="S",
        help="wait for the login, s (300)",
    )
    parser.add_argument(
        "--max-grace",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="how long after a rotation the reuse search goes on, s (60)",
    )
    parser.add_argument(
        "--timeout", type=_seconds, default=10.0, metavar="S", help="per request, s (10)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (stable keys)")


def add_probe_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``probe`` on the command line's subcommands."""
    parser = commands.add_parser(
        "probe",
        help="measure how a provider rotates refresh tokens, and what to configure "
        "(spends the grant it probes)",
        description="Log in once (or take --refresh-token), then measure the provider's "
        "refresh-token policy: discovery, rotation, lifetimes, reuse of a consumed token "
        "(grace window or count), whether reuse revokes the grant, dead-token answers, old "
        "access tokens, revocation. Ends with recommended settings. " + NOTICE,
    )
    add_probe_arguments(parser)


def run_probe(
    args: argparse.Namespace,
    *,
    clock: Clock | None = None,
    sleep: Sleep | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``probe``; the exit code. ``clock`` and ``sleep`` are for tests."""
    out, err = stdout or sys.stdout, stderr or sys.stderr

    def say(line: str) -> None:
        print(line, file=err, flush=True)

    try:
        provider = _provider(args, clock or SYSTEM_CLOCK)
        tokens = [_read_token(t) for t in args.refresh_token]
    except ProbeError as exc:
        say(f"asgi-token-refresh probe: {exc}")
        return exc.exit_code
    say(NOTICE)
    run = _probe(args, provider, tokens, sleep or asyncio.sleep, say)
    try:
        findings = asyncio.run(run)
    except ProbeError as exc:
        say(f"asgi-token-refresh probe: {provider.redact(str(exc))}")
        return exc.exit_code
    except KeyboardInterrupt:
        say("asgi-token-refresh probe: interrupted (the grant may be half spent: discard it)")
        return 130
    if args.json:
        print(json.dumps(to_json(findings), indent=2), file=out)
    else:
        print(table(findings), file=out)
    if findings.grant_left_alive:
        say("note: the probed grant is still alive (it could not be revoked): discard it")
    return 0


async def _probe(
    args: argparse.Namespace,
    provider: ProbeProvider,
    tokens: list[str],
    sleep: Sleep,
    say: Callable[[str], None],
) -> Findings:
    try:
        say(f"reading {provider.issuer}'s metadata")
        await provider.discover()
        first: TokenAnswer | str
        if tokens:
            first = tokens[0]
        else:
            say(f"logging in (scope {SCOPE!r}, prompt=consent) to get a grant to spend")
            first = await browser_login(
                provider, port=args.redirect_port, patience=args.login_timeout, say=say
            )
        bounds = SearchBounds(max_grace=args.max_grace)
        prober = Prober(provider, clock=provider.clock, sleep=sleep, bounds=bounds, say=say)
        return await prober.run(first, tokens[1:])
    finally:
        await provider.aclose()


def _provider(args: argparse.Namespace, clock: Clock) -> ProbeProvider:
    parts = urlsplit(args.issuer)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProbeError(f"--issuer must be an http(s) URL, not {args.issuer!r}", exit_code=2)
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ProbeError(
            "--issuer must be https (plain http only on loopback): the probe sends the "
            "client secret and refresh tokens",
            exit_code=2,
        )
    secret = args.client_secret or os.environ.get(SECRET_ENV) or None
    method: ClientAuthMethod = args.auth_method or ("client_secret_basic" if secret else "none")
    if method != "none" and not secret:
        raise ProbeError(
            f"--auth-method {method} needs --client-secret (or {SECRET_ENV})", exit_code=2
        )
    return ProbeProvider(
        issuer=args.issuer,
        client_id=args.client_id,
        client_secret=secret if method != "none" else None,
        auth_method=method,
        clock=clock,
        timeout=args.timeout,
    )


def _read_token(value: str) -> str:
    token = sys.stdin.readline().strip() if value == "-" else value.strip()
    if not token:
        raise ProbeError("--refresh-token is empty", exit_code=2)
    return token
