"""Which steered requests had their residual stream turned into inf or NaN, and where.

Each steered layer's operator marks, per row of the step, the lowest layer
whose steered output is not finite (``layer_op``). After a steered step the
worker copies the step's marks to the host (on CUDA without blocking, read
one step later) and keeps, per request tag, the lowest layer seen; the client
takes them when its steered requests finish (``Rpc.TAKE_NONFINITE``), to
flag the reply instead of returning empty or garbled text silently.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workbench.runtime.steering_tables import NO_LAYER

KEPT_REQUESTS = 4096
"""Requests whose marks are kept until taken; the oldest go first (e.g. of cancelled requests)."""


@dataclass(frozen=True)
class _StepMarks:
    host: Tensor
    ready: Any
    """CUDA event after which ``host`` holds the marks (None: already there)."""
    starts: np.ndarray
    tags: list[str | None]


class NonfiniteWatch:
    """The marks buffer shared by all layers, and what it has shown so far."""

    def __init__(self, marks: Tensor) -> None:
        self.marks = marks
        self._pending: collections.deque[_StepMarks] = collections.deque()
        self._found: collections.OrderedDict[str, int] = collections.OrderedDict()

    def before_step(self) -> None:
        """Clear the marks before a step with steered rows (layers only lower them)."""
        self.marks.fill_(NO_LAYER)

    def after_step(self, starts: np.ndarray, tags: list[str | None]) -> None:
        """Copy the marks of the step's ``starts[-1]`` rows out; ``tags[i]`` names the request at place ``i``."""
        rows = int(starts[-1])
        if self.marks.is_cuda:
            host = torch.empty(rows, dtype=self.marks.dtype, pin_memory=True)
            host.copy_(self.marks[:rows], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = self.marks[:rows].clone(), None
        self._pending.append(_StepMarks(host, ready, starts, tags))
        self.collect()

    def collect(self) -> None:
        """Read the marks that have landed."""
        while self._pending:
            step = self._pending[0]
            if step.ready is not None and not step.ready.query():
                return
            self._pending.popleft()
            marks = step.host.numpy()
            broken = np.flatnonzero(marks != NO_LAYER)
            if broken.size:
                places = np.searchsorted(step.starts, broken, side="right") - 1
                for place, row in zip(places.tolist(), broken.tolist()):
                    tag = step.tags[place]
                    if tag is not None:
                        self._note(tag, int(marks[row]))

    def _note(self, tag: str, layer: int) -> None:
        self._found[tag] = min(layer, self._found.get(tag, layer))
        self._found.move_to_end(tag)
        while len(self._found) > KEPT_REQUESTS:
            self._found.popitem(last=False)

    def take(self, tags: list[str]) -> dict[str, int]:
        """The lowest broken layer of each of these requests that had one, forgotten afterwards.

        Marks still being copied are not waited for: the client asks once it
        has a request's last token, which the GPU produced after the copy of
        that step's marks (same stream), so those have landed; waiting for
        the steps since would stall the engine's pipeline at every call.
        """
        self.collect()
        return {tag: self._found.pop(tag) for tag in tags if tag in self._found}
