import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from asgi_token_refresh import _dashboards
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


# -- asgi-token-refresh dashboards --------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {
    "dashboards/asgi-token-refresh.json": ROOT / "dashboards" / "asgi-token-refresh.json",
    "prometheus/alerts.yaml": ROOT / "dashboards" / "alerts.yaml",
}
PROVISIONING = {
    "provisioning/datasources/asgi-token-refresh.yaml",
    "provisioning/dashboards/asgi-token-refresh.yaml",
}


def _written(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def _check_output(out: Path, *, prometheus_url: str, dashboards_path: Path | str) -> None:
    assert _written(out) == set(SHIPPED) | PROVISIONING
    for relative, source in SHIPPED.items():
        assert (out / relative).read_bytes() == source.read_bytes(), relative
    [datasource] = yaml.safe_load((out / sorted(PROVISIONING)[1]).read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == prometheus_url
    assert datasource["isDefault"] is False  # a Grafana of yours may have its default already
    [provider] = yaml.safe_load((out / sorted(PROVISIONING)[0]).read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["allowUiUpdates"] is False
    assert provider["options"]["path"] == str(dashboards_path)


def test_dashboards_writes_the_dashboard_rules_and_provisioning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "observability"
    assert main(["dashboards", "--out", str(out)]) == 0
    _check_output(out, prometheus_url="http://127.0.0.1:9090", dashboards_path=out / "dashboards")
    printed = capsys.readouterr().out
    assert f"wrote 4 files to {out}" in printed
    assert f"add {out / 'prometheus' / 'alerts.yaml'} to rule_files" in printed

    # A Grafana in a container: its own path for the JSON; the Prometheus it reaches.
    other = tmp_path / "container"
    argv = [
        "dashboards", "--out", str(other), "--prometheus-url", "https://prometheus.internal:9443",
        "--grafana-dashboards-path", "/var/lib/grafana/dashboards/atr", "--scrape-interval", "30s",
    ]  # fmt: skip
    assert main(argv) == 0
    _check_output(
        other,
        prometheus_url="https://prometheus.internal:9443",
        dashboards_path="/var/lib/grafana/dashboards/atr",
    )
    datasource = yaml.safe_load((other / sorted(PROVISIONING)[1]).read_text())["datasources"][0]
    assert datasource["jsonData"]["timeInterval"] == "30s"


def test_dashboards_refuses_to_overwrite_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dashboards", "--out", str(tmp_path)]) == 0
    edited = tmp_path / "prometheus" / "alerts.yaml"
    edited.write_text("# mine\n")
    mine = tmp_path / "dashboards" / "other.json"
    mine.write_text("{}")
    capsys.readouterr()

    assert main(["dashboards", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite (pass --force to replace them)" in err
    assert str(edited) in err
    assert edited.read_text() == "# mine\n"  # nothing written when one file is refused

    assert main(["dashboards", "--out", str(tmp_path), "--force"]) == 0
    assert edited.read_bytes() == SHIPPED["prometheus/alerts.yaml"].read_bytes()
    assert mine.read_text() == "{}"  # files that are not the command's are left alone


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: --out"),
        (["--prometheus-url", "prometheus:9090"], "--prometheus-url must be an http(s) URL"),
        (["--prometheus-url", "http://"], "--prometheus-url must be an http(s) URL"),
        (["--scrape-interval", "15"], "--scrape-interval must be a Prometheus duration"),
        (["--scrape-interval", "1.5s"], "--scrape-interval must be a Prometheus duration"),
        (["--grafana-dashboards-path", "dashboards"], "--grafana-dashboards-path must be absolute"),
        (["--out", "{file}"], "exists and is not a directory"),
        (["--out", "{file}/below"], "exists and is not a directory"),
    ],
)
def test_dashboards_bad_input_exits_2_with_a_clear_message(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    if "--out" not in argv and argv:
        argv = ["--out", str(tmp_path / "out"), *argv]
    argv = [arg.replace("{file}", str(a_file)) for arg in argv]
    result = subprocess.run(
        [sys.executable, "-m", "asgi_token_refresh", "dashboards", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_checkout_reads_the_shipped_files_from_dashboards() -> None:
    # Not installed from a wheel here (an editable install): the one source, dashboards/.
    assert (
        _dashboards.shipped("asgi-token-refresh.json")
        == SHIPPED["dashboards/asgi-token-refresh.json"].read_bytes()
    )
    assert _dashboards.shipped("alerts.yaml") == SHIPPED["prometheus/alerts.yaml"].read_bytes()
    with pytest.raises(ValueError, match="not a shipped file"):
        _dashboards.shipped("RUNBOOK.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from this checkout, as pip users get it."""
    folder = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--quiet", "-w", folder],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [built] = folder.glob("asgi_token_refresh-*.whl")
    return built


def test_the_wheel_ships_the_dashboard_and_the_rules_unchanged(wheel: Path) -> None:
    # One source, dashboards/; the wheel's copies are made from it at build time
    # (pyproject.toml's force-include), byte for byte: they cannot drift.
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name, source in (
            (
                "asgi_token_refresh/dashboards/asgi-token-refresh.json",
                SHIPPED["dashboards/asgi-token-refresh.json"],
            ),
            ("asgi_token_refresh/dashboards/alerts.yaml", SHIPPED["prometheus/alerts.yaml"]),
        ):
            assert name in names
            assert archive.read(name) == source.read_bytes(), name
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert (
            "asgi-token-refresh = asgi_token_refresh.__main__:main"
            in archive.read(entry_points).decode()
        )
    # The tools that make and check them stay in the repository.
    assert not any(n.startswith("dashboards/") or n.endswith("generate.py") for n in names)


def test_the_installed_wheel_writes_them_out(wheel: Path, tmp_path: Path) -> None:
    # The wheel unpacked as site-packages would hold it, first on the path; run from elsewhere
    # so that this checkout is not importable.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    environment = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import asgi_token_refresh; print(asgi_token_refresh.__file__)"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=environment, timeout=60,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(site)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "asgi_token_refresh", "dashboards", "--out", str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=tmp_path, env=environment,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _check_output(out, prometheus_url="http://127.0.0.1:9090", dashboards_path=out / "dashboards")
    again = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=tmp_path, env=environment,
        timeout=60,
    )  # fmt: skip
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr
