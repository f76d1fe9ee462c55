"""workbench: steering and activation capture on vLLM, and a Jupyter workbench over it.

The runtime (this package minus ``workbench.notebook``) imports no UI code.
"""

__version__ = "0.1.0"

from workbench.capture import CaptureHandle, MessageBoundary
from workbench.chat import ChatResponse
from workbench.embedded import DEFAULT_MODEL_NAME
from workbench.errors import (
    CaptureError,
    ChatError,
    EmbeddedModelError,
    EngineClosedError,
    EngineDeadError,
    HandleReleasedError,
    HiddenSizeError,
    LayerIndexError,
    PromptError,
    SpecError,
    WorkbenchError,
    WorkerTimeoutError,
)
from workbench.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

_LAZY = {"VLLMSteerModel", "VLLMSteeringConfig"}


def __getattr__(name: str) -> object:
    # The client imports vLLM; keep `import workbench` light for spec and HF-only use.
    if name in _LAZY:
        from workbench import client

        return getattr(client, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL_NAME",
    "AblationSpec",
    "AddSpec",
    "CaptureError",
    "CaptureHandle",
    "ChatResponse",
    "ChatError",
    "EmbeddedModelError",
    "EngineClosedError",
    "EngineDeadError",
    "PromptError",
    "WorkerTimeoutError",
    "HandleReleasedError",
    "HiddenSizeError",
    "LayerIndexError",
    "LayerSteeringSpec",
    "MessageBoundary",
    "ProjectionCapSpec",
    "SpecError",
    "SteeringSpec",
    "VLLMSteerModel",
    "VLLMSteeringConfig",
    "WorkbenchError",
    "__version__",
]
