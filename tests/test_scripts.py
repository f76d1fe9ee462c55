"""The command-line smoke script prints baseline vs steered text (a real engine in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


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
