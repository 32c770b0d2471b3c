"""Command line (also the ``asgi-token-refresh`` script).

``demo``: a refresh storm over loopback against a strict provider, naive vs single-flight
(``--serve`` keeps it running with Prometheus metrics). ``storm``: the same comparison
in-process on a fake clock, in a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._storm import StormReport, run_storm, side_by_side

__all__ = ["main"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from ._demo import DemoConfig, format_reports, run_demo, serve_demo

    config = DemoConfig(
        sessions=args.sessions,
        tabs=args.tabs,
        parallel=args.parallel,
        rounds=args.rounds,
        token_lifetime=args.token_lifetime or (35.0 if args.serve else 4.0),
        first_burst=args.first_burst,
        latency=args.latency,
        host=args.host,
    )
    if args.serve:
        serve_demo(config, args.metrics_port, args.duration)
        return 0
    per_round = config.sessions * config.tabs * config.parallel
    print(
        f"{config.sessions} sessions x {config.tabs} tabs x {config.parallel} parallel requests "
        f"({per_round:,} per burst) x {config.rounds} expiry boundaries, over loopback.\n"
        f"Strict provider: rotating refresh tokens, reuse revokes the grant, "
        f"{config.token_lifetime:g} s access tokens.\n",
        flush=True,
    )
    naive, single_flight = run_demo(config)
    print("\n" + format_reports([naive, single_flight]))
    if single_flight.sessions_revoked or single_flight.failures or single_flight.invalid_grant:
        print("\nFAIL: the single-flight run lost sessions", file=sys.stderr)
        return 1
    print(
        f"\nsingle-flight: {single_flight.provider_calls} provider calls for "
        f"{single_flight.requests:,} requests, no session lost; "
        f"naive: {naive.sessions_revoked} of {config.sessions} sessions revoked."
    )
    return 0


def _table(reports: Sequence[StormReport]) -> str:
    rows = [
        ("requests", [r.requests for r in reports]),
        ("provider token calls", [r.provider_calls for r in reports]),
        ("invalid_grant answers", [r.invalid_grant for r in reports]),
        ("sessions revoked", [r.sessions_lost for r in reports]),
        ("user-visible failures", [r.failures for r in reports]),
    ]
    formatted = [(label, [f"{v:,}" for v in values]) for label, values in rows]
    return side_by_side([r.mode for r in reports], formatted)


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
    demo = commands.add_parser(
        "demo", help="a storm over loopback with uvicorn: naive vs single-flight (the main job)"
    )
    demo.add_argument("--sessions", type=_positive, default=20, help="logged-in users (20)")
    demo.add_argument("--tabs", type=_positive, default=3, help="tabs per user (3)")
    demo.add_argument("--parallel", type=_positive, default=3, help="requests per tab (3)")
    demo.add_argument("--rounds", type=_positive, default=3, help="expiry boundaries (3)")
    demo.add_argument(
        "--token-lifetime",
        type=_seconds,
        help="access-token lifetime, s (4; 35 with --serve, so that steady single-flight "
        "refreshes stay apart from the 30 s storm threshold of the dashboards)",
    )
    demo.add_argument(
        "--first-burst",
        type=_seconds,
        help="seconds from login to the first burst: the login tokens expire then (default: "
        "the token lifetime); the next bursts follow every token lifetime",
    )
    demo.add_argument("--latency", type=_seconds, default=0.02, help="provider latency, s")
    demo.add_argument("--host", default="127.0.0.1", help="where to serve (127.0.0.1)")
    demo.add_argument("--serve", action="store_true", help="keep storming; expose metrics")
    demo.add_argument("--metrics-port", type=int, default=9464, help="with --serve (9464)")
    demo.add_argument("--duration", type=_seconds, help="with --serve: stop after seconds")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)

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
