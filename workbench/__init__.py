"""workbench: steering and activation capture on vLLM, and a Jupyter workbench over it.

The client API (this package's top level) runs in your process; the code in
``workbench.runtime`` runs inside vLLM's worker processes; ``workbench.wire``
is all that crosses between the two. ``workbench.notebook`` is the
JupyterLab workbench; nothing else imports UI code.

Importing workbench sets vLLM's log level to WARNING unless you chose one
(``WORKBENCH_LOG_LEVEL=INFO`` or ``VLLM_LOGGING_LEVEL`` brings its log back).
"""

__version__ = "0.2.0"

from workbench.logs import quiet_vllm

quiet_vllm()

from workbench.capture import CaptureHandle, MessageBoundary  # noqa: E402
from workbench.chat import ChatResponse  # noqa: E402
from workbench.completion import Completion  # noqa: E402
from workbench.config import VLLMSteeringConfig  # noqa: E402
from workbench.embedded import DEFAULT_MODEL_NAME  # noqa: E402
from workbench.errors import (  # noqa: E402
    CaptureBudgetError,
    CaptureError,
    CaptureIndexError,
    CaptureLimitError,
    CaptureNotFetchedError,
    CapturePendingError,
    ChatError,
    DtypeRangeError,
    EmbeddedModelError,
    EngineClosedError,
    EngineConfigError,
    EngineDeadError,
    EngineStartError,
    EngineTimeoutError,
    ExtractError,
    HandleReleasedError,
    HiddenSizeError,
    LayerIndexError,
    PromptError,
    RowSpaceError,
    SessionError,
    SpecError,
    SpecNotFoundError,
    UnsupportedModelError,
    WorkbenchError,
    WorkerTimeoutError,
)
from workbench.extract_reader import ActivationReader, ExtractedPrompt  # noqa: E402
from workbench.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec  # noqa: E402


def __getattr__(name: str) -> object:
    # The clients import vLLM's engine or httpx; keep `import workbench` light for spec and HF-only use.
    if name == "VLLMSteerModel":
        from workbench.client import VLLMSteerModel

        return VLLMSteerModel
    if name == "RemoteSteerModel":  # the server's client: no vLLM needed
        from workbench.remote import RemoteSteerModel

        return RemoteSteerModel
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL_NAME",
    "AblationSpec",
    "ActivationReader",
    "AddSpec",
    "CaptureBudgetError",
    "CaptureError",
    "CaptureHandle",
    "CaptureIndexError",
    "CaptureLimitError",
    "CaptureNotFetchedError",
    "CapturePendingError",
    "ChatError",
    "ChatResponse",
    "Completion",
    "DtypeRangeError",
    "EmbeddedModelError",
    "EngineClosedError",
    "EngineConfigError",
    "EngineDeadError",
    "EngineStartError",
    "EngineTimeoutError",
    "ExtractError",
    "ExtractedPrompt",
    "HandleReleasedError",
    "HiddenSizeError",
    "LayerIndexError",
    "LayerSteeringSpec",
    "MessageBoundary",
    "ProjectionCapSpec",
    "PromptError",
    "RemoteSteerModel",
    "RowSpaceError",
    "SessionError",
    "SpecError",
    "SpecNotFoundError",
    "SteeringSpec",
    "UnsupportedModelError",
    "VLLMSteerModel",
    "VLLMSteeringConfig",
    "WorkbenchError",
    "WorkerTimeoutError",
    "__version__",
]
