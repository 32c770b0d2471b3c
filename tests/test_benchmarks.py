"""The benchmark scripts keep working (tiny sizes; they assert call counts, never timings)."""

import subprocess
import sys
from pathlib import Path

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
