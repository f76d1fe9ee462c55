"""Capture bookkeeping without an engine: the worker's CaptureStore writing a
step's rows into per-capture files, the client reading them back, and
CaptureHandle's rules."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from workbench import CaptureError, CaptureHandle, CaptureIndexError, CaptureNotFetchedError, HandleReleasedError
from workbench.errors import RowSpaceError
from workbench.runtime.capture_space import FreeRanges, RowSpace
from workbench.runtime.capture_store import RELEASE_GRACE_STEPS, CaptureStore, FilePool, HostLanes
from workbench.transfer import read_reply
from workbench.wire import CaptureRequest, FetchReply

HIDDEN = 6
BOOKS_EMPTY = {"captures": 0, "released": 0, "recycled_files": 0, "open_row_bytes": 0, "recycled_bytes": 0}


@dataclass(frozen=True)
class Step:
    """The two fields of ``StepRows`` the store reads."""

    starts: np.ndarray
    computed: np.ndarray


def rows_at(positions: list[int], tag: float = 0.0) -> torch.Tensor:
    """Rows whose values say their position (plus a tag telling requests apart)."""
    return torch.tensor(positions, dtype=torch.float32).unsqueeze(1).repeat(1, HIDDEN) + tag


class Recorder:
    """Feeds a CaptureStore steps of a batch the way the worker's step hook does."""

    def __init__(self, captures: list[CaptureRequest | None], threads: int = 0) -> None:
        self.store = CaptureStore(frozenset(range(8)), HIDDEN, torch.float32, torch.device("cpu"), threads)
        self.new_batch(captures)

    def new_batch(self, captures: list[CaptureRequest | None]) -> None:
        self.captures = captures
        self.capturing = [place for place, capture in enumerate(captures) if capture]
        self.key = object()

    def step(self, chunks: list[tuple[int, int]], layers: tuple[int, ...] = (3,)) -> None:
        """``chunks[place] = (first_position, count)``; each row holds its position + place * 1000."""
        counts = [count for _, count in chunks]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        computed = np.array([first for first, _ in chunks], dtype=np.int64)
        buffer = torch.cat(
            [rows_at(list(range(first, first + count)), 1000.0 * place) for place, (first, count) in enumerate(chunks)]
        )
        buffers = {layer: buffer + 100_000 * layer for layer in layers}
        self.store.record(self.key, self.captures, self.capturing, Step(starts, computed), buffers)
        self.store.tick()

    def fetch(self, ids: list[str]) -> tuple[dict[tuple[str, int], torch.Tensor], FetchReply]:
        # Through the wire format, as the client receives it.
        reply = FetchReply.from_wire(self.store.fetch(ids).to_wire())
        return read_reply(reply, HIDDEN), reply


def payload(capture_id: str, folder: Path | None, layers=(3,), capacity: int = 16) -> CaptureRequest:
    return CaptureRequest(capture_id, tuple(layers), capacity, str(folder) if folder else None)


@pytest.mark.parametrize("threads", [0, 2], ids=["in place", "helper threads"])
def test_rows_of_interleaved_requests_land_in_their_files(tmp_path, threads):
    # With two helper threads, layers 0-3 go to one and 4-7 to the other: a's rows of
    # layers 2 and 3 are written as one copy.
    recorder = Recorder([payload("a", tmp_path, (5, 2, 3)), None, payload("b", tmp_path)], threads)
    recorder.step([(0, 4), (0, 2), (0, 3)], layers=(2, 3, 5))  # prefill
    for position in range(4):
        recorder.step([(4 + position, 1), (2 + position, 1), (3 + position, 1)], layers=(2, 3, 5))
    assert len(list(tmp_path.iterdir())) == 2  # a (layers 2, 3 and 5), b: written while generating
    rows, reply = recorder.fetch(["a", "b"])
    assert reply.errors == {}
    assert torch.equal(rows["a", 2], rows_at(list(range(8))) + 200_000)
    assert torch.equal(rows["a", 3], rows_at(list(range(8))) + 300_000)
    assert torch.equal(rows["a", 5], rows_at(list(range(8))) + 500_000)
    assert torch.equal(rows["b", 3], rows_at(list(range(7)), 2000.0) + 300_000)
    recorder.store._lanes.drain()  # windows are unmapped after the reply
    assert not any(tmp_path.iterdir())  # the client unlinked the files it mapped
    assert recorder.store.stats() == BOOKS_EMPTY | {"released": 2}


