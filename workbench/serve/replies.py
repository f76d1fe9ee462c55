"""Error replies of the server's own checks, in the shape of vLLM's (OpenAI's) errors.

``{"error": {"message", "type", "param", "code"}}``: ``type`` is the
workbench error class (``LayerIndexError``, ``SpecNotFoundError``, ...), so a
client can raise the same typed error (``RemoteSteerModel`` does), and
``message`` names the offending value.
"""

from __future__ import annotations

import json
from typing import Any

from workbench.errors import (
    CaptureLimitError,
    CapturePendingError,
    EngineDeadError,
    HandleReleasedError,
    SpecNotFoundError,
    WorkbenchError,
    WorkerTimeoutError,
)

STATUS = (
    (CaptureLimitError, 429),
    (CapturePendingError, 409),
    (HandleReleasedError, 404),
    (SpecNotFoundError, 404),
    (EngineDeadError, 503),
    (WorkerTimeoutError, 504),
)
"""HTTP status of an error on the server's own routes (first match; any other ``WorkbenchError`` is a 400)."""


def status_of(error: WorkbenchError) -> int:
    return next((status for kind, status in STATUS if isinstance(error, kind)), 400)


def error_body(error: WorkbenchError, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": str(error), "type": type(error).__name__, "param": param, "code": status}}


def error_bytes(error: WorkbenchError, status: int, param: str | None = None) -> bytes:
    return json.dumps(error_body(error, status, param)).encode()
