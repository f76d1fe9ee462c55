"""The inf/NaN board between a worker and the client (``wire.NonfiniteBoard``),
written by the worker's ``NonfiniteWatch`` and read as the client reads it,
without an engine."""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import torch

from workbench import wire
from workbench.runtime.nonfinite import NonfiniteWatch
from workbench.runtime.steering_tables import NO_LAYER


def test_the_board_holds_each_broken_request_at_its_lowest_layer(tmp_path):
    marks = torch.full((8,), NO_LAYER, dtype=torch.int32)
    watch = NonfiniteWatch(marks)
    reader = wire.NonfiniteBoardReader([watch.open_board(str(tmp_path))])
    assert math.isinf(reader.through())  # on CPU every step is read before its outputs leave

    starts = np.array([0, 3, 5, 8])  # three requests of 3, 2 and 3 rows
    marks[4] = 7  # the second request broke at layer 7
    marks[6:8] = torch.tensor([9, 5], dtype=torch.int32)  # the third at 9 and 5: 5 counts
    watch.after_step(starts, ["a", "b", "c"])
    marks.fill_(NO_LAYER)
    marks[1] = 3
    watch.after_step(np.array([0, 2]), [None])  # an unsteered request's rows are never flagged
    reader.through()
    assert (reader.take("a"), reader.take("b"), reader.take("c")) == (None, 7, 5)
    assert reader.take("b") is None  # taken once
    assert watch.take(["b", "c"]) == {"b": 7, "c": 5}  # the worker's own answer agrees
    reader.close()


def test_the_reader_keeps_a_line_cut_short_for_the_next_read(tmp_path):
    board = wire.NonfiniteBoard.create(tmp_path, 5.0)
    reader = wire.NonfiniteBoardReader([board.paths])
    found_path, _ = board.paths
    with open(found_path, "ab") as found:
        found.write(b'["r1", 3]\n["r2"')
    assert reader.through() == 5.0
    assert reader.take("r1") == 3 and reader.take("r2") is None
    with open(found_path, "ab") as found:
        found.write(b", 4]\n")
    board.post([("r3", 2)], 6.5)
    assert reader.through() == 6.5
    assert (reader.take("r2"), reader.take("r3")) == (4, 2)
    reader.close()


def test_the_earliest_board_decides(tmp_path):
    first, second = wire.NonfiniteBoard.create(tmp_path, 1.0), wire.NonfiniteBoard.create(tmp_path, float("inf"))
    reader = wire.NonfiniteBoardReader([first.paths, second.paths])
    assert reader.through() == 1.0
    first.post_through(float("inf"))
    assert math.isinf(reader.through())
    reader.close()
    assert len(os.listdir(tmp_path)) == 4


class Copy:
    """Stands in for the CUDA event of a step's marks copy: lands when ``land()`` is called."""

    def __init__(self) -> None:
        self._landed = threading.Event()

    def land(self) -> None:
        self._landed.set()

    def query(self) -> bool:
        return self._landed.is_set()

    def synchronize(self) -> None:
        self._landed.wait()


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_marks_in_flight_hold_the_boards_time_until_they_land(tmp_path):
    """As on CUDA: the helper thread reads each step's marks once its copy lands;
    until then the board's time stays before that step, so a request that
    finished in it waits, and the marks are on the board once the time passes it."""
    watch = NonfiniteWatch(torch.full((4,), NO_LAYER, dtype=torch.int32))
    reader = wire.NonfiniteBoardReader([watch.open_board(str(tmp_path))])
    first, second = Copy(), Copy()
    queued = time.monotonic()
    watch._queue(torch.tensor([NO_LAYER, 4], dtype=torch.int32), first, np.array([0, 1, 2]), ["a", "b"])
    between = time.monotonic()  # "b" finished in the first step: its output left after this
    watch._queue(torch.tensor([2, NO_LAYER], dtype=torch.int32), second, np.array([0, 1, 2]), ["a", "b"])
    finished = time.monotonic()  # "a" finished in the second
    assert queued <= reader.through() < between
    first.land()
    wait_for(lambda: reader.through() >= between)
    assert reader.through() < finished  # the second step is still in flight
    assert reader.take("b") == 4
    second.land()
    wait_for(lambda: math.isinf(reader.through()))
    assert reader.take("a") == 2
    reader.close()


def test_a_worker_call_waits_for_marks_in_flight(tmp_path):
    watch = NonfiniteWatch(torch.full((4,), NO_LAYER, dtype=torch.int32))
    copy = Copy()
    watch._queue(torch.tensor([3], dtype=torch.int32), copy, np.array([0, 1]), ["a"])
    threading.Timer(0.05, copy.land).start()
    assert watch.take(["a"]) == {"a": 3}
