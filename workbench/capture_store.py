"""The rank-0 worker's captures in progress: which rows of a step belong to
which capture, and writing them into the captures' files.

After every step, ``CaptureStore.record`` works out, with a few numpy
operations over the step's rows, where each captured row goes in
``RowSpace.rows`` (its capture's file at its position; scratch for rows
nobody keeps), and hands the rows to a ``RowWriter``. Positions make
recomputation (vLLM re-running a preempted request) overwrite the same rows;
a request that jumps past rows it never computed is reported at fetch.

On CUDA the step's rows are first copied to pinned host memory without
blocking (a synchronous copy would stall vLLM's overlap of CPU work with
the GPU) and a helper thread writes them into the files once the copy has
landed, so the page faults of fresh shared memory never hold up the model's
thread. On CPU the rows are written in place before the next step reuses
the buffers.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_tensors
from torch import Tensor

from workbench.capture_space import RowSpace, Window
from workbench.transfer import make_folder

logger = logging.getLogger(__name__)

RELEASE_GRACE_STEPS = 4
"""Steps a fetched or released capture stays blocked, covering steps dispatched before the RPC arrived."""

MAX_QUEUED_STEPS = 8
"""Steps of rows the helper thread may lag behind before the model's thread waits for it."""


class RowWriter:
    """Writes ``(rows, destination indices)`` pairs into ``target`` with
    ``index_copy_``: on a helper thread after ``ready`` (a CUDA event) when
    ``threaded``, else at once."""

    def __init__(self, target: Tensor, threaded: bool) -> None:
        self.target = target
        self._queue: queue.Queue[tuple[Any, list[tuple[Tensor, Tensor]]]] | None = None
        self._error: BaseException | None = None
        if threaded:
            self._queue = queue.Queue(maxsize=MAX_QUEUED_STEPS)
            threading.Thread(target=self._run, name="workbench-row-writer", daemon=True).start()

    def submit(self, ready: Any, pairs: list[tuple[Tensor, Tensor]]) -> None:
        if self._queue is None:
            self._write(pairs)
            return
        self._raise_error()
        self._queue.put((ready, pairs))

    def drain(self) -> None:
        """Return once every submitted row is in place."""
        if self._queue is not None:
            self._queue.join()
            self._raise_error()

    def _write(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        # The worker creates these tensors under vLLM's inference mode, which is
        # per thread: the helper thread must enter it to update them in place.
        with torch.inference_mode():
            for rows, destinations in pairs:
                self.target.index_copy_(0, destinations, rows)

    def _run(self) -> None:
        assert self._queue is not None
        while True:
            ready, pairs = self._queue.get()
            try:
                if ready is not None:
                    ready.synchronize()
                self._write(pairs)
            except BaseException as error:  # reported on the model's thread
                logger.exception("writing captured rows failed")
                self._error = error
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("writing captured rows failed") from error


@dataclass
class CaptureRecord:
    """One capture: its file per layer, and whether the client sees those files."""

    capture_id: str
    windows: dict[int, Window]
    index: int
    """Row of the store's bookkeeping arrays."""
    inline: bool


@dataclass(frozen=True)
class _BatchPlan:
    """Where the capturing requests of one batch composition write, by place in the batch."""

    key: object
    places: np.ndarray
    """Places of the requests being recorded."""
    indices: np.ndarray
    """Their records' bookkeeping rows."""
    capacity: np.ndarray
    """Rows each place's files hold (0 for places not recorded)."""
    first_rows: dict[int, np.ndarray]
    """Layer -> each place's file's first row in ``RowSpace.rows`` (-1: not captured there)."""


class CaptureStore:
    """Captures in progress on the worker that records them (TP rank 0)."""

    def __init__(self, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        self.hidden = hidden
        self.dtype = dtype
        self.device = device
        self._space: RowSpace | None = None
        self._writer: RowWriter | None = None
        self._private: tempfile.TemporaryDirectory[str] | None = None
        """Files of clients this worker cannot see (another host) go here, and travel inline."""
        self._records: dict[str, CaptureRecord] = {}
        self._failed: dict[str, str] = {}
        self._released: dict[str, int] = {}
        self._num_rows = np.zeros(64, dtype=np.int64)
        self._missing_from = np.full(64, -1, dtype=np.int64)
        """Per record: rows held, and the first row never recorded (-1: none)."""
        self._free_indices = list(range(63, -1, -1))
        self._plan: _BatchPlan | None = None

    @property
    def space(self) -> RowSpace:
        if self._space is None:
            self._space = RowSpace(self.hidden, self.dtype)
            self._writer = RowWriter(self._space.rows, threaded=self.device.type == "cuda")
        return self._space

    # -- recording -----------------------------------------------------------

    def record(
        self,
        key: object,
        payloads: list[dict[str, Any] | None],
        capturing: list[int],
        step: Any,
        buffers: dict[int, Tensor],
    ) -> None:
        """Write the rows of ``step`` that capturing requests own.

        ``payloads`` are the batch's request payloads (``key`` identifies the
        batch composition, for reusing the plan), ``capturing`` the places of
        those that capture, ``step`` a ``StepRows`` and ``buffers`` each
        layer's capture buffer holding the step's rows.
        """
        plan = self._plan
        if plan is None or plan.key is not key:
            plan = self._plan = self._make_plan(key, payloads, capturing)
        if not plan.places.size:
            return
        starts = step.starts
        counts = np.diff(starts)
        first_place, last_place = int(plan.places[0]), int(plan.places[-1])
        low, high = int(starts[first_place]), int(starts[last_place + 1])
        row_place = np.repeat(np.arange(first_place, last_place + 1), counts[first_place : last_place + 1])
        position = step.computed[row_place] + np.arange(low, high) - starts[row_place]
        kept = position < plan.capacity[row_place]

        pairs = []
        for layer, first_rows in plan.first_rows.items():
            first = first_rows[row_place]
            destinations = np.where(kept & (first >= 0), first + position, self.space.scratch_row)
            pairs.append((buffers[layer][low:high], torch.from_numpy(destinations)))
        self._book(plan, step.computed[plan.places], counts[plan.places])
        ready = None
        if self.device.type == "cuda":
            pairs, ready = _stage_on_host(pairs)
        assert self._writer is not None
        self._writer.submit(ready, pairs)

    def _book(self, plan: _BatchPlan, first: np.ndarray, count: np.ndarray) -> None:
        """Update rows held; a chunk starting past them, or past a file's end, leaves rows missing."""
        indices = plan.indices
        held = self._num_rows[indices]
        missing = self._missing_from[indices]
        skipped = (first > held) & (missing < 0)
        missing[skipped] = held[skipped]
        end = first + count
        capacity = plan.capacity[plan.places]
        overflow = (end > capacity) & (missing < 0)
        missing[overflow] = capacity[overflow]
        self._missing_from[indices] = missing
        self._num_rows[indices] = np.minimum(end, capacity)

    def _make_plan(self, key: object, payloads: list[dict[str, Any] | None], capturing: list[int]) -> _BatchPlan:
        places, indices = [], []
        capacity = np.zeros(len(payloads), dtype=np.int64)
        first_rows: dict[int, np.ndarray] = {}
        for place in capturing:
            payload = payloads[place]
            assert payload is not None
            record = self._records.get(payload["capture_id"]) or self._open(payload)
            if record is None:
                continue
            places.append(place)
            indices.append(record.index)
            capacity[place] = payload["capacity"]
            for layer, window in record.windows.items():
                first_rows.setdefault(layer, np.full(len(payloads), -1, dtype=np.int64))[place] = window.first_row
        return _BatchPlan(
            key, np.array(places, dtype=np.int64), np.array(indices, dtype=np.int64), capacity, first_rows
        )

    def _open(self, payload: dict[str, Any]) -> CaptureRecord | None:
        """Open a capture's files (None if it was released, or cannot be opened: that is reported at fetch)."""
        capture_id = payload["capture_id"]
        if capture_id in self._released or capture_id in self._failed:
            return None
        folder = Path(payload["folder"]) if payload.get("folder") else None
        inline = folder is None or not folder.is_dir()
        if inline:
            if self._private is None:
                self._private = make_folder("workbench-worker-")
            folder = Path(self._private.name)
        assert folder is not None
        windows: dict[int, Window] = {}
        try:
            for layer in payload["layers"]:
                windows[layer] = self.space.open(folder / f"{capture_id}-{layer}.rows", payload["capacity"])
        except OSError as error:  # RowSpaceError included
            for window in windows.values():
                self.space.close(window, unlink=True)
            self._failed[capture_id] = f"its rows could not be stored: {error}"
            logger.warning("capture %s: %s", capture_id, self._failed[capture_id])
            return None
        if not self._free_indices:
            self._grow_books()
        index = self._free_indices.pop()
        self._num_rows[index] = 0
        self._missing_from[index] = -1
        record = self._records[capture_id] = CaptureRecord(capture_id, windows, index, inline)
        return record

    def _grow_books(self) -> None:
        size = self._num_rows.size
        self._num_rows = np.concatenate([self._num_rows, np.zeros(size, dtype=np.int64)])
        self._missing_from = np.concatenate([self._missing_from, np.full(size, -1, dtype=np.int64)])
        self._free_indices.extend(range(2 * size - 1, size - 1, -1))

    def tick(self) -> None:
        """Count down the grace of fetched and released captures (once per step)."""
        for capture_id in list(self._released):
            self._released[capture_id] -= 1
            if self._released[capture_id] <= 0:
                del self._released[capture_id]

    # -- hand-over -----------------------------------------------------------

    def fetch(self, capture_ids: list[str]) -> dict[str, Any]:
        """Hand over and forget these captures.

        Returns ``{"files": {"<id>/<layer>": [path, rows]}, "errors": {id: why},
        "data": safetensors bytes of "<id>/<layer>" rows (captures whose files
        the client cannot see), "dtype": ...}``; ids never seen are absent.
        """
        files: dict[str, list[Any]] = {}
        inline: dict[str, Tensor] = {}
        errors: dict[str, str] = {}
        for capture_id, record in self._take(capture_ids, errors):
            rows = int(self._num_rows[record.index])
            missing = int(self._missing_from[record.index])
            if missing >= 0:
                errors[capture_id] = f"rows from {missing} on were never recorded (vLLM skipped or exceeded them)"
            for layer, window in record.windows.items():
                key = f"{capture_id}/{layer}"
                if missing >= 0:
                    self.space.close(window, unlink=True)
                elif record.inline:
                    inline[key] = self.space.view(window, rows).clone()
                    self.space.close(window, unlink=True)
                else:
                    files[key] = [str(window.path), rows]
                    self.space.close(window, unlink=False)
        reply: dict[str, Any] = {"files": files, "errors": errors, "dtype": str(self.dtype).removeprefix("torch.")}
        if inline:
            reply["data"] = save_tensors(inline)
        return reply

    def release(self, capture_ids: list[str]) -> None:
        for _, record in self._take(capture_ids, {}):
            for window in record.windows.values():
                self.space.close(window, unlink=True)

    def _take(self, capture_ids: list[str], errors: dict[str, str]) -> list[tuple[str, CaptureRecord]]:
        """Remove these captures from the store (blocked for a grace period), once their rows are written."""
        if self._writer is not None:
            self._writer.drain()
        taken = []
        for capture_id in capture_ids:
            self._released[capture_id] = RELEASE_GRACE_STEPS
            if capture_id in self._failed:
                errors[capture_id] = self._failed.pop(capture_id)
            record = self._records.pop(capture_id, None)
            if record is not None:
                self._free_indices.append(record.index)
                taken.append((capture_id, record))
        if taken:
            self._plan = None
        return taken

    def stats(self) -> dict[str, int]:
        return {"captures": len(self._records) + len(self._failed), "released": len(self._released)}


def _stage_on_host(pairs: list[tuple[Tensor, Tensor]]) -> tuple[list[tuple[Tensor, Tensor]], Any]:
    """Copy each pair's device rows into pinned host memory without blocking;
    the returned event says when they have landed."""
    first = pairs[0][0]
    staged = torch.empty((len(pairs), *first.shape), dtype=first.dtype, pin_memory=True)
    for place, (rows, _) in enumerate(pairs):
        staged[place].copy_(rows, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return [(staged[place], destinations) for place, (_, destinations) in enumerate(pairs)], ready
