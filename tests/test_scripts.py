"""The command-line smoke script (what ``make demo`` runs) prints baseline vs
steered text and a few status lines, not vLLM's log (a real engine in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

MAX_OUTPUT_LINES = 30
"""The demo's results, its status lines and the warnings vLLM still prints at WARNING."""


@pytest.mark.slow
def test_steering_smoke_script():
    result = subprocess.run(
        [
            sys.executable,
            "scripts/steering_smoke.py",
            "--layer",
            "4",
            "--scale",
            "60",
            "--max-tokens",
            "12",
            "--dtype",
            "float32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert lines["baseline"].strip() != lines["steered (layer 4, |v| = 60)"].strip()
    assert lines["cleared steering restores the baseline"].strip() == "True"
    output = (result.stdout + result.stderr).splitlines()
    assert not [line for line in output if " INFO " in line], "vLLM's INFO log is on by default"
    assert len(output) <= MAX_OUTPUT_LINES, "\n".join(output)