def test_a_pipeline_stage_records_only_its_own_layers(tmp_path):
    recorder = Recorder([payload("a", tmp_path, (3, 12))])  # layer 12 lives on another stage
    recorder.step([(0, 3)], layers=(3,))
    rows, reply = recorder.fetch(["a"])
    assert set(rows) == {("a", 3)} and reply.errors == {}


def test_recomputed_rows_replace_what_they_overlap(tmp_path):
    recorder = Recorder([payload("a", tmp_path)])
    recorder.step([(0, 5)])
    recorder.step([(5, 1)])
    recorder.step([(3, 4)])  # a preempted request recomputed from position 3
    rows, _ = recorder.fetch(["a"])
    assert torch.equal(rows["a", 3], rows_at(list(range(7))) + 300_000)


def test_gaps_and_overflow_are_reported(tmp_path):
    recorder = Recorder([payload("a", tmp_path), payload("b", tmp_path, capacity=3)])
    recorder.step([(2, 2), (0, 5)])
    _, reply = recorder.fetch(["a", "b"])
    assert reply.errors == {
        "a": "rows from 0 on were never recorded (vLLM skipped or exceeded them)",
        "b": "rows from 3 on were never recorded (vLLM skipped or exceeded them)",
    }
    assert not any(tmp_path.iterdir())


def test_released_captures_delete_their_files_and_stay_blocked(tmp_path):
    recorder = Recorder([payload("a", tmp_path)])
    recorder.step([(0, 3)])
    recorder.store.release(["a"])
    assert not any(tmp_path.iterdir())
    recorder.step([(3, 1)])  # a step dispatched before the release arrived
    assert recorder.store.stats() == BOOKS_EMPTY | {"released": 1}
    for position in range(4, 4 + 2 * RELEASE_GRACE_STEPS):  # its request runs on (its abort is slow)...
        recorder.step([(position, 1)])
    recorder.key = object()  # ...into a new batch composition
    recorder.step([(4 + 2 * RELEASE_GRACE_STEPS, 1)])
    assert recorder.store.stats() == BOOKS_EMPTY | {"released": 1}  # blocked while it runs
    assert not any(tmp_path.iterdir())
    rows, _ = recorder.fetch(["a"])
    assert rows == {}


def test_rows_come_inline_when_the_folder_is_not_visible(tmp_path):
    recorder = Recorder([payload("a", tmp_path / "elsewhere")])
    recorder.step([(0, 3)])
    rows, reply = recorder.fetch(["a"])
    assert reply.files == {} and reply.inline
    assert torch.equal(rows["a", 3], rows_at([0, 1, 2]) + 300_000)


def test_row_space_reuses_closed_windows(tmp_path):
    space = RowSpace(HIDDEN, torch.float32, reserved_bytes=64 * 4096)
    windows = [space.open(tmp_path / f"{i}.rows", 100) for i in range(3)]
    space.view(windows[1], 100).fill_(7.0)
    space.close(windows[1], unlink=False)
    assert torch.equal(torch.from_file(str(tmp_path / "1.rows"), size=100 * HIDDEN), torch.full((100 * HIDDEN,), 7.0))
    again = space.open(tmp_path / "again.rows", 100)
    assert again.first_row == windows[1].first_row


def test_a_capture_that_might_not_fit_in_shared_memory_is_refused(tmp_path):
    space = RowSpace(HIDDEN, torch.float32)
    stats = os.statvfs(tmp_path)
    too_many = stats.f_bavail * stats.f_frsize // space.row_bytes + 1
    with pytest.raises(RowSpaceError, match="MiB free"):
        space.open(tmp_path / "big.rows", too_many)
    assert not any(tmp_path.iterdir())
    space.open(tmp_path / "small.rows", 10)  # the space still works


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 20)), max_size=60))
def test_free_ranges_never_overlap_and_merge_back(operations):
    free = FreeRanges(0, 200)
    taken: list[tuple[int, int]] = []
    for allocate, length in operations:
        if allocate or not taken:
            start = free.take(length)
            if start is not None:
                assert all(start + length <= s or s + n <= start for s, n in taken)
                assert 0 <= start and start + length <= 200
                taken.append((start, length))
        else:
            free.give(*taken.pop(length % len(taken)))
    for range_ in taken:
        free.give(*range_)
    assert free.take(200) == 0


