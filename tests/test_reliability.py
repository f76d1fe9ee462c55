"""Reliability: bad input, isolation under load, no leaks, faults.

All on the shared real engine (float32, greedy) unless a test needs its own.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm import SamplingParams

from workbench import (
    AblationSpec,
    AddSpec,
    CaptureError,
    CaptureHandle,
    ChatError,
    DtypeRangeError,
    HandleReleasedError,
    HiddenSizeError,
    LayerIndexError,
    LayerSteeringSpec,
    ProjectionCapSpec,
    PromptError,
    SpecError,
    SteeringSpec,
    WorkerTimeoutError,
)
from workbench.wire import HandoffFolder

HIDDEN, LAYERS = 576, 30
PROMPTS = [
    "The capital of France is",
    "Write a haiku about rain:",
    "List three prime numbers:",
    "My favourite animal is the",
]


def vector(seed: int) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)


# -- bad input -----------------------------------------------------------------


def bad_calls(model, tmp_path: Path):
    """(call, error type, text the message must contain) for every kind of bad input."""
    wrong_size = tmp_path / "wrong-size.safetensors"
    SteeringSpec({1: LayerSteeringSpec(add=AddSpec(torch.ones(8)))}).save(wrong_size)
    truncated = tmp_path / "truncated.safetensors"
    SteeringSpec({1: LayerSteeringSpec(add=AddSpec(vector(1)))}).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    foreign = CaptureHandle(request_id="r", capture_id="0" * 32, layer_indices=(3,), prompt_token_ids=(1, 2))
    return [
        (lambda: model.set_layer_vector(3, torch.randn(10)), HiddenSizeError, "size 10"),
        (lambda: model.set_layer_vector(3, torch.ones(HIDDEN, dtype=torch.int64)), SpecError, "floating dtype"),
        (lambda: model.set_layer_vector(3, torch.empty(HIDDEN, device="meta")), SpecError, "meta device"),
        (lambda: model.set_layer_vector(3, torch.full((HIDDEN,), float("nan"))), SpecError, "non-finite value nan"),
        (lambda: model.set_layer_vector(3, vector(1), scale=float("inf")), SpecError, "scale must be finite"),
        (lambda: model.set_layer_vector(LAYERS, vector(1)), LayerIndexError, f"layer {LAYERS}"),
        (lambda: model.set_layer_projection_cap(3, torch.zeros(HIDDEN), min=-1, max=1), SpecError, "norm 0.0"),
        (lambda: model.set_layer_projection_cap(3, vector(1), min=2.0, max=1.0), SpecError, "min (2.0)"),
        (lambda: model.set_layer_ablation(3, vector(1), scale=float("nan")), SpecError, "scale must be finite"),
        # Values the residual stream cannot hold: a norm whose square overflows float32 in the next norm.
        (lambda: model.set_layer_vector(3, torch.full((HIDDEN,), 1e18)), DtypeRangeError, "norm is 2.4e+19"),
        (lambda: model.set_layer_vector(3, vector(1), scale=1e37), DtypeRangeError, "at most 1.84e+19"),
        (lambda: model.set_layer_projection_cap(3, vector(1), min=1e20), DtypeRangeError, "the cap's min is 1e+20"),
        (lambda: model.chat([{"role": "wizard", "content": "hi"}], greedy(2)), ChatError, "wizard"),
        (lambda: model.generate([], greedy(2)), PromptError, "empty"),
        (lambda: model.generate(["ok", 42], greedy(2)), PromptError, "prompts[1]"),
        (lambda: model.generate([[7] * 1024], greedy(2)), PromptError, "1024 tokens"),
        (lambda: model.generate("hi", greedy(2), capture_layers=[LAYERS]), LayerIndexError, f"layer {LAYERS}"),
        (lambda: model.generate("hi", greedy(2), capture_layers=[]), CaptureError, "empty"),
        (lambda: model.fetch_captures_batch([foreign]), HandleReleasedError, "unknown to this engine"),
        (lambda: model.apply_steering_spec(SteeringSpec.load(wrong_size)), HiddenSizeError, "hidden size is 576"),
        (lambda: model.apply_steering_spec(SteeringSpec.load(truncated)), SpecError, "truncated.safetensors"),
    ]


async def test_bad_input_raises_typed_errors_and_the_engine_keeps_serving(model, tmp_path):
    before = await model.generate(PROMPTS[0], greedy(6))
    spec_before = model.export_steering_spec()
    for call, error, text in bad_calls(model, tmp_path):
        with pytest.raises(error) as info:
            await call()
        assert text in str(info.value), (text, str(info.value))
    assert model.export_steering_spec() == spec_before  # nothing half-applied
    assert await model.generate(PROMPTS[0], greedy(6)) == before


async def test_a_stream_broken_by_steering_is_flagged_on_the_reply(model, hf, caplog):
    """An ablation scale the dtype holds can still blow a row past what the next
    norm can square: the reply says at which layer, and a warning names it;
    the unsteered request beside it is not flagged."""
    from tests.helpers import mean_direction

    direction = mean_direction(hf[0], model.tokenizer(PROMPTS[0]).input_ids, 6)  # a large projection
    spec = SteeringSpec({6: LayerSteeringSpec(ablation=AblationSpec(direction, scale=1e30))})
    with caplog.at_level("WARNING", logger="workbench.client"):
        plain, broken = await model.generate([PROMPTS[0]] * 2, greedy(4), steering_spec=[SteeringSpec(), spec])
    assert plain.nonfinite_layer is None and broken.nonfinite_layer == 6
    assert "at layer 6" in caplog.text
    assert await model.generate(PROMPTS[0], greedy(4)) == [plain]  # the engine is unharmed


async def test_finished_steered_requests_read_their_flags_from_the_board(model, hf, monkeypatch):
    """The worker keeps its inf/NaN findings on a board in the hand-off folder:
    finished steered requests read their flags there, with no worker call
    (each pauses the engine between two steps); without a board they ask."""
    from tests.helpers import mean_direction
    from workbench import wire

    direction = mean_direction(hf[0], model.tokenizer(PROMPTS[0]).input_ids, 6)
    specs = [
        SteeringSpec(),
        SteeringSpec({6: LayerSteeringSpec(ablation=AblationSpec(direction, scale=1e30))}),
        SteeringSpec({4: LayerSteeringSpec(add=AddSpec(direction, scale=2.0))}),
    ]
    link = model._link
    calls: list[str] = []
    ask = link.rpc

    async def counted(method: str, *args):
        calls.append(method)
        return await ask(method, *args)

    await link.ensure_ready()
    assert link._board is not None  # the worker sees this host's hand-off folder
    monkeypatch.setattr(link, "rpc", counted)
    flags = [reply.nonfinite_layer for reply in await model.generate([PROMPTS[0]] * 3, greedy(4), steering_spec=specs)]
    assert flags == [None, 6, None]
    assert wire.Rpc.TAKE_NONFINITE not in calls

    board, link._board = link._board, None  # as with a worker on another host
    try:
        replies = await model.generate([PROMPTS[0]] * 3, greedy(4), steering_spec=specs)
    finally:
        link._board = board
    assert [reply.nonfinite_layer for reply in replies] == [None, 6, None]
    assert wire.Rpc.TAKE_NONFINITE in calls


async def test_a_bad_handle_in_a_fetch_does_not_cost_the_good_ones_their_rows(model):
    _, handles = await model.generate([PROMPTS[0], PROMPTS[1]], greedy(3), capture_layers=[5])
    foreign = CaptureHandle(request_id="r", capture_id="not-a-capture", layer_indices=(5,), prompt_token_ids=(1,))
    with pytest.raises(HandleReleasedError, match="not-a-capture"):
        await model.fetch_captures_batch([handles[0], foreign, handles[1]])
    assert all(handle.hidden(5).shape[0] == handle.expected_rows for handle in handles)
    for handle in handles:
        handle.close()
    gc.collect()
    stats = await drained_stats(model)
    # Their files went back to the worker for reuse: every capture file left is one it keeps.
    assert len(list(Path(model._link.handoff_folder).glob("*.rows"))) == stats["recycled_files"]


async def test_captures_come_back_inline_when_the_worker_cannot_see_the_shared_folder(model):
    """A worker on another host cannot see the client's /dev/shm folder: rows come back in the RPC reply."""
    _, shared = await model.generate(PROMPTS[0], greedy(4), capture_layers=[2, 9])
    folder, model._link.handoff_folder = model._link.handoff_folder, "/nonexistent/workbench-handoff"
    try:
        _, inline = await model.generate(PROMPTS[0], greedy(4), capture_layers=[2, 9])
    finally:
        model._link.handoff_folder = folder
    handles = shared + inline
    await model.fetch_captures_batch(handles)
    for layer in (2, 9):
        assert torch.allclose(handles[0].hidden(layer), handles[1].hidden(layer), rtol=1e-5, atol=1e-5)


