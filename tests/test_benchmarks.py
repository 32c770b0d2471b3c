"""The benchmark scripts keep working (tiny sizes; they assert call counts, never timings)."""

import subprocess
import sys
from pathlib import Path

from .processes import RedisServer

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_refresher_benchmark_runs_quick_and_checks_its_call_counts(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "refresher.py"), "--quick", "--no-compare"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "provider calls" in result.stdout


def test_overhead_benchmark_runs_quick_and_checks_the_fresh_path(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "overhead.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "throughput vs A" in result.stdout


def test_distributed_benchmark_runs_quick_against_the_test_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "distributed.py"),
            "--quick",
            "--redis-url",
            redis_server.url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "| two processes, one grant | leader | 2 |" in result.stdout
    assert "| two processes, one grant | follower | 2 |" in result.stdout
    assert "`ensure_fresh` calls | both | 0 |" in result.stdout
    assert "| 4 | storm |" in result.stdout
    # Its keys live under a prefix of their own and are deleted afterwards.
    assert redis_server.cli("--scan", "--pattern", "atr-bench-*") == ""
