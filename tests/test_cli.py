import subprocess
import sys

import pytest

from asgi_token_refresh.__main__ import main
from asgi_token_refresh._storm import run_storm


def test_naive_refresh_loses_every_session_and_single_flight_loses_none() -> None:
    naive, single_flight = run_storm(sessions=10, callers=8, rotations=3)
    assert naive.provider_calls == naive.requests  # every request calls; dead sessions too
    assert naive.sessions_lost == 10
    assert naive.invalid_grant > 0
    # A winner may call the API before another request's reuse revokes its grant; no more.
    assert naive.failures >= naive.requests - 10
    assert single_flight.provider_calls == 10 * 3  # one per session per rotation
    assert single_flight.invalid_grant == 0
    assert single_flight.sessions_lost == 0
    assert single_flight.failures == 0
    assert single_flight.requests == 10 * 8 * 3


def test_storm_command_prints_the_comparison_and_exits_zero(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["storm", "--sessions", "4", "--callers", "5", "--rotations", "2"]) == 0
    out = capsys.readouterr().out
    assert "provider token calls" in out
    assert "single-flight: 8 provider calls for 40 requests" in out


def test_bad_arguments_are_refused_with_a_clear_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asgi_token_refresh", "storm", "--sessions", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "must be at least 1" in result.stderr
