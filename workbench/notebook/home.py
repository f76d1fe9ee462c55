"""Where the workbench writes: saved vectors, sessions, exported figures and
the engine's log, all under one folder outside any source checkout.

``$WORKBENCH_HOME`` when set, else ``$XDG_DATA_HOME/workbench`` (by default
``~/.local/share/workbench``).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "WORKBENCH_HOME"


def workbench_home() -> Path:
    if override := os.environ.get(HOME_ENV):
        return Path(override).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "workbench"


def vectors_dir() -> Path:
    return workbench_home() / "vectors"


def sessions_dir() -> Path:
    return workbench_home() / "sessions"


def exports_dir() -> Path:
    return workbench_home() / "exports"


def engine_log_path() -> Path:
    """This kernel's engine log (one file per process, so kernels never share one)."""
    return workbench_home() / "logs" / f"engine-{os.getpid()}.log"