def test_helper_lanes_run_jobs_in_order_and_report_errors():
    """The helper threads the CUDA path uses (there each job first waits for its step's copy event)."""
    with torch.inference_mode():  # as in the worker, where vLLM's step runs in inference mode
        target = torch.zeros(8, HIDDEN)
    lanes = HostLanes(threads=2)
    for step in range(20):
        rows, destinations = rows_at([step, step]), torch.tensor([step % 4, 4 + step % 4])
        lanes.submit(step % 4, None, partial(target.index_copy_, 0, destinations, rows))
    lanes.drain()
    assert torch.equal(target[:4], rows_at([16, 17, 18, 19]))
    lanes.submit(0, None, partial(target.index_copy_, 0, torch.tensor([99]), rows_at([0])))
    with pytest.raises(CaptureError, match="writing captured rows failed"):
        lanes.drain()
    lanes.submit(1, None, partial(target.index_copy_, 0, torch.tensor([0]), rows_at([5])))  # still usable afterwards
    lanes.drain()
    assert torch.equal(target[0], rows_at([5])[0])


class Owner:
    """Stands for the model a handle fetches through."""

    async def fetch_captures_batch(self, handles):
        for handle in handles:
            handle._set_data({1: torch.zeros(4, 2)})


def make_handle(**kw) -> CaptureHandle:
    return CaptureHandle(
        request_id="r", capture_id="c", layer_indices=(1,), prompt_token_ids=(1, 2, 3), generated_token_ids=(4, 5), **kw
    )


def test_handle_requires_fetch_and_refuses_after_close():
    handle = make_handle()
    with pytest.raises(CaptureNotFetchedError, match="Captures not fetched yet"):
        handle.captures  # noqa: B018
    handle._set_data({1: torch.zeros(4, 2)})
    assert handle.hidden(1).shape == (4, 2)
    with pytest.raises(CaptureIndexError, match=r"layer_idx 7 is not in captured layers \[1\]"):
        handle.hidden(7)
    handle.close()
    with pytest.raises(HandleReleasedError, match="was closed"):
        handle.captures  # noqa: B018


async def test_handle_fetch_is_idempotent_and_boundaries_have_design_names():
    from workbench import MessageBoundary

    owner, handle = Owner(), make_handle()
    handle._attach(owner, lambda _: None)
    captures = await handle.fetch()
    assert await handle.fetch() is captures is handle.captures
    assert captures[1][0]["hidden"].shape == (4, 2)
    async with handle:
        pass
    assert handle.is_closed
    with pytest.raises(HandleReleasedError, match="was closed"):
        await handle.fetch()
    boundary = MessageBoundary("user", "hi", 3, 7)
    assert (boundary.start_token, boundary.end_token, boundary.num_tokens) == (3, 7, 4)


def test_handle_rejects_wrong_row_counts_and_missing_layers():
    with pytest.raises(CaptureError, match="expected 4"):
        make_handle()._set_data({1: torch.zeros(3, 2)})
    with pytest.raises(CaptureError, match=r"without layers \[1\]"):
        make_handle()._set_data({})


def test_dropping_an_unfetched_handle_releases_it():
    released = []
    handle = make_handle()
    owner = Owner()
    handle._attach(owner, released.append)
    del handle
    import gc

    gc.collect()
    assert released == ["c"]


