"""The notebook layer: one engine per kernel, a loop-thread bridge, figures and panels."""

from workbench.notebook.bridge import LoopThread
from workbench.notebook.engine import EngineConfigError, NotebookEngine, get_engine, shutdown_engine

__all__ = ["EngineConfigError", "LoopThread", "NotebookEngine", "get_engine", "shutdown_engine"]