async def test_released_handles_refuse_to_fetch(model):
    _, handles = await model.generate(PROMPTS[0], greedy(3), capture_layers=[2])
    handles[0].close()
    with pytest.raises(HandleReleasedError, match="was closed"):
        await model.fetch_captures_batch(handles)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 16),
    bad_index=st.integers(0, 15),
    bad_value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    op=st.sampled_from([AddSpec, ProjectionCapSpec, AblationSpec]),
)
def test_property_any_non_finite_entry_is_named(size, bad_index, bad_value, op):
    values = torch.ones(size)
    values[bad_index % size] = bad_value
    kwargs = {"min": -1.0} if op is ProjectionCapSpec else {}
    with pytest.raises(SpecError, match=f"at index {bad_index % size}"):
        op(values, **kwargs)


@settings(max_examples=60, deadline=None)
@given(low=st.floats(-1e6, 1e6), gap=st.floats(1e-3, 1e6))
def test_property_cap_bounds_must_be_ordered(low, gap):
    ProjectionCapSpec(torch.ones(4), min=low, max=low + gap)
    with pytest.raises(SpecError, match="is greater than max"):
        ProjectionCapSpec(torch.ones(4), min=low + gap, max=low)


async def test_worker_rpc_times_out_instead_of_hanging(model):
    """A worker that stops answering (here: its engine process is stopped with
    SIGSTOP) turns a worker call into a ``WorkerTimeoutError``; once it answers
    again, so does the engine."""
    cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]
    assert cores, "no vLLM engine-core process to stop"
    await model.worker_stats()  # the workers' one-time setup call is done
    timeout = model.cfg.rpc_timeout_s
    model.cfg.rpc_timeout_s = 0.5
    for core in cores:
        core.suspend()
    try:
        with pytest.raises(WorkerTimeoutError, match="workbench_stats"):
            await model.worker_stats()
    finally:
        for core in cores:
            core.resume()
        model.cfg.rpc_timeout_s = timeout
    assert (await model.worker_stats())[0]["captures"] >= 0


