"""The notebook layer: one engine per kernel, a loop-thread bridge, figures and panels."""

from workbench.notebook.bridge import LoopThread
from workbench.notebook.editor import RowState
from workbench.notebook.engine import EngineConfigError, NotebookEngine, get_engine, shutdown_engine
from workbench.notebook.panels import Workbench

__all__ = [
    "EngineConfigError",
    "LoopThread",
    "NotebookEngine",
    "RowState",
    "Workbench",
    "get_engine",
    "shutdown_engine",
]
