"""Every notebook in notebooks/ runs top to bottom in a fresh kernel (nbclient), quietly."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

LOG_LINE = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR)\b|\((EngineCore|MainProcess|Worker)|\bWarning:")
"""A vLLM or torch log line, or a Python warning."""

COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def printed(cell) -> str:
    """What a cell printed, terminal colours removed."""
    streams = [output.get("text", "") for output in cell.get("outputs", []) if output.get("output_type") == "stream"]
    return COLOUR.sub("", "".join(streams))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    # Run in a scratch folder, with the workbench's files there too, so nothing lands in the repository.
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    logs = [line for cell in notebook.cells for line in printed(cell).splitlines() if LOG_LINE.search(line)]
    assert logs == []
    assert len(NOTEBOOKS) == 3
