"""The public names of `workbench` are pinned: changing them is an API change."""

from __future__ import annotations

import workbench

EXPECTED = {
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
}


def test_public_names_are_pinned_and_resolve():
    assert set(workbench.__all__) == EXPECTED
    for name in workbench.__all__:
        assert getattr(workbench, name) is not None
