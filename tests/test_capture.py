"""CaptureAccumulator and CaptureHandle logic (no engine)."""

from __future__ import annotations

import pytest
import torch

from workbench import CaptureError, CaptureHandle, HandleReleasedError
from workbench.capture import CaptureAccumulator


def rows(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count, dtype=torch.float32).unsqueeze(1).repeat(1, 2)


def step(rows_: torch.Tensor, layer: int = 0) -> dict[int, torch.Tensor]:
    return {layer: rows_}


def assembled(acc: CaptureAccumulator, layer: int) -> torch.Tensor:
    out = torch.empty(acc.num_rows, 2)
    acc.assemble_into(layer, out)
    return out


def test_chunks_concatenate_in_order():
    acc = CaptureAccumulator((3,))
    acc.add(0, step(rows(0, 4), 3), 0, 4)
    acc.add(4, step(torch.cat([rows(50, 2), rows(4, 3)]), 3), 2, 5)  # rows 2..5 of a shared step snapshot
    acc.add(7, step(rows(7, 1), 3), 0, 1)
    assert torch.equal(assembled(acc, 3), rows(0, 8))
    assert acc.gap is None


def test_recomputed_rows_replace_what_they_overlap():
    acc = CaptureAccumulator((0,))
    acc.add(0, step(rows(0, 5)), 0, 5)
    acc.add(5, step(rows(5, 1)), 0, 1)
    acc.add(3, step(rows(3, 4) + 100), 0, 4)  # a preempted request recomputed from position 3
    out = assembled(acc, 0)
    assert torch.equal(out[:3], rows(0, 3))
    assert torch.equal(out[3:], rows(3, 4) + 100)


def test_gaps_are_reported():
    acc = CaptureAccumulator((0,))
    acc.add(2, step(rows(2, 2)), 0, 2)
    assert acc.gap == "rows 0..1 were never computed"


def make_handle(**kw) -> CaptureHandle:
    return CaptureHandle(
        request_id="r", capture_id="c", layer_indices=(1,), prompt_token_ids=(1, 2, 3), generated_token_ids=(4, 5), **kw
    )


def test_handle_requires_fetch_and_refuses_after_close():
    handle = make_handle()
    with pytest.raises(HandleReleasedError, match="not fetched yet"):
        handle.captures  # noqa: B018
    handle._set_data({1: torch.zeros(4, 2)})
    assert handle.hidden(1).shape == (4, 2)
    with pytest.raises(CaptureError, match="layer 7 was not captured"):
        handle.hidden(7)
    handle.close()
    with pytest.raises(HandleReleasedError, match="was closed"):
        handle.captures  # noqa: B018


def test_handle_rejects_wrong_row_counts_and_missing_layers():
    with pytest.raises(CaptureError, match="expected 4"):
        make_handle()._set_data({1: torch.zeros(3, 2)})
    with pytest.raises(CaptureError, match=r"without layers \[1\]"):
        make_handle()._set_data({})


def test_dropping_an_unfetched_handle_releases_it():
    released = []
    handle = make_handle()
    handle._attach_release(released.append)
    del handle
    import gc

    gc.collect()
    assert released == ["c"]
