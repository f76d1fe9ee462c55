"""Bulk extraction to disk and the capture budget, on the shared real engine (float32, greedy)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from vllm import SamplingParams

from workbench import ActivationReader, CaptureBudgetError, CaptureIndexError, ExtractError
from workbench.capture_budget import CaptureBudget

LAYERS = (3, 17)
PROMPTS = [
    "The capital of France is",
    "Write a haiku about rain:",
    [1, 504, 3458, 314],  # token ids
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    "List three prime numbers:",
]


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)


async def reference(model, prompts, params, layers=LAYERS):
    """The handles of ``generate`` / ``chat`` with ``capture_layers``, fetched."""
    handles = []
    for prompt in prompts:
        if isinstance(prompt, list) and isinstance(prompt[0], dict):
            _, found = await model.chat(prompt, params, capture_layers=list(layers))
        else:
            _, found = await model.generate(prompt, params, capture_layers=list(layers))
        handles.extend(found)
    await model.fetch_captures_batch(handles)
    return handles


async def test_extracted_rows_equal_generate_captures_at_every_positions_choice(model, tmp_path):
    params = greedy(5)
    handles = await reference(model, PROMPTS, params)
    for positions in ("all", "prompt", "generated", "last"):
        # One request at a time, as the reference ran: the same batch shapes give the same float32 rows.
        reader = await model.extract(
            PROMPTS,
            list(LAYERS),
            tmp_path / positions,
            positions=positions,
            sampling_params=params,
            max_in_flight=1,
            progress=False,
        )
        assert reader.is_complete and reader.prompt_ids == list(range(len(PROMPTS)))
        for prompt_id, handle in enumerate(handles):
            prompt_len, rows = len(handle.prompt_token_ids), handle.expected_rows
            start, end = {"all": (0, rows), "prompt": (0, prompt_len), "generated": (prompt_len, rows)}.get(
                positions, (rows - 1, rows)
            )
            record = reader.prompt(prompt_id)
            assert record.prompt_token_ids == handle.prompt_token_ids
            assert record.generated_token_ids == handle.generated_token_ids
            assert record.positions == range(start, end)
            assert record.message_boundaries == handle.message_boundaries
            for layer in LAYERS:
                assert torch.equal(reader.rows(prompt_id, layer), handle.hidden(layer)[start:end])
            assert set(reader.request(prompt_id)) == set(LAYERS)
        whole = reader.layer(17)
        assert torch.equal(
            whole,
            torch.cat(
                [
                    h.hidden(17)[reader.prompt(i).first_position :][: reader.prompt(i).rows]
                    for i, h in enumerate(handles)
                ]
            ),
        )
        frame = reader.index
        assert list(frame.index) == list(range(len(PROMPTS))) and frame["rows"].sum() == whole.shape[0]
        assert frame.loc[3, "messages"] == len(PROMPTS[3])
    # Batched (the default), tokens are the same and rows equal up to batch-dependent GEMM rounding.
    batched = await model.extract(PROMPTS, list(LAYERS), tmp_path / "batched", sampling_params=params, progress=False)
    for prompt_id, handle in enumerate(handles):
        assert batched.prompt(prompt_id).generated_token_ids == handle.generated_token_ids
        rows, expected = batched.rows(prompt_id, 17), handle.hidden(17)
        cosine = torch.nn.functional.cosine_similarity(rows, expected, dim=-1)
        assert cosine.min() > 0.99999, (prompt_id, cosine.min(), (rows - expected).abs().max())
    with pytest.raises(CaptureIndexError, match="layer 4 was not extracted"):
        reader.rows(0, 4)
    for handle in handles:
        handle.close()


async def test_an_interrupted_extraction_resumes_with_only_the_missing_prompts(model, tmp_path):
    prompts = [f"Fact number {i} about the sea is" for i in range(12)]
    params = greedy(3)
    # One request at a time, so that every run computes the same float32 rows.
    options = {"sampling_params": params, "max_in_flight": 1, "progress": False}
    clean = await model.extract(prompts, [5], tmp_path / "clean", **options)
    folder = tmp_path / "resumed"
    # shard_bytes=1: every prompt closes a shard; stop the run once a few are written.
    task = asyncio.create_task(model.extract(prompts, [5], folder, shard_bytes=1, **options))
    while len(shards_of(folder)) < 3:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    first = shards_of(folder)
    assert 3 <= len(first) < len(prompts)
    kept = {shard["name"]: (folder / f"{shard['name']}.safetensors").stat().st_mtime_ns for shard in first}
    done_before = {i for shard in first for i in shard["prompt_ids"]}
    partial = ActivationReader(folder)
    assert not partial.is_complete and set(partial.prompt_ids) == done_before

    reader = await model.extract(prompts, [5], folder, shard_bytes=1, **options)
    shards = shards_of(folder)
    assert shards[: len(first)] == first
    assert {name: (folder / f"{name}.safetensors").stat().st_mtime_ns for name in kept} == kept
    assert sorted(i for shard in shards for i in shard["prompt_ids"]) == list(range(len(prompts)))  # once each
    assert torch.equal(reader.layer(5), clean.layer(5))

    with pytest.raises(ExtractError, match="other prompts"):
        await model.extract(prompts[:-1], [5], folder, sampling_params=params, progress=False)
    with pytest.raises(ExtractError, match="other settings.*positions"):
        await model.extract(prompts, [5], folder, positions="last", sampling_params=params, progress=False)
    again = await model.extract(
        prompts, [5], folder, positions="last", sampling_params=params, overwrite=True, progress=False
    )
    assert again.positions == "last" and again.layer(5).shape == (len(prompts), 576)


def shards_of(folder: Path) -> list[dict]:
    try:
        return json.loads((folder / "index.json").read_text())["shards"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@contextlib.contextmanager
def small_budget(model, limit: int) -> Iterator[CaptureBudget]:
    saved = model._link.budget
    model._link.budget = budget = CaptureBudget(limit)
    try:
        yield budget
    finally:
        model._link.budget = saved


async def test_capturing_far_more_than_the_budget_waits_for_room_and_stays_within_it(model):
    params = greedy(4)
    row_bytes = 576 * 4
    one = (8 + 4 - 1) * 2 * row_bytes  # an upper bound of one request's reservation (<= 8 prompt tokens)
    peak = {"reserved": 0, "waiting": 0}
    with small_budget(model, 3 * one) as budget:

        async def watch() -> None:
            while True:
                peak["reserved"] = max(peak["reserved"], budget.used_bytes)
                peak["waiting"] = max(peak["waiting"], budget.use().waiting)
                await asyncio.sleep(0)

        async def watch_worker() -> None:  # the worker's open capture files, the memory rows may take
            while True:
                stats = (await model.worker_stats())[0]
                peak["files"] = max(peak.get("files", 0), stats["open_row_bytes"])
                await asyncio.sleep(0.05)

        async def one_request(i: int) -> None:
            _, (handle,) = await model.generate(f"Count to {i}:", params, capture_layers=[2, 9])
            await handle.fetch()
            assert handle.hidden(9).shape[0] == handle.expected_rows
            handle.close()

        watchers = [asyncio.create_task(watch()), asyncio.create_task(watch_worker())]
        try:
            await asyncio.gather(*(one_request(i) for i in range(40)))  # ~13x the budget in total
        finally:
            for watcher in watchers:
                watcher.cancel()
        assert 0 < peak["reserved"] <= budget.limit_bytes and peak["waiting"] > 0
        assert 0 < peak["files"] <= budget.limit_bytes
        stats = (await model.worker_stats())[0]
        assert stats["capture_budget_bytes"] == 3 * one and stats["capture_reserved_bytes"] == 0
        assert stats["open_row_bytes"] == 0

        with pytest.raises(CaptureBudgetError, match=r"prompt 0 .* more than the whole capture budget"):
            await model.generate("Hello", greedy(400), capture_layers=[2, 9])
        with pytest.raises(CaptureBudgetError, match=r"this call's 20 captures together"):
            await model.generate(["Hi"] * 20, params, capture_layers=[2, 9])
        assert budget.used_bytes == 0


async def test_the_default_budget_is_half_the_free_shared_memory(model):
    use = model.capture_budget
    free = psutil.disk_usage(model._link.handoff_folder).free
    assert 0.3 * free < use.limit_bytes < 0.7 * free + 2**30
    assert (await model.worker_stats())[0]["capture_budget_bytes"] == use.limit_bytes


def engine_rss_mib() -> float:
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


def folder_mib(folder: str) -> float:
    return sum(path.stat().st_blocks * 512 for path in Path(folder).iterdir()) / 2**20


async def test_extracting_a_thousand_prompts_keeps_memory_flat(model, tmp_path):
    prompts = [[1 + i % 500, 300 + i % 97, 17] for i in range(1000)]
    params = greedy(2)
    await model.extract(prompts[:100], [4, 20], tmp_path / "warm", sampling_params=params, progress=False)
    gc.collect()
    before = engine_rss_mib(), folder_mib(model._link.handoff_folder)
    reader = await model.extract(
        prompts, [4, 20], tmp_path / "big", sampling_params=params, shard_bytes=1 << 20, progress=False
    )
    gc.collect()
    after = engine_rss_mib(), folder_mib(model._link.handoff_folder)
    assert reader.is_complete and reader.layer(20).shape == (1000 * 4, 576)
    print(f"process tree {before[0]:.0f} -> {after[0]:.0f} MiB, hand-off folder {before[1]:.1f} -> {after[1]:.1f} MiB")
    assert after[0] - before[0] < 64 and after[1] - before[1] < 16
    assert (await model.worker_stats())[0]["captures"] == 0
