"""Exceptions raised by workbench.

    WorkbenchError                          base of everything raised on purpose
    ├── SpecError (ValueError)              a steering spec or vector is malformed
    │   ├── HiddenSizeError                 a vector's size differs from the model's hidden size
    │   ├── LayerIndexError (IndexError)    a layer index outside the model
    │   ├── DtypeRangeError                 a value the model's dtype cannot hold
    │   └── SpecNotFoundError               no spec or vector of that name (a server's --steering-dir)
    ├── CaptureError                        capture requested or read wrongly
    │   ├── HandleReleasedError             a capture handle whose data was released
    │   ├── CaptureNotFetchedError (RuntimeError)  rows read before they were fetched
    │   ├── CaptureIndexError (ValueError, IndexError)  a message or layer not in the capture
    │   ├── CapturePendingError             a server capture fetched while its request still runs
    │   ├── CaptureLimitError               a server holds all the unfetched captures its memory limit allows
    │   ├── CaptureBudgetError (ValueError) a capture larger than the whole capture budget
    │   └── RowSpaceError (OSError)         the worker cannot store captured rows
    ├── ChatError (ValueError)              a conversation cannot be formatted
    ├── ExtractError (ValueError)           an extraction folder holds another extraction, or is damaged
    ├── PromptError (ValueError, TypeError) a prompt is empty, too long or not text/token ids
    ├── EngineClosedError (RuntimeError)    the model was used after close()
    ├── EngineDeadError (RuntimeError)      the engine's processes died
    ├── EngineStartError (RuntimeError)     the engine failed to start (vLLM's reason inside)
    ├── EngineConfigError (ValueError)      engine settings that cannot work (together, or with the running one)
    ├── EngineTimeoutError (TimeoutError)   an engine call did not finish in time
    │   └── WorkerTimeoutError              a worker RPC got no answer in time
    ├── SessionError (ValueError)           a saved workbench session is missing or malformed
    ├── UnsupportedModelError (TypeError)   a model whose decoder layers cannot be steered exactly
    └── EmbeddedModelError (RuntimeError)   the embedded model cannot be prepared

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


class DtypeRangeError(SpecError):
    """A vector, scale or bound holds values the model's dtype cannot represent
    in the residual stream (they would turn it into inf or NaN)."""


class SpecNotFoundError(SpecError):
    """No steering spec or vector of that name among a server's ``--steering-dir`` folders."""


class CaptureError(WorkbenchError):
    """A capture was requested or read in a way that cannot work."""


class HandleReleasedError(CaptureError):
    """The capture handle's data has been released (closed, or fetched elsewhere)."""


class CaptureNotFetchedError(CaptureError, RuntimeError):
    """The capture's rows were read before ``fetch()`` / ``fetch_captures_batch``."""


class CaptureIndexError(CaptureError, ValueError, IndexError):
    """A message index or layer that the capture does not have."""


class CapturePendingError(CaptureError):
    """A server capture was fetched while its request still runs (fetch it once the reply is complete)."""


class CaptureLimitError(CaptureError):
    """A server already holds as many unfetched captures as its ``--capture-memory-gib`` allows;
    fetch or delete some (or let them expire) and ask again."""


class CaptureBudgetError(CaptureError, ValueError):
    """A request's capture could need more bytes than the whole capture budget
    (``VLLMSteeringConfig.capture_budget_bytes``), so it could never run; or the budget itself is invalid."""


class RowSpaceError(CaptureError, OSError):
    """The worker could not map capture rows (address space or shared memory exhausted)."""


class ChatError(WorkbenchError, ValueError):
    """A conversation cannot be formatted into a prompt."""


class ExtractError(WorkbenchError, ValueError):
    """An extraction folder holds an extraction of other prompts or settings,
    or its index or shards are missing or malformed."""


class PromptError(WorkbenchError, ValueError, TypeError):
    """A prompt list is empty, a prompt is longer than the engine allows, or
    a prompt is neither text nor token ids."""


class EngineClosedError(WorkbenchError, RuntimeError):
    """The model was used after ``close()``."""


class EngineDeadError(WorkbenchError, RuntimeError):
    """The engine's processes died; start a new ``VLLMSteerModel`` (or call
    ``workbench.notebook.get_engine()``, which restarts it)."""


class EngineStartError(WorkbenchError, RuntimeError):
    """The engine failed to start; the message carries vLLM's own reason."""


class EngineConfigError(WorkbenchError, ValueError):
    """Engine settings that cannot work: options a steered engine cannot take
    together, or another configuration than the kernel's running engine has."""


class EngineTimeoutError(WorkbenchError, TimeoutError):
    """An engine call did not finish within its time limit."""


class WorkerTimeoutError(EngineTimeoutError):
    """A worker RPC got no answer within ``VLLMSteeringConfig.rpc_timeout_s``."""


class SessionError(WorkbenchError, ValueError):
    """A saved workbench session folder is missing, incomplete or malformed."""


class UnsupportedModelError(WorkbenchError, TypeError):
    """The model's decoder layers cannot be found, or steered exactly; the
    engine refuses it at start-up rather than serve wrong numbers."""


class EmbeddedModelError(WorkbenchError, RuntimeError):
    """The embedded default model cannot be prepared."""