def test_fetched_files_are_recycled_into_later_captures(tmp_path):
    """A file the client no longer views goes back to the worker, whose next
    capture writes into it (same inode: its pages are reused, not freed and
    faulted in again), and only that capture's rows are visible."""
    recorder = Recorder([payload("a", tmp_path, (3, 5)), payload("b", tmp_path)])
    recorder.step([(0, 6), (0, 4)], layers=(3, 5))
    given_back: list[str] = []
    rows = read_reply(recorder.store.fetch(["a", "b"]), HIDDEN, given_back.append)
    assert torch.equal(rows["a", 3], rows_at(list(range(6))) + 300_000)
    recorder.store._lanes.drain()
    inodes = {os.stat(path).st_ino for path in tmp_path.iterdir()}
    assert len(inodes) == 2 and not given_back  # the files stay while the tensors live
    kept = rows["b", 3][1:3]  # a view keeps its file's memory
    only_layer_5 = rows["a", 5]  # so does one layer of a capture: its file holds both
    del rows
    assert given_back == []
    del only_layer_5
    assert len(given_back) == 1
    del kept
    assert sorted(Path(path).name for path in given_back) == ["a-3.rows", "b-3.rows"]
    recorder.store.recycle(given_back)
    assert recorder.store.stats()["recycled_files"] == 2

    recorder.new_batch([payload("c", tmp_path, capacity=8)])
    recorder.step([(0, 2)])
    recorder.step([(2, 1)])
    assert recorder.store.stats()["recycled_files"] == 1
    assert {os.stat(path).st_ino for path in tmp_path.iterdir()} == inodes
    rows = read_reply(recorder.store.fetch(["c"]), HIDDEN)
    assert torch.equal(rows["c", 3], rows_at(list(range(3))) + 300_000)


def test_the_file_pool_keeps_the_newest_files_within_its_limit(tmp_path):
    pool = FilePool(limit=3 * 8192)
    files = []
    for index in range(5):
        files.append(tmp_path / f"c{index}-3.rows")
        files[-1].write_bytes(b"x" * 8192)
    dropped = [old for path in files for old in pool.add(path)]
    assert dropped == files[:2] and len(pool) == 3
    assert pool.take(tmp_path, 100) == files[2] and pool.take(tmp_path / "elsewhere", 100) is None
    assert pool.add(tmp_path / "gone-3.rows") == [] and len(pool) == 2


def test_the_file_pool_gives_files_within_a_factor_of_two_of_the_size_asked(tmp_path):
    """The smallest file that holds the rows, else the largest holding half of
    them; a capture never takes a file more than twice its size (or half)."""
    pool = FilePool(limit=1 << 30)
    sizes = {"small": 4096, "large": 8 * 4096, "medium": 3 * 4096, "huge": 64 * 4096}
    for name, size in sizes.items():
        (tmp_path / f"{name}-0.rows").write_bytes(b"x" * size)
        pool.add(tmp_path / f"{name}-0.rows")
    assert pool.take(tmp_path, 2 * 4096).stem == "medium-0"
    assert pool.take(tmp_path, 9 * 4096).stem == "large-0"
    assert pool.take(tmp_path, 1).stem == "small-0"  # files hold whole pages
    assert pool.take(tmp_path, 4096) is None and pool.take(tmp_path, 256 * 4096) is None
    assert pool.take(tmp_path, 40 * 4096).stem == "huge-0" and len(pool) == 0


@pytest.mark.parametrize("hidden", [8, 6, 5], ids=["16-byte rows", "8-byte rows", "odd rows"])
def test_row_space_writes_keep_every_bit(tmp_path, hidden):
    """Rows move as the widest element that divides them; NaN payloads and
    negative zeros of bfloat16 come out as they went in."""
    space = RowSpace(hidden, torch.bfloat16, reserved_bytes=1 << 24)
    window = space.open(tmp_path / "bits.rows", 32)
    bits = torch.randint(-(2**15), 2**15, (32, hidden), dtype=torch.int16, generator=torch.Generator().manual_seed(0))
    bits[0, :2] = torch.tensor([0x7FC1, -(2**15)], dtype=torch.int16)  # a NaN with a payload, -0.0
    destinations = torch.arange(32).flip(0) + window.first_row
    space.write(destinations, bits.view(torch.bfloat16))
    assert torch.equal(space.view(window, 32).view(torch.int16), bits.flip(0))


def test_a_window_closes_only_after_every_lane_wrote_into_it():
    """A capture's layers are written by several helper threads; closing its
    window waits for all of them (unmapped memory must never be written)."""
    lanes = HostLanes(threads=3)
    done: list[int] = []
    gate = threading.Event()
    lanes.submit(2, None, gate.wait)
    for lane in range(3):
        lanes.submit(lane, None, partial(done.append, lane))
    lanes.after_all(partial(done.append, -1))
    time.sleep(0.2)
    assert -1 not in done  # lane 2 is still busy
    gate.set()
    lanes.drain()
    assert done[-1] == -1 and sorted(done[:-1]) == [0, 1, 2]