# -- isolation under load ----------------------------------------------------------


def random_spec(rng: random.Random, seed: int) -> SteeringSpec:
    layers = {}
    for layer in rng.sample(range(LAYERS), rng.randint(1, 4)):
        op = rng.choice(["add", "projection_cap", "ablation", "all"])
        positions = rng.choice(["all", "prompt", "generated"])
        direction = vector(seed * 100 + layer)
        layers[layer] = LayerSteeringSpec(
            add=AddSpec(direction, scale=rng.uniform(0.5, 3.0), positions=positions) if op in ("add", "all") else None,
            projection_cap=ProjectionCapSpec(direction, min=-2.0, max=2.0) if op in ("projection_cap", "all") else None,
            ablation=AblationSpec(vector(seed * 100 + layer + 50), scale=rng.uniform(0.0, 0.5))
            if op in ("ablation", "all")
            else None,
        )
    return SteeringSpec(layers)


async def solo_runs(model, cases: dict[tuple[int, int], tuple[int, tuple[int, ...]]], specs) -> dict:
    """One solo run per (prompt, spec): the longest length and every layer any request of the pair needs."""
    solo = {}
    for (prompt, spec), (tokens, layers) in cases.items():
        outputs, handles = await model.generate(
            PROMPTS[prompt], greedy(tokens), capture_layers=list(layers), steering_spec=specs[spec], raw_output=True
        )
        await model.fetch_captures_batch(handles)
        solo[prompt, spec] = (list(outputs[0].outputs[0].token_ids), handles[0])
    return solo


