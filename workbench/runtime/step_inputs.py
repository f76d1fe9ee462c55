"""Per-step inputs of the steered layers: device buffers refilled from the host before each step."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


class StepInputBuffer:
    """A persistent device tensor refilled from the host before every step,
    skipping the copy when its leading rows already hold the new rows
    (steady decode rewrites nothing).

    On CUDA the rows go through two pinned staging buffers used in turn, with
    non-blocking copies: a pageable copy would make the CPU wait for the GPU
    to drain and undo vLLM's overlap of input preparation with the previous
    step. Before a staging buffer is reused, the copy that read it is waited
    for (it was issued a step earlier, so this rarely waits).
    """

    def __init__(self, target: Tensor) -> None:
        self.target = target
        self._staging: list[Tensor] = []
        self._copied: list[Any] = []
        if target.is_cuda:
            self._staging = [torch.empty(target.shape, dtype=target.dtype).pin_memory() for _ in range(2)]
            self._copied = [None, None]
        self._turn = 0
        self._written = np.zeros(target.shape, dtype=torch.empty(0, dtype=target.dtype).numpy().dtype)
        """What the device tensor's leading rows hold (it starts as zeros)."""

    def update(self, rows: np.ndarray) -> None:
        """Make the leading rows of the device tensor equal ``rows`` (shaped like them)."""
        count = rows.shape[0]
        if count <= self._written.shape[0] and np.array_equal(self._written[:count], rows):
            return
        self._write(rows)
        self._written = rows

    def _write(self, rows: np.ndarray) -> None:
        count = rows.shape[0]
        if not self._staging:
            self.target[:count].copy_(torch.from_numpy(rows))
            return
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        staging = self._staging[self._turn]
        staging[:count].copy_(torch.from_numpy(rows))
        self.target[:count].copy_(staging[:count], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[self._turn] = event
        self._turn ^= 1
