"""Command line: ``python -m asgi_token_refresh storm`` (the ``asgi-token-refresh`` script)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._storm import StormReport, run_storm

__all__ = ["main"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _table(reports: Sequence[StormReport]) -> str:
    rows = [
        ("requests", [r.requests for r in reports]),
        ("provider token calls", [r.provider_calls for r in reports]),
        ("invalid_grant answers", [r.invalid_grant for r in reports]),
        ("sessions revoked", [r.sessions_lost for r in reports]),
        ("user-visible failures", [r.failures for r in reports]),
    ]
    header = f"{'':<24}" + "".join(f"{r.mode:>16}" for r in reports)
    lines = [header, "-" * len(header)]
    lines += [f"{label:<24}" + "".join(f"{v:>16,}" for v in values) for label, values in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asgi-token-refresh",
        description="Show what a refresh-token storm does, with and without single-flight.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    storm = commands.add_parser(
        "storm",
        help="in-process storm against a strict fake provider: naive vs single-flight",
    )
    storm.add_argument("--sessions", type=_positive, default=50, help="logged-in users (50)")
    storm.add_argument("--callers", type=_positive, default=20, help="parallel requests (20)")
    storm.add_argument("--rotations", type=_positive, default=3, help="expiry boundaries (3)")
    args = parser.parse_args(argv)

    reports = run_storm(args.sessions, args.callers, args.rotations)
    print(
        f"{args.sessions} sessions x {args.callers} parallel requests x {args.rotations} "
        "expiry boundaries; strict provider (rotation on, reuse revokes the grant)\n"
    )
    print(_table(reports))
    single_flight = reports[-1]
    expected_calls = args.sessions * args.rotations
    if single_flight.sessions_lost or single_flight.failures:
        print("\nFAIL: the single-flight run lost sessions", file=sys.stderr)
        return 1
    print(
        f"\nsingle-flight: {single_flight.provider_calls} provider calls for "
        f"{single_flight.requests:,} requests (one per session per rotation: {expected_calls})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
