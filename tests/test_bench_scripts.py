"""The benchmark scripts that need no engine still run against the runtime's
current API, and bench/README.md is what its template and results make."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_capture_host_cost_runs_on_the_capture_store():
    result = run("bench/capture_host_cost.py", "--layers", "1", "--requests", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [ast.literal_eval(line) for line in result.stdout.splitlines()]
    assert [entry["run"] for entry in runs] == ["fresh files", "recycled files"]
    assert all(entry["rows_written_s"] > 0 for entry in runs)


def test_bench_readme_is_made_from_its_template_and_results():
    result = run("bench/report.py", "--check")
    assert result.returncode == 0, result.stderr