def assert_equals_solo(output, handle, tokens: int, layers, solo) -> None:
    """Greedy decoding: a shorter run is a prefix of the solo run, rows included."""
    solo_tokens, solo_handle = solo
    assert list(output.outputs[0].token_ids) == solo_tokens[:tokens]
    for layer in layers:
        ours = handle.hidden(layer)
        reference = solo_handle.hidden(layer)[: ours.shape[0]]
        assert torch.allclose(ours, reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item()), layer


@pytest.mark.slow
async def test_flood_of_200_random_requests_each_equals_its_solo_run(model):
    rng = random.Random(0)
    specs = [SteeringSpec()] + [random_spec(rng, seed) for seed in range(1, 20)]  # more specs than slots (16)
    requests = []
    for _ in range(200):
        layers = tuple(sorted(rng.sample(range(LAYERS), rng.randint(1, 3)))) if rng.random() < 0.7 else ()
        requests.append((rng.randrange(len(PROMPTS)), rng.randrange(len(specs)), rng.randint(1, 10), layers))
    cases: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {(p, 0): (10, (0,)) for p in range(len(PROMPTS))}
    for prompt, spec, tokens, layers in requests:
        longest, needed = cases.get((prompt, spec), (1, ()))
        cases[prompt, spec] = (max(longest, tokens), tuple(sorted({*needed, *layers, 0})))
    solo = await solo_runs(model, cases, specs)

    async def one(prompt: int, spec: int, tokens: int, layers: tuple[int, ...]):
        result = await model.generate(
            PROMPTS[prompt],
            greedy(tokens),
            capture_layers=list(layers) or None,
            steering_spec=specs[spec],
            raw_output=True,
        )
        if not layers:
            return result[0], None
        outputs, handles = result
        await model.fetch_captures_batch(handles)
        return outputs[0], handles[0]

    results = await asyncio.gather(*(one(*request) for request in requests))
    changed = 0
    for (prompt, spec, tokens, layers), (output, handle) in zip(requests, results):
        assert_equals_solo(output, handle, tokens, layers, solo[prompt, spec])
        changed += list(output.outputs[0].token_ids) != solo[prompt, 0][0][:tokens]
    assert changed > 20  # the specs do steer
    assert (await model.worker_stats())[0]["captures"] == 0


