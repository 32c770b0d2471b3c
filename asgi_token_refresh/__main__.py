"""Command line (also the ``asgi-token-refresh`` script).

``demo``: a refresh storm over loopback against a strict provider, naive vs Authlib vs
single-flight, with a table and a picture (``--serve`` keeps naive and single-flight running
with Prometheus metrics). ``storm``: the same comparison
in-process on a fake clock, in a second.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ._dashboards import add_dashboards_command, run_dashboards
from ._probe import add_probe_command, run_probe
from ._storm import StormReport, run_storm, side_by_side

if TYPE_CHECKING:
    from ._demo import DemoConfig, DemoReport

__all__ = ["main"]

#: Where the demo's picture goes by default: the working directory (this repo ignores it).
DEFAULT_PNG = "asgi-token-refresh-demo.png"


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
    # Ctrl-C ends the demo, even when it was started with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run_demo(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the demo stopped (no table, no picture)", file=sys.stderr)
        return 130


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import (
        AUTHLIB_NOTE,
        NOTES,
        DemoConfig,
        available_modes,
        format_reports,
        legend,
        run_demo,
    )

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
        from ._demo import serve_demo

        serve_demo(config, args.metrics_port, args.duration)
        return 0
    modes, missing = available_modes()
    for note in missing:
        print(f"note: {note}", file=sys.stderr)
    per_round = config.sessions * config.tabs * config.parallel
    print(
        f"{config.sessions} sessions x {config.tabs} tabs x {config.parallel} parallel requests "
        f"({per_round:,} per burst) x {config.rounds} expiry boundaries, over loopback.\n"
        f"Strict provider: rotating refresh tokens, reuse revokes the grant, "
        f"{config.token_lifetime:g} s access tokens.\n"
        f"Columns, one after the other, each against a provider of its own:\n{legend(modes)}\n",
        flush=True,
    )
    reports = run_demo(config, modes=modes)
    notes = NOTES + ("\n" + AUTHLIB_NOTE if "authlib" in modes else "")
    print("\n" + format_reports(reports) + "\n\n" + notes + "\n")
    single_flight = reports[-1]
    expected_calls = config.sessions * config.rounds
    lost = single_flight.sessions_revoked or single_flight.failures or single_flight.invalid_grant
    if lost or single_flight.provider_calls != expected_calls:
        print(
            f"FAIL: single-flight made {single_flight.provider_calls} provider calls (expected "
            f"{expected_calls}: one per session per boundary), "
            f"{single_flight.sessions_revoked} sessions lost, {single_flight.failures} failures",
            file=sys.stderr,
        )
        return 1
    others = "; ".join(
        f"{r.mode}: {r.sessions_revoked} of {config.sessions} sessions revoked"
        for r in reports[:-1]
    )
    print(
        f"single-flight: {single_flight.provider_calls} provider calls for "
        f"{single_flight.requests:,} requests (one per session per boundary), no session lost; "
        f"{others}."
    )
    _picture(reports, args.png, config)
    return 0


def _picture(reports: Sequence[DemoReport], path: Path, config: DemoConfig) -> None:
    from ._demo_plot import MATPLOTLIB_MISSING, write_png

    title = (
        f"{config.sessions} sessions x {config.tabs * config.parallel} parallel requests at each "
        f"of {config.rounds} expiry boundaries (dotted); strict provider"
    )
    try:
        written = write_png(reports, path, title=title)
    except ImportError:
        print(MATPLOTLIB_MISSING, file=sys.stderr)
        return
    print(f"picture: {written.resolve()}")


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
        "demo",
        help="a storm over loopback with uvicorn: naive vs authlib vs single-flight, a table and "
        "a picture (the main job)",
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
    demo.add_argument(
        "--png",
        type=Path,
        default=Path(DEFAULT_PNG),
        help=f"where to write the picture ({DEFAULT_PNG} in the working directory; "
        "not with --serve)",
    )
    add_dashboards_command(commands)  # dashboards --out DIR: the dashboard, rules, provisioning
    add_probe_command(commands)  # probe --issuer URL --client-id ID: the provider's policy
    args = parser.parse_args(argv)
    if args.command == "dashboards":
        return run_dashboards(args)
    if args.command == "probe":
        return run_probe(args)
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
