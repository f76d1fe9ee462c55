"""Which steered requests had their residual stream turned into inf or NaN, and where.

Each steered layer's operator marks, per row of the step, the lowest layer
whose steered output is not finite (``layer_op``). After a steered step the
worker copies the step's marks to the host and reads them once they have
landed, keeping, per request tag, the lowest layer seen. The client learns
them when its steered requests finish, to flag the reply instead of returning
empty or garbled text silently, in one of two ways:

- from the board (``wire.NonfiniteBoard``), two small files in the client's
  hand-off folder that the worker keeps current: no worker call, so a finished
  request waits only for its last step's marks to land;
- by asking (``Rpc.TAKE_NONFINITE``), when the worker cannot see that folder.

On CUDA the marks are read on a helper thread as each step's copy lands
(the model's thread never waits for the GPU); on CPU they are read in place
before the step's outputs leave the worker.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workbench.runtime.steering_tables import NO_LAYER
from workbench.wire import BrokenLayers, NonfiniteBoard


@dataclass(frozen=True)
class _StepMarks:
    host: Tensor
    ready: Any
    """CUDA event after which ``host`` holds the marks (None: already there)."""
    starts: np.ndarray
    tags: list[str | None]
    issued: float
    """``time.monotonic()`` when the step was queued (before its outputs can leave the worker)."""


class NonfiniteWatch:
    """The marks buffer shared by all layers, and what it has shown so far."""

    def __init__(self, marks: Tensor) -> None:
        self.marks = marks
        self._lock = threading.Condition()
        """Guards what follows; the helper thread waits on it for steps to read."""
        self._pending: collections.deque[_StepMarks] = collections.deque()
        self._found = BrokenLayers()
        self._board: NonfiniteBoard | None = None
        self._thread: threading.Thread | None = None

    def open_board(self, folder: str | None) -> tuple[str, str] | None:
        """Keep a board in the client's ``folder`` from now on; its files' paths
        (None when this worker cannot write there: another host)."""
        if folder is None or not Path(folder).is_dir():
            return None
        with self._lock:
            if self._board is None:
                self._board = NonfiniteBoard.create(Path(folder), self._through())
            return self._board.paths

    def before_step(self) -> None:
        """Clear the marks before a step with steered rows (layers only lower them)."""
        self.marks.fill_(NO_LAYER)

    def after_step(self, starts: np.ndarray, tags: list[str | None]) -> None:
        """Copy the marks of the step's ``starts[-1]`` rows out; ``tags[i]`` names the request at place ``i``."""
        rows = int(starts[-1])
        if not self.marks.is_cuda:
            with self._lock:
                self._read(_StepMarks(self.marks[:rows].clone(), None, starts, tags, time.monotonic()))
            return
        host = torch.empty(rows, dtype=self.marks.dtype, pin_memory=True)
        host.copy_(self.marks[:rows], non_blocking=True)
        # A blocking event: the helper thread sleeps until the copy lands instead of
        # spinning a core, and without the GIL, which the model's thread needs.
        ready = torch.cuda.Event(blocking=True)
        ready.record()
        self._queue(host, ready, starts, tags)

    def _queue(self, host: Tensor, ready: Any, starts: np.ndarray, tags: list[str | None]) -> None:
        """Hand a step's marks, landing once ``ready`` has, to the helper thread."""
        with self._lock:
            self._pending.append(_StepMarks(host, ready, starts, tags, time.monotonic()))
            if len(self._pending) == 1 and self._board is not None:
                self._board.post_through(self._through())  # no longer "nothing pending"
            self._lock.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._read_landed, name="workbench-nonfinite", daemon=True)
                self._thread.start()

    def _read_landed(self) -> None:
        """Helper thread (CUDA): read each step's marks once they have landed, in order."""
        while True:
            with self._lock:
                while not self._pending:
                    self._lock.wait()
                step = self._pending[0]
            step.ready.synchronize()
            with self._lock:
                if self._pending and self._pending[0] is step:  # else a worker call read it meanwhile
                    self._pending.popleft()
                    self._read(step)

    def _through(self) -> float:
        """A time before which every queued step's marks have been read (inf: none is waiting)."""
        return self._pending[0].issued if self._pending else float("inf")

    def _read(self, step: _StepMarks) -> None:
        """Note a step's broken rows and post them, with the board's new time (lock held)."""
        marks = step.host.numpy()
        broken = np.flatnonzero(marks != NO_LAYER)
        noted = []
        if broken.size:
            places = np.searchsorted(step.starts, broken, side="right") - 1
            for place, row in zip(places.tolist(), broken.tolist()):
                tag = step.tags[place]
                if tag is not None:
                    layer = int(marks[row])
                    self._found.note(tag, layer)
                    noted.append((tag, layer))
        if self._board is not None:
            self._board.post(noted, self._through())

    def take(self, tags: list[str]) -> dict[str, int]:
        """The lowest broken layer of each of these requests that had one, forgotten afterwards.

        For a client that cannot read the board (another host): the marks
        still being copied are waited for, since a finished request's last
        step may be among them. That stalls the engine for up to a step,
        which the board avoids.
        """
        with self._lock:
            while self._pending:
                step = self._pending.popleft()
                if step.ready is not None:
                    step.ready.synchronize()
                self._read(step)
            found = {tag: self._found.pop(tag) for tag in tags}
            return {tag: layer for tag, layer in found.items() if layer is not None}
