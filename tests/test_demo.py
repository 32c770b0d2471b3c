"""The demo (the project's main job) over real sockets; real time, kept to a few seconds."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from asgi_token_refresh._demo import (
    REFUSED_AT_REFRESH,
    REFUSED_BY_API,
    DemoConfig,
    DemoReport,
    available_modes,
    run_demo,
)
from asgi_token_refresh._demo_apps import AUTHLIB_MISSING
from asgi_token_refresh._demo_plot import write_png
from asgi_token_refresh._telemetry import OUTCOME, PROVIDER

from .processes import free_port, running, tail

# One burst, when the login tokens (first_burst long) have expired. The tokens it gets last an
# hour: with seconds, a burst that outlasted half a lifetime on a loaded machine would rightly
# refresh again, and the count of provider calls would depend on the machine's speed.
SMALL = DemoConfig(
    sessions=4, tabs=2, parallel=3, rounds=1, first_burst=1.0, token_lifetime=3600.0, latency=0.05
)
# The same on the command line.
SMALL_ARGS = [
    "--sessions", "4", "--tabs", "2", "--parallel", "3", "--rounds", "1",
    "--first-burst", "1", "--token-lifetime", "3600", "--latency", "0.05",
]  # fmt: skip
DEMO = [sys.executable, "-m", "asgi_token_refresh", "demo"]


@pytest.fixture(scope="module")
def reports() -> dict[str, DemoReport]:
    """One run of the three columns, shared by the tests that read it."""
    return {report.mode: report for report in run_demo(SMALL)}


def test_one_run_measures_naive_authlib_and_single_flight_side_by_side(
    reports: dict[str, DemoReport],
) -> None:
    assert list(reports) == ["naive", "authlib", "single-flight"]
    for report in reports.values():
        assert report.requests == 4 * 2 * 3
        assert report.sessions == 4
        # Every failure has its kind; a refused refresh is exactly one failed request.
        assert report.failures == sum(report.failure_kinds.values())
        assert report.failure_kinds[REFUSED_AT_REFRESH] == report.invalid_grant


def test_naive_refresh_loses_sessions(reports: dict[str, DemoReport]) -> None:
    naive = reports["naive"]
    assert naive.sessions_revoked > 0
    assert naive.invalid_grant > 0
    assert naive.failures >= naive.invalid_grant > 0


def test_authlib_clients_per_request_each_refresh_and_lose_sessions(
    reports: dict[str, DemoReport],
) -> None:
    authlib = reports["authlib"]
    # Every session refreshed at least once, no request more than once (no retries).
    assert 4 <= authlib.provider_calls <= authlib.requests
    assert authlib.invalid_grant > 0
    assert authlib.sessions_revoked > 0
    # Failures count the refused refreshes and the requests whose new token died with its grant.
    assert authlib.failures == authlib.invalid_grant + authlib.failure_kinds[REFUSED_BY_API]


def test_single_flight_makes_one_call_per_session_and_keeps_them_all(
    reports: dict[str, DemoReport],
) -> None:
    single_flight = reports["single-flight"]
    assert single_flight.provider_calls == 4  # one per session at the expiry boundary
    assert single_flight.invalid_grant == 0
    assert single_flight.sessions_revoked == 0
    assert single_flight.failures == 0


def test_timelines_timestamp_exactly_what_each_provider_counted(
    reports: dict[str, DemoReport],
) -> None:
    for report in reports.values():
        timeline = report.timeline
        assert len(timeline.refresh_calls) == report.provider_calls
        assert len(timeline.invalid_grant) == report.invalid_grant
        assert len(timeline.revocations) == report.sessions_revoked
        assert len(timeline.bursts) == 1
        events = timeline.refresh_calls + timeline.invalid_grant + timeline.revocations
        # Nothing before the burst (logins do not call the token endpoint), nothing after the end.
        assert all(timeline.bursts[0] <= t <= timeline.end for t in events)


def test_the_picture_is_a_png_that_matplotlib_drew(
    reports: dict[str, DemoReport], tmp_path: Path
) -> None:
    from matplotlib.image import imread

    path = write_png(list(reports.values()), tmp_path / "pictures" / "demo.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"Matplotlib" in data  # its Software text chunk
    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert width > 1000
    assert height > 500
    rgb = (pixels[..., :3] * 255).round()
    # Each column's colour is drawn (its bars, its sessions-alive line), on many pixels.
    for colour in ((0xD6, 0x27, 0x28), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)):
        assert (abs(rgb - colour).max(axis=-1) <= 1).sum() > 500, colour


def test_without_authlib_the_column_is_left_out_with_a_note(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert available_modes() == (("naive", "authlib", "single-flight"), [])
    monkeypatch.setitem(sys.modules, "authlib.integrations.httpx_client", None)
    modes, notes = available_modes()
    assert modes == ("naive", "single-flight")
    assert notes == [AUTHLIB_MISSING]
    assert "Authlib is not installed" in notes[0]


def test_demo_command_prints_the_comparison_writes_the_picture_and_exits_zero(
    tmp_path: Path,
) -> None:
    png = tmp_path / "demo.png"
    result = subprocess.run(
        [*DEMO, *SMALL_ARGS, "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for mode in ("naive:", "authlib:", "single-flight:"):  # the legend, before the table
        assert mode in out.split("------")[0]
    header = next(line for line in out.splitlines() if line.split()[:1] == ["naive"])
    assert header.split() == ["naive", "authlib", "single-flight"]
    assert "sessions revoked" in out
    assert "Why user-visible failures can exceed invalid_grant answers" in out
    assert "vary from run to run" in out
    assert "single-flight: 4 provider calls for 24 requests (one per session per boundary)" in out
    assert f"picture: {png.resolve()}" in out
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("wait", [0.0, 1.5], ids=["starting", "storming"])
def test_ctrl_c_ends_the_demo_with_one_line_and_exit_130(tmp_path: Path, wait: float) -> None:
    """SIGINT while the servers start or while the browsers wait for the first burst (a
    minute away): either way one line on stderr, no traceback, no picture."""
    png = tmp_path / "demo.png"
    command = [*DEMO, "--sessions", "3", "--first-burst", "60", "--png", str(png)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as demo:
        assert demo.stdout is not None
        for line in demo.stdout:  # the header is printed just before the servers start
            if line.startswith("Columns"):
                break
        time.sleep(wait)
        assert demo.poll() is None
        demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=30)
    assert demo.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["interrupted: the demo stopped (no table, no picture)"]
    assert not png.exists()


def _label(attribute: str) -> str:
    """The Prometheus label the exporter makes of an attribute key."""
    return re.sub(r"[^A-Za-z0-9_]", "_", attribute)


def test_serve_mode_exposes_library_metrics_for_prometheus(tmp_path: Path) -> None:
    port = free_port()
    command = [
        *DEMO, "--serve", "--metrics-port", str(port), "--duration", "4", "--sessions", "3",
        "--tabs", "2", "--parallel", "2", "--token-lifetime", "1",
    ]  # fmt: skip
    log = tmp_path / "demo.log"
    invalid_grant = f'{_label(OUTCOME)}="invalid_grant"'
    with running(command, log=log) as demo:
        text = ""
        deadline = time.monotonic() + 30
        while "asgi_token_refresh_refreshes_total" not in text or invalid_grant not in text:
            assert time.monotonic() < deadline, text[-2000:]
            assert demo.poll() is None, tail(log)
            with contextlib.suppress(httpx.TransportError):
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            time.sleep(0.2)
        providers = set(re.findall(rf'[{{,]{_label(PROVIDER)}="([^"]+)"', text))
        assert providers == {"naive", "single-flight"}
        assert demo.wait(timeout=30) == 0
