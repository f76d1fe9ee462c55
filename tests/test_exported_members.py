"""The public names of `workbench` are pinned: changing them is an API change."""

from __future__ import annotations

import workbench

EXPECTED = {
    "DEFAULT_MODEL_NAME",
    "AblationSpec",
    "AddSpec",
    "CaptureError",
    "CaptureHandle",
    "ChatError",
    "ChatResponse",
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
}


def test_public_names_are_pinned_and_resolve():
    assert set(workbench.__all__) == EXPECTED
    for name in workbench.__all__:
        assert getattr(workbench, name) is not None
