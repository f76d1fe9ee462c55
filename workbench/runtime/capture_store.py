"""The rank-0 worker's captures in progress: which rows of a step belong to
which capture, and writing them into the captures' files.

After every step, ``CaptureStore.record`` works out, with one numpy
operation over the step's rows and captured layers, where each captured row
goes in ``RowSpace.rows`` (its layer's block of its capture's file, at its
position; scratch for rows nobody keeps), and hands the rows to
``HostLanes``. Positions make recomputation (vLLM re-running a preempted
request) overwrite the same rows; a request that jumps past rows it never
computed is reported at fetch.

On CUDA the step's rows are first copied to pinned host memory on a side
stream (``HostStaging``; a synchronous copy would stall vLLM's overlap of
CPU work with the GPU) and helper threads write them into the files once
the copy has landed, each a run of neighbouring layers, so the page faults
of fresh shared memory never hold up the model's thread. On CPU the rows are
written in place before the next step reuses the buffers. Files the client
gives back after a fetch are written into again by later captures
(``FilePool``).
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workbench.errors import CaptureError
from workbench.runtime.capture_space import RowSpace, Window
from workbench.wire import SHARED_MEMORY, CaptureRequest, FetchReply, HandoffFolder

logger = logging.getLogger(__name__)

RELEASE_GRACE_STEPS = 4
"""Steps a fetched or released capture stays blocked, covering steps dispatched before the RPC arrived."""

MAX_QUEUED_JOBS = 64
"""Jobs a helper thread may lag behind before the model's thread waits for it."""


