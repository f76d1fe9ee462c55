"""Docs, docstrings and comments speak of the product and its measurements,
not of how it was developed (that history is CHANGELOG.md's, by version)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent

DEVELOPMENT_WORDS = re.compile(
    r"\bsession[ -]?\d|results/session|\blent\b|\blease[ds]?\b|\bthe issue\b|\bissue #?\d|device tool",
    re.IGNORECASE,
)
"""Work sessions, the machines lent for development, the tracker's issues."""


def checked_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "Makefile"]
    for folder in ("workbench", "bench", "scripts", "tests", "notebooks", ".ci"):
        files += [path for path in (ROOT / folder).rglob("*") if path.suffix in ("", ".py", ".sh", ".ipynb", ".md")]
    return sorted({path for path in files if path.is_file() and path != Path(__file__)})


def test_no_development_history_in_docs_and_code():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}"
        for path in checked_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if DEVELOPMENT_WORDS.search(line)
    ]
    assert found == []


def test_result_files_are_named_by_date_card_and_commit():
    names = [path.name for path in (ROOT / "bench" / "results").rglob("*") if path.is_file()]
    pattern = re.compile(r"\d{4}-\d{2}-\d{2}-[a-z0-9_-]+-[0-9a-f]{7,}(-[a-z0-9-]+)?\.(json|txt)")
    assert names and [name for name in names if not pattern.fullmatch(name)] == []
    assert not [path for path in (ROOT / "bench" / "results").iterdir() if path.is_dir()]
