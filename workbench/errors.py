"""Exceptions raised by workbench.

    WorkbenchError                      base of everything raised on purpose
    ├── SpecError (ValueError)          a steering spec or vector is malformed
    │   ├── HiddenSizeError             a vector's size differs from the model's hidden size
    │   └── LayerIndexError (IndexError) a layer index outside the model
    ├── CaptureError                    capture requested or read wrongly
    │   └── HandleReleasedError         a capture handle whose data was released
    ├── ChatError (ValueError)          a conversation cannot be formatted
    ├── PromptError (ValueError, TypeError) a prompt is empty, too long or not text/token ids
    ├── EngineClosedError (RuntimeError) the model was used after close()
    ├── EngineDeadError (RuntimeError)   the engine's processes died
    ├── WorkerTimeoutError (TimeoutError) a worker RPC got no answer in time
    └── EmbeddedModelError (RuntimeError) the embedded model cannot be prepared

Every message names the offending value, so a notebook user sees what to fix.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base class of workbench's own errors."""


class SpecError(WorkbenchError, ValueError):
    """A steering spec, vector or scale is malformed."""


class HiddenSizeError(SpecError):
    """A vector's size differs from the model's hidden size."""


class LayerIndexError(SpecError, IndexError):
    """A layer index is outside the model."""


class CaptureError(WorkbenchError):
    """A capture was requested or read in a way that cannot work."""


class HandleReleasedError(CaptureError):
    """The capture handle's data has been released or never fetched."""


class ChatError(WorkbenchError, ValueError):
    """A conversation cannot be formatted into a prompt."""


class PromptError(WorkbenchError, ValueError, TypeError):
    """A prompt list is empty, a prompt is longer than the engine allows, or
    a prompt is neither text nor token ids."""


class EngineClosedError(WorkbenchError, RuntimeError):
    """The model was used after ``close()``."""


class EngineDeadError(WorkbenchError, RuntimeError):
    """The engine's processes died; start a new ``VLLMSteerModel`` (or call
    ``workbench.notebook.get_engine()``, which restarts it)."""


class WorkerTimeoutError(WorkbenchError, TimeoutError):
    """A worker RPC got no answer within ``VLLMSteeringConfig.rpc_timeout_s``."""


class EmbeddedModelError(WorkbenchError, RuntimeError):
    """The embedded default model cannot be prepared."""
