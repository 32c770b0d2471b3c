"""The demo (the project's main job) over real sockets; real time, kept to a few seconds."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from asgi_token_refresh._demo import DemoConfig, run_demo

from .processes import free_port, running, tail

# One burst, when the login tokens (first_burst long) have expired. The tokens it gets last an
# hour: with seconds, a burst that outlasted half a lifetime on a loaded machine would rightly
# refresh again, and the count of provider calls would depend on the machine's speed.
SMALL = DemoConfig(
    sessions=4, tabs=2, parallel=3, rounds=1, first_burst=1.0, token_lifetime=3600.0, latency=0.05
)


def test_naive_refresh_loses_sessions_and_single_flight_keeps_them_all() -> None:
    naive, single_flight = run_demo(SMALL)
    assert naive.requests == single_flight.requests == 4 * 2 * 3
    assert naive.sessions_revoked > 0
    assert naive.invalid_grant > 0
    assert naive.failures > 0
    assert single_flight.provider_calls == 4  # one per session at the expiry boundary
    assert single_flight.invalid_grant == 0
    assert single_flight.sessions_revoked == 0
    assert single_flight.failures == 0


def test_serve_mode_exposes_library_metrics_for_prometheus(tmp_path: Path) -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "asgi_token_refresh", "demo", "--serve",
        "--metrics-port", str(port), "--duration", "4", "--sessions", "3",
        "--tabs", "2", "--parallel", "2", "--token-lifetime", "1",
    ]  # fmt: skip
    log = tmp_path / "demo.log"
    with running(command, log=log) as demo:
        text = ""
        deadline = time.monotonic() + 30
        while (
            "asgi_token_refresh_refreshes_total" not in text
            or 'outcome="invalid_grant"' not in text
        ):
            assert time.monotonic() < deadline, text[-2000:]
            assert demo.poll() is None, tail(log)
            with contextlib.suppress(httpx.TransportError):
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            time.sleep(0.2)
        providers = set(re.findall(r'provider="([^"]+)"', text))
        assert providers == {"naive", "single-flight"}
        assert demo.wait(timeout=30) == 0


def test_demo_command_prints_the_comparison_and_exits_zero() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "asgi_token_refresh",
            "demo",
            "--sessions",
            "3",
            "--tabs",
            "2",
            "--parallel",
            "2",
            "--rounds",
            "1",
            "--first-burst",
            "1",
            "--token-lifetime",
            "3600",  # as SMALL above: the refreshed tokens never fall due during the burst
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "sessions revoked" in result.stdout
    assert "single-flight: 3 provider calls for 12 requests, no session lost" in result.stdout