@pytest.mark.slow
async def test_steering_changes_during_a_flood_never_mix_states(model):
    """Requests take the global spec current when submitted; changing it while
    earlier requests still run must not touch them (their slot stays as loaded)."""
    states = [random_spec(random.Random(seed), seed) for seed in (101, 102)]
    layers = (0, 15, 29)
    cases = {(prompt, state): (8, layers) for prompt in range(len(PROMPTS)) for state in range(2)}
    solo = await solo_runs(model, cases, states)
    assert solo[0, 0][0] != solo[0, 1][0]
    tasks, expected = [], []
    try:
        for i in range(48):
            if i % 4 == 0:
                await model.apply_steering_spec(states[i // 4 % 2])
            prompt = i % len(PROMPTS)
            tasks.append(
                asyncio.create_task(
                    model.generate(PROMPTS[prompt], greedy(8), capture_layers=list(layers), raw_output=True)
                )
            )
            expected.append((prompt, i // 4 % 2))
            await asyncio.sleep(0.02)
        results = await asyncio.gather(*tasks)
    finally:
        await model.clear_all_vectors()
    for (outputs, handles), key in zip(results, expected):
        await model.fetch_captures_batch(handles)
        assert_equals_solo(outputs[0], handles[0], 8, layers, solo[key])


# -- leaks -----------------------------------------------------------------------


def engine_rss_mib() -> float:
    """Resident memory of this process and the engine processes it started."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


async def drained_stats(model) -> dict[str, int]:
    """Worker counters once released captures' grace steps have run out (they count steps)."""
    for _ in range(10):
        await model.generate(PROMPTS[0], greedy(3))
        stats = (await model.worker_stats())[0]
        if not stats["released"]:
            break
    return stats


@pytest.mark.slow
async def test_thousand_capture_requests_leave_no_trace(model):
    """1000 capturing requests, fetched, dropped unfetched, or cancelled mid-run:
    worker storage ends empty, the hand-off folder holds only the files kept
    for reuse, memory stays flat."""
    rng = random.Random(1)
    bound_mib = 64
    rounds, per_round = 20, 50
    memory = []

    async def cancelled() -> None:
        task = asyncio.create_task(model.generate(PROMPTS[1], greedy(200), capture_layers=[4, 5]))
        await asyncio.sleep(0.05 + rng.random() * 0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    for round_index in range(rounds):
        prompts = [rng.choice(PROMPTS) for _ in range(per_round - 5)]
        _, handles = await model.generate(prompts, greedy(rng.randint(1, 4)), capture_layers=[rng.randrange(LAYERS)])
        await asyncio.gather(*(cancelled() for _ in range(5)))
        fetched = handles[: len(handles) // 2]
        await model.fetch_captures_batch(fetched)
        assert all(h.hidden(h.layer_indices[0]).shape[0] == h.expected_rows for h in fetched)
        del handles, fetched  # the other half is dropped unfetched: released by the finaliser
        gc.collect()
        if round_index in (4, rounds - 1):
            stats = await drained_stats(model)
            memory.append(engine_rss_mib())
    assert stats["captures"] == 0 and stats["released"] == 0
    # What stays in the hand-off folder is the files kept for reuse, the inf/NaN board's two
    # and the folder's owner lock, nothing else.
    folder = Path(model._link.handoff_folder)
    assert len(list(folder.glob("*.rows"))) == stats["recycled_files"] > 0
    assert len(list(folder.iterdir())) == stats["recycled_files"] + 3
    growth = memory[1] - memory[0]
    print(f"memory after 250 requests {memory[0]:.0f} MiB, after 1000 {memory[1]:.0f} MiB, growth {growth:.1f} MiB")
    assert growth < bound_mib, f"memory grew {growth:.0f} MiB over 750 capture requests (bound {bound_mib} MiB)"


async def test_a_capture_reuses_closed_files_and_never_touches_live_ones(model):
    """Files of closed handles go back to the worker and the next capture writes
    into them; a handle still alive keeps its rows; both equal solo runs."""
    gc.collect()
    _, (kept, closed) = await model.generate(PROMPTS[:2], greedy(6), capture_layers=[2, 7])
    await model.fetch_captures_batch([kept, closed])
    before = {layer: kept.hidden(layer).clone() for layer in (2, 7)}
    folder = Path(model._link.handoff_folder)
    files = {path.stat().st_ino for path in folder.iterdir()}
    closed.close()
    gc.collect()
    pooled = (await drained_stats(model))["recycled_files"]
    assert pooled >= 1  # the closed capture's file (one per capture, holding both layers)
    _, (again,) = await model.generate(PROMPTS[1], greedy(6), capture_layers=[2, 7])
    await model.fetch_captures_batch([again])
    assert (await model.worker_stats())[0]["recycled_files"] == pooled - 1
    assert {path.stat().st_ino for path in folder.iterdir()} <= files  # written into kept pages
    for layer in (2, 7):
        assert torch.equal(kept.hidden(layer), before[layer])
    solo = await model.generate(PROMPTS[1], greedy(6), capture_layers=[2, 7])
    await model.fetch_captures_batch(solo[1])
    for layer in (2, 7):
        assert torch.equal(again.hidden(layer), solo[1][0].hidden(layer))


async def test_cancelled_request_frees_its_capture(model):
    task = asyncio.create_task(model.generate(PROMPTS[2], greedy(300), capture_layers=[1]))
    await asyncio.sleep(1.0)
    assert (await model.worker_stats())[0]["captures"] == 1  # it is running and recording
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await drained_stats(model))["captures"] == 0


KILLED_CLIENT = """
import asyncio, json, sys, time
from workbench import VLLMSteeringConfig, VLLMSteerModel

async def main():
    model = VLLMSteerModel(VLLMSteeringConfig(dtype="float32", max_model_len=256))
    await model.generate("The capital of France is", max_tokens=4, capture_layers=[1, 2])  # rows left unfetched
    print(json.dumps({"folder": model._link.handoff_folder}), flush=True)
    time.sleep(600)

if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.slow
async def test_an_engine_whose_client_is_killed_shuts_down_and_removes_its_captures(tmp_path):
    """A process that dies without closing its engine (a notebook kernel killed on
    restart, the OOM killer) leaves neither a running engine (its memory, on a GPU
    the card) nor captured rows in shared memory behind."""
    script = tmp_path / "client.py"
    script.write_text(KILLED_CLIENT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    client = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env
    )
    try:
        line = b""
        while not line.startswith(b'{"folder"'):  # after vLLM's log lines
            line = await asyncio.wait_for(client.stdout.readline(), 300)
            assert line, "the client exited before its capture"
        folder = Path(json.loads(line)["folder"])
        assert any(folder.glob("*.rows"))
        engine = [p for p in psutil.Process(client.pid).children(recursive=True) if "EngineCore" in p.name()]
        assert engine, "the client started no engine-core process"
    finally:
        client.kill()
        await client.wait()
    gone, alive = psutil.wait_procs(engine, timeout=60)
    assert not alive, f"engine processes still running 60 s after their client died: {alive}"
    assert not folder.exists()


def test_a_folder_left_by_a_killed_process_is_removed_when_the_next_is_made(tmp_path):
    """A process killed with its engine (SIGKILL to a kernel's process group) runs no
    clean-up: its hand-off folder, unfetched rows and all, goes when the next is made;
    the folders of live processes stay."""
    prefix = f"workbench-test-{os.getpid()}-"
    maker = (
        "import sys, time; from workbench.wire import HandoffFolder; "
        f"folder = HandoffFolder({prefix!r}); open(folder.name + '/rows', 'wb').write(bytes(4096)); "
        "print(folder.name, flush=True); time.sleep(600)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    killed = subprocess.Popen([sys.executable, "-c", maker], stdout=subprocess.PIPE, env=env, text=True)
    try:
        abandoned = Path(killed.stdout.readline().strip())
        assert (abandoned / "rows").exists()
    finally:
        killed.kill()
        killed.wait()
    live = HandoffFolder(prefix)
    unowned = Path(tempfile.mkdtemp(prefix=prefix, dir=Path(live.name).parent))  # no owner: left alone
    try:
        newest = HandoffFolder(prefix)
        assert not abandoned.exists()
        assert Path(live.name).exists() and unowned.exists()
        newest.cleanup()
    finally:
        live.cleanup()
        unowned.rmdir()