def writer_threads() -> int:
    """Helper threads on CUDA: fresh shared memory costs a page fault per 4 KiB
    written, so one thread manages ~1-2 GB/s, and capturing every layer of
    an 8B model at full speed is ~4-6 GB/s. Half the cores, 2 to 8: the rest
    run vLLM. Captured layers are spread over the threads in runs of
    neighbours (a layer always goes to the same one, keeping its writes in order)."""
    return min(8, max(2, (os.cpu_count() or 4) // 2))


RECYCLED_SHARE = 0.5
"""Share of the shared-memory filesystem that files the client gave back may
keep, for later captures to write into (4 GiB where there is none). Files
enter the pool only after a capture used them, so in practice it holds at
most the most that captures held at once; a workload that captures the same
amount run after run then writes only into pages that exist."""


def recycled_limit(folder: Path = SHARED_MEMORY) -> int:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return 4 << 30
    return int(stats.f_blocks * stats.f_frsize * RECYCLED_SHARE)


class FilePool:
    """Capture files the client no longer views, by folder and size.

    A later capture renames one to its own name and writes into its pages:
    writing rows into pages that exist runs at ~15 GB/s on 8 threads of an
    H200 host, into fresh ones at ~2.6 GB/s (every fresh 4 KiB page is a page
    fault and zeroing), and nothing has to be freed afterwards (~50 ms per
    400 MB). A capture takes a file within a factor of two of its size, so
    that captures of different sizes (1 layer, all layers) keep files of
    their own sizes instead of growing and shrinking each other's.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_size: dict[Path, dict[int, dict[Path, None]]] = {}
        """Folder -> bytes of shared memory a file holds -> those files, oldest first."""
        self._age: dict[Path, int] = {}
        """Every kept file and its bytes, oldest first (the first dropped past the limit)."""
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._age)

    def add(self, path: Path) -> list[Path]:
        """Keep ``path``; returns the files dropped to stay within the limit (the caller deletes them)."""
        try:
            size = path.stat().st_blocks * 512
        except FileNotFoundError:
            return []
        self._age[path] = size
        self._by_size.setdefault(path.parent, {}).setdefault(size, {})[path] = None
        self._bytes += size
        dropped = []
        while self._bytes > self.limit:
            oldest = next(iter(self._age))
            self._forget(oldest)
            dropped.append(oldest)
        return dropped

    @property
    def bytes(self) -> int:
        """Shared memory the kept files hold."""
        return self._bytes

    def take(self, folder: Path, nbytes: int) -> Path | None:
        """A kept file of ``folder`` for ``nbytes`` (oldest first among equals):
        the smallest holding them, up to twice as large; else the largest
        holding at least half of them; else None."""
        nbytes = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE  # files hold whole pages
        sizes = self._by_size.get(folder, {})
        larger = [size for size in sizes if nbytes <= size <= 2 * nbytes]
        smaller = [size for size in sizes if nbytes // 2 <= size < nbytes]
        if not larger and not smaller:
            return None
        path = next(iter(sizes[min(larger) if larger else max(smaller)]))
        self._forget(path)
        return path

    def _forget(self, path: Path) -> None:
        size = self._age.pop(path)
        self._bytes -= size
        sizes = self._by_size[path.parent]
        del sizes[size][path]
        if not sizes[size]:
            del sizes[size]


def _file_name(capture_id: str, layer: int) -> str:
    """Name of a capture's file, after the first layer it holds (``_layer_of``
    reads it back: a pipeline stage keeps only files of its own layers)."""
    return f"{capture_id}-{layer}.rows"


def _layer_of(path: Path) -> int:
    """The first layer of a capture file named by ``_file_name``."""
    return int(path.stem.rsplit("-", 1)[1])


class HostLanes:
    """Runs host-side jobs in order per lane: on helper threads, each job after
    its ``ready`` event (a CUDA event) has completed, or at once when there are
    no threads (CPU, where the rows must be written before the next step
    reuses the buffers)."""

    def __init__(self, threads: int) -> None:
        self._queues: list[queue.Queue[tuple[Any, Callable[[], None]]]] = []
        self._error: BaseException | None = None
        for lane in range(threads):
            jobs: queue.Queue[tuple[Any, Callable[[], None]]] = queue.Queue(maxsize=MAX_QUEUED_JOBS)
            self._queues.append(jobs)
            threading.Thread(target=self._run, args=(jobs,), name=f"workbench-rows-{lane}", daemon=True).start()

    @property
    def threads(self) -> int:
        return len(self._queues)

    def submit(self, key: int, ready: Any, job: Callable[[], None]) -> None:
        """Run ``job`` after the earlier jobs of the same ``key``."""
        if not self._queues:
            job()
            return
        self._raise_error()
        self._queues[key % len(self._queues)].put((ready, job))

    def after_all(self, job: Callable[[], None]) -> None:
        """Run ``job`` once every lane has run the jobs submitted before it."""
        if not self._queues:
            job()
            return
        self._raise_error()
        remaining = [len(self._queues)]
        lock = threading.Lock()

        def arrive() -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                job()

        for jobs in self._queues:
            jobs.put((None, arrive))

    def drain(self) -> None:
        """Return once every submitted job has run."""
        for jobs in self._queues:
            jobs.join()
        self._raise_error()

    def _run(self, jobs: queue.Queue[tuple[Any, Callable[[], None]]]) -> None:
        # vLLM runs the worker under inference mode, which is per thread; its
        # tensors can only be updated in place inside it.
        with torch.inference_mode():
            while True:
                ready, job = jobs.get()
                try:
                    if ready is not None:
                        ready.synchronize()
                    job()
                except BaseException as error:  # reported on the model's thread
                    logger.exception("a capture job failed")
                    self._error = error
                finally:
                    jobs.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise CaptureError("writing captured rows failed") from error


@dataclass
class CaptureRecord:
    """One capture: its file (a block of rows per layer), and whether the client sees it."""

    capture_id: str
    window: Window | None
    """None when this worker holds none of its layers (another pipeline stage does)."""
    layers: tuple[int, ...]
    """This worker's captured layers, in the order of their blocks in the file."""
    capacity: int
    """Rows of each layer's block."""
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
    """Rows each place's blocks hold (0 for places not recorded)."""
    layers: tuple[int, ...]
    """Layers some recorded request captures here, ascending."""
    first_rows: np.ndarray
    """``[layer, place]``: first row in ``RowSpace.rows`` of that place's block for that layer (-1: not captured)."""
    lane_runs: tuple[tuple[int, slice], ...]
    """Runs of neighbouring ``layers`` that share a helper thread: (lane, slice of ``layers``)."""
    blocked: tuple[str, ...]
    """Fetched or released captures whose requests are still running: blocked while they run."""


class CaptureStore:
    """Captures in progress on the worker that records them (TP rank 0)."""

    def __init__(
        self,
        layers: frozenset[int],
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        threads: int | None = None,
    ) -> None:
        self.layers = layers
        """The layers this worker holds (a pipeline stage records only its own)."""
        self.hidden = hidden
        self.dtype = dtype
        self.device = device
        self._space: RowSpace | None = None
        threads = threads if threads is not None else writer_threads() if device.type == "cuda" else 0
        self._lanes = HostLanes(threads)
        """Helper threads writing rows (CUDA); none on CPU, where they must be in place before the next step."""
        ordered = sorted(layers)
        self._lane_of = {layer: place * max(threads, 1) // len(ordered) for place, layer in enumerate(ordered)}
        """Layer -> helper thread: neighbouring layers share one, so a step's rows of a run of layers are one copy."""
        self._private: HandoffFolder | None = None
        """Files of clients this worker cannot see (another host) go here, and travel inline."""
        self._records: dict[str, CaptureRecord] = {}
        self._failed: dict[str, str] = {}
        self._released: dict[str, int] = {}
        self._num_rows = np.zeros(64, dtype=np.int64)
        self._missing_from = np.full(64, -1, dtype=np.int64)
        """Per record: rows held, and the first row never recorded (-1: none)."""
        self._free_indices = list(range(63, -1, -1))
        self._plan: _BatchPlan | None = None
        self._staging = HostStaging() if device.type == "cuda" else None
        self._pool = FilePool(recycled_limit())

    @property
    def space(self) -> RowSpace:
        if self._space is None:
            self._space = RowSpace(self.hidden, self.dtype)
        return self._space

    # -- recording -----------------------------------------------------------

    def record(
        self,
        key: object,
        captures: list[CaptureRequest | None],
        capturing: list[int],
        step: Any,
        buffers: dict[int, Tensor],
    ) -> None:
        """Write the rows of ``step`` that capturing requests own.

        ``captures`` are what the batch's requests asked to capture, by place
        (``key`` identifies the batch composition, for reusing the plan),
        ``capturing`` the places of those that capture, ``step`` a
        ``StepRows`` and ``buffers`` each layer's capture buffer holding the
        step's rows.
        """
        plan = self._plan
        if plan is None or plan.key is not key:
            plan = self._plan = self._make_plan(key, captures, capturing)
        for capture_id in plan.blocked:
            self._released[capture_id] = RELEASE_GRACE_STEPS
        if not plan.layers:  # nobody records, or only layers of other pipeline stages
            return
        starts = step.starts
        counts = np.diff(starts)
        first_place, last_place = int(plan.places[0]), int(plan.places[-1])
        low, high = int(starts[first_place]), int(starts[last_place + 1])
        row_place = np.repeat(np.arange(first_place, last_place + 1), counts[first_place : last_place + 1])
        position = step.computed[row_place] + np.arange(low, high) - starts[row_place]
        first = plan.first_rows[:, row_place]
        kept = (position < plan.capacity[row_place]) & (first >= 0)
        destinations = torch.from_numpy(np.where(kept, first + position, self.space.scratch_row))
        self._book(plan, step.computed[plan.places], counts[plan.places])
        sources = [buffers[layer][low:high] for layer in plan.layers]
        write = self.space.write
        if not self._lanes.threads:  # in place, straight from the capture buffers
            for layer_destinations, source in zip(destinations, sources):
                write(layer_destinations, source)
            return
        # Helper threads get a copy the next step cannot overwrite (on CUDA, in pinned host memory).
        host, ready = self._staging.stage(sources) if self._staging else (torch.stack(sources), None)
        for lane, run in plan.lane_runs:
            self._lanes.submit(lane, ready, partial(write, destinations[run].flatten(), host[run].flatten(0, 1)))

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

    def _make_plan(self, key: object, captures: list[CaptureRequest | None], capturing: list[int]) -> _BatchPlan:
        records, places, blocked = [], [], []
        capacity = np.zeros(len(captures), dtype=np.int64)
        for place in capturing:
            capture = captures[place]
            assert capture is not None
            if capture.capture_id in self._released:
                blocked.append(capture.capture_id)
                continue
            record = self._records.get(capture.capture_id) or self._open(capture)
            if record is None:
                continue
            places.append(place)
            records.append(record)
            capacity[place] = capture.capacity
        layers = tuple(sorted({layer for record in records for layer in record.layers}))
        row_of = {layer: row for row, layer in enumerate(layers)}
        first_rows = np.full((len(layers), len(captures)), -1, dtype=np.int64)
        for place, record in zip(places, records):
            if record.window is not None:
                for block, layer in enumerate(record.layers):
                    first_rows[row_of[layer], place] = record.window.first_row + block * record.capacity
        runs: list[tuple[int, slice]] = []
        for row, layer in enumerate(layers):
            lane = self._lane_of[layer]
            if runs and runs[-1][0] == lane:
                runs[-1] = (lane, slice(runs[-1][1].start, row + 1))
            else:
                runs.append((lane, slice(row, row + 1)))
        return _BatchPlan(
            key,
            np.array(places, dtype=np.int64),
            np.array([record.index for record in records], dtype=np.int64),
            capacity,
            layers,
            first_rows,
            tuple(runs),
            tuple(blocked),
        )

    def _open(self, capture: CaptureRequest) -> CaptureRecord | None:
        """Open a capture's files (None if they cannot be opened: that is reported at fetch)."""
        capture_id = capture.capture_id
        if capture_id in self._failed:
            return None
        folder = Path(capture.folder) if capture.folder else None
        if folder is None or not folder.is_dir():
            if self._private is None:
                self._private = HandoffFolder("workbench-worker-")
            folder, inline = Path(self._private.name), True
        else:
            inline = False
        layers = tuple(sorted(layer for layer in set(capture.layers) if layer in self.layers))
        window = None
        try:
            if layers:
                name = _file_name(capture_id, layers[0])
                window = self._open_file(folder, name, capture.capacity * len(layers))
        except OSError as error:  # RowSpaceError included
            self._failed[capture_id] = f"its rows could not be stored: {error}"
            logger.warning("capture %s: %s", capture_id, self._failed[capture_id])
            return None
        if not self._free_indices:
            self._grow_books()
        index = self._free_indices.pop()
        self._num_rows[index] = 0
        self._missing_from[index] = -1
        record = CaptureRecord(capture_id, window, layers, capture.capacity, index, inline)
        self._records[capture_id] = record
        return record

    def _open_file(self, folder: Path, name: str, capacity: int) -> Window:
        """A window on a new file, written into the pages of a recycled one where there is one."""
        reuse = self._pool.take(folder, capacity * self.space.row_bytes)
        if reuse is not None:
            try:
                return self.space.open(folder / name, capacity, reuse)
            except FileNotFoundError:  # deleted under us (the client's folder went away)
                pass
        return self.space.open(folder / name, capacity)

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

    def fetch(self, capture_ids: list[str]) -> FetchReply:
        """Hand over and forget these captures (ids never seen are absent from the reply)."""
        self._lanes.drain()
        reply = FetchReply(dtype=str(self.dtype).removeprefix("torch."))
        for capture_id, record in self._take(capture_ids, reply.errors):
            rows = int(self._num_rows[record.index])
            missing = int(self._missing_from[record.index])
            if missing >= 0:
                reply.errors[capture_id] = f"rows from {missing} on were never recorded (vLLM skipped or exceeded them)"
            window = record.window
            if window is None:
                continue
            handed_over = missing < 0 and not record.inline
            for block, layer in enumerate(record.layers):
                if handed_over:
                    offset = block * record.capacity * self.space.row_bytes
                    reply.files[capture_id, layer] = (str(window.path), rows, offset)
                elif missing < 0:
                    reply.inline[capture_id, layer] = self.space.view(window, rows, block * record.capacity).clone()
            self._close(window, unlink=not handed_over)
        return reply

    def release(self, capture_ids: list[str]) -> None:
        for _, record in self._take(capture_ids, {}):
            if record.window is not None:
                self._close(record.window, unlink=True)

    def _close(self, window: Window, unlink: bool) -> None:
        """Unmap a window once the writes queued for it are done (on any
        helper thread: its layers' rows may be on several). Unmapping hundreds
        of MB of touched pages takes ~25 ms per 400 MB, so on CUDA a helper
        thread does it after the reply has gone."""
        self._lanes.after_all(partial(self.space.close, window, unlink))

    def _take(self, capture_ids: list[str], errors: dict[str, str]) -> list[tuple[str, CaptureRecord]]:
        """Remove these captures from the store (blocked for a grace period)."""
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

    def recycle(self, paths: list[str]) -> None:
        """Keep these handed-over files (the client no longer views them) for
        later captures; past the pool's limit the oldest are deleted, on a
        helper thread (freeing hundreds of MB takes tens of milliseconds)."""
        for name in paths:
            path = Path(name)
            if _layer_of(path) in self.layers:  # a pipeline stage keeps the files of its own layers
                for dropped in self._pool.add(path):
                    self._lanes.submit(0, None, partial(dropped.unlink, missing_ok=True))

    def stats(self) -> dict[str, int]:
        """Counts of captures held, once the helper threads have finished
        what was queued (writes, and unmapping handed-over files), and
        bytes: of the open capture files (``open_row_bytes``, their full
        sizes) and of the files kept for reuse (``recycled_bytes``)."""
        self._lanes.drain()
        return {
            "captures": len(self._records) + len(self._failed),
            "released": len(self._released),
            "recycled_files": len(self._pool),
            "open_row_bytes": self._space.open_file_bytes if self._space is not None else 0,
            "recycled_bytes": self._pool.bytes,
        }


class HostStaging:
    """Copies a step's captured rows to pinned host memory off the model's stream.

    The rows are first gathered into one device tensor on the model's stream
    (a few microseconds: the next step overwrites the capture buffers, so this
    must happen in order), then copied to the host on a side stream, where the
    copy overlaps the next forward instead of delaying it (8 MB per decode step
    for 4 layers at 256 rows took ~0.3 ms of the model's stream).
    """

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream()

    def stage(self, sources: list[Tensor]) -> tuple[Tensor, Any]:
        """A pinned host copy of the layers' rows (``[layer, row, hidden]``)
        and an event that says when it has landed."""
        gathered = torch.stack(sources)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            host.copy_(gathered, non_blocking=True)
            gathered.record_stream(self.stream)  # keep its memory until the copy is done
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return host, ready
