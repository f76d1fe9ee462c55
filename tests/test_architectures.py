"""Every supported decoder architecture steers and captures as Hugging Face does.

Each architecture is a tiny model built locally from a config (random weights,
seeded, float32; ``tests/tiny_models.py``), run by a real engine: unsteered,
add, projection cap, ablation and position-targeted steering in one batch
must give HF's greedy tokens and HF's residual streams at every layer
(per-token cosine >= 0.99999, max abs error <= 2e-3 of the largest value),
and clearing the steering must give the baseline back. Eager mode for every
architecture; compiled mode, and two tensor-parallel workers, for one of
each layer convention.

The engines double as the lifecycle check: each is dropped with ``del`` (or
fails to start), after which none of its engine processes may be left, and
this process's memory must stay flat across all of them.

This module runs first (its name sorts first), before the suite's shared
engine starts. The next parity test's engine starts while the current test
runs (``EngineStarts``), so two engines are alive at most.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import assert_rows_match, mean_direction
from tests.tiny_models import ARCHITECTURES, tiny_model
from workbench import (
    AblationSpec,
    AddSpec,
    EngineStartError,
    LayerSteeringSpec,
    ProjectionCapSpec,
    SteeringSpec,
    UnsupportedModelError,
    VLLMSteeringConfig,
    VLLMSteerModel,
)
from workbench.hf_reference import generate_reference

PROMPT = "The capital of France is"
LAYERS = [0, 1, 2]
NEW_TOKENS = 8

SUPPORTED = [arch for arch in ARCHITECTURES if arch != "nemotron"]
COMPILED = ["llama", "gemma2", "cohere", "gpt2"]
"""One architecture per layer convention, plus Gemma2's extra norms, in vLLM's compiled mode."""
TENSOR_PARALLEL = {"llama": True, "qwen3_moe": True, "cohere": True, "gpt2": False, "olmo2": True}
"""Architecture -> eager, run with two tensor-parallel workers: one per layer
convention (the HF-layer one under vLLM's Transformers backend), plus a
mixture of experts whose experts are split between the workers."""

LIFECYCLE_CYCLES = 20
MEMORY_GROWTH_MB = 100
"""Allowed growth of this process's memory over the engines of architectures
already seen (a new architecture imports its modelling code for good)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def engine_processes() -> dict[int, str]:
    """Live engine processes below this one (vLLM names them ``VLLM::...``), by pid."""
    alive = {}
    for process in psutil.Process().children(recursive=True):
        try:
            if "VLLM" in process.name() and process.status() != psutil.STATUS_ZOMBIE:
                alive[process.pid] = process.name()
        except psutil.NoSuchProcess:
            pass
    return alive


class Lifecycle:
    """What every engine of this module leaves behind once deleted."""

    def __init__(self) -> None:
        self.known = set(engine_processes())
        self.cycles: list[tuple[str, int]] = []
        """(architecture, this process's memory in MiB) after each engine is gone."""

    async def after_del(self, arch: str, processes: set[int] | None = None, timeout_s: float = 60.0) -> None:
        """Wait for the deleted engine's ``processes`` (default: every engine process
        started since this module began) to exit; fail if they do not."""

        def left() -> dict[int, str]:
            alive = {pid: name for pid, name in engine_processes().items() if pid not in self.known}
            return alive if processes is None else {pid: alive[pid] for pid in processes & alive.keys()}

        gc.collect()
        deadline = time.monotonic() + timeout_s
        while (remaining := left()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert remaining == {}, f"engine processes still running after del: {sorted(remaining.values())}"
        self.cycles.append((arch, psutil.Process().memory_info().rss >> 20))


@pytest.fixture(scope="module")
def lifecycle() -> Lifecycle:
    return Lifecycle()


@dataclass(frozen=True)
class EnginePlan:
    """The engine a test of this module runs on."""

    folder: Path
    dtype: str = "float32"
    eager: bool = True
    tensor_parallel: int = 1


def engine_plan(item: pytest.Item, models: Path) -> EnginePlan | None:
    """The engine ``item`` needs (building its tiny model), or None for tests that start their own."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    name = getattr(item, "originalname", None)
    if name == "test_architecture_steers_and_captures_as_hf":
        folder = tiny_model(params["arch"], models / params["arch"])
        return EnginePlan(folder, eager=params["eager"], tensor_parallel=params["tp"])
    if name == "test_half_precision_steers_as_hf_computing_in_float32":
        dtype = params["dtype"]
        return EnginePlan(tiny_model("llama", models / f"llama-{dtype}", dtype=getattr(torch, dtype)), dtype)
    return None


class EngineStarts:
    """Starts the next test's engine on a thread while the current test runs.

    An engine start on this machine is mostly a process importing vLLM and
    loading the model on one core, and a test mostly the Hugging Face reference
    on the other: overlapping them keeps both cores busy, with two engines
    alive at most. No test starts an engine of its own while one is pending
    (``engine_plan`` covers every test that runs right before another's
    start), so the engine processes that appear during a start are its own.
    """

    def __init__(self, models: Path) -> None:
        self.models = models
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-start")
        self._pending: dict[EnginePlan, Future[tuple[VLLMSteerModel, set[int]]]] = {}

    def take(self, request: pytest.FixtureRequest) -> tuple[VLLMSteerModel, set[int]]:
        """This test's engine and its processes; the next test's engine starts meanwhile."""
        plan = engine_plan(request.node, self.models)
        assert plan is not None, f"{request.node.name} has no engine plan"
        started = self._start(plan)
        items = request.session.items
        place = items.index(request.node)
        upcoming = engine_plan(items[place + 1], self.models) if place + 1 < len(items) else None
        engine = started.result()
        if upcoming is not None:
            self._start(upcoming)
        del self._pending[plan]
        return engine

    def _start(self, plan: EnginePlan) -> Future[tuple[VLLMSteerModel, set[int]]]:
        if plan not in self._pending:
            self._pending[plan] = self._thread.submit(self._run, plan)
        return self._pending[plan]

    @staticmethod
    def _run(plan: EnginePlan) -> tuple[VLLMSteerModel, set[int]]:
        before = set(engine_processes())
        config = engine_config(plan.folder, plan.dtype, tensor_parallel_size=plan.tensor_parallel)
        model = VLLMSteerModel(config, enforce_eager=plan.eager)
        return model, set(engine_processes()) - before

    def close(self) -> None:
        for pending in self._pending.values():
            if pending.exception() is None:
                pending.result()[0].close()
        self._pending.clear()
        self._thread.shutdown()


@pytest.fixture(scope="module")
def engine_starts(models):
    starts = EngineStarts(models)
    yield starts
    starts.close()


def specs(hf_model, token_ids: list[int], hidden: int) -> dict[str, SteeringSpec]:
    generator = torch.Generator().manual_seed(5)
    vector = torch.randn(hidden, generator=generator)
    direction = mean_direction(hf_model, token_ids, 1)  # a large projection: cap and ablation bite
    return {
        "unsteered": SteeringSpec(),
        "add": SteeringSpec({1: LayerSteeringSpec(add=AddSpec(vector, scale=4.0))}),
        "cap": SteeringSpec({1: LayerSteeringSpec(projection_cap=ProjectionCapSpec(direction, min=-0.5, max=0.5))}),
        "ablation": SteeringSpec({1: LayerSteeringSpec(ablation=AblationSpec(direction, scale=0.0))}),
        "targeted": SteeringSpec(
            {
                1: LayerSteeringSpec(add=AddSpec(vector, scale=4.0, positions="generated")),
                2: LayerSteeringSpec(ablation=AblationSpec(direction, scale=0.0, positions="prompt")),
            }
        ),
    }


def engine_config(folder: Path, dtype: str = "float32", **overrides) -> VLLMSteeringConfig:
    return VLLMSteeringConfig(model_name=str(folder), dtype=dtype, max_model_len=256, max_steering_slots=8, **overrides)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, eager, tp",
    [(arch, True, 1) for arch in SUPPORTED]
    + [(arch, False, 1) for arch in COMPILED]
    + [(arch, eager, 2) for arch, eager in TENSOR_PARALLEL.items()],
    ids=[
        *SUPPORTED,
        *(f"{arch}-compiled" for arch in COMPILED),
        *(f"{arch}-tp2{'' if eager else '-compiled'}" for arch, eager in TENSOR_PARALLEL.items()),
    ],
)
async def test_architecture_steers_and_captures_as_hf(arch, eager, tp, models, lifecycle, engine_starts, request):
    from transformers import AutoModelForCausalLM

    model, processes = engine_starts.take(request)
    hf_model = AutoModelForCausalLM.from_pretrained(models / arch, dtype=torch.float32).eval()
    try:
        token_ids = model.tokenizer(PROMPT).input_ids
        cases = specs(hf_model, token_ids, model.hidden_size)
        # All cases in one batch: each request runs with its own spec.
        texts, handles = await model.generate(
            [PROMPT] * len(cases),
            max_tokens=NEW_TOKENS,
            temperature=0.0,
            capture_layers=LAYERS,
            steering_spec=list(cases.values()),
        )
        await model.fetch_captures_batch(handles)
        tokens = {}
        for (name, spec), handle in zip(cases.items(), handles):
            reference = generate_reference(hf_model, handle.prompt_token_ids, NEW_TOKENS, spec, LAYERS)
            tokens[name] = list(handle.generated_token_ids)
            assert tokens[name] == reference.token_ids, name
            for layer in LAYERS:
                assert_rows_match(handle.hidden(layer), reference.captures[layer])
        assert all(tokens[name] != tokens["unsteered"] for name in ("add", "targeted")), tokens
        assert len({tuple(value) for value in tokens.values()}) >= 3, tokens  # the ops steer differently

        await model.apply_steering_spec(cases["add"])
        assert await model.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0) == [texts[1]]
        await model.clear_all_vectors()
        assert await model.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0) == [texts[0]]
    finally:
        del model
    await lifecycle.after_del(arch, processes)


HALF_PRECISION = {
    # dtype: (minimum per-token cosine to HF, mean abs error relative to HF's mean magnitude)
    "bfloat16": (0.999, 2e-2),
    "float16": (0.99999, 3e-3),
}
"""vLLM's and HF's kernels round differently in half precision (unsteered
rows already differ this much); what matters is that steering adds no error
of its own: the ops run in float32 on both sides and round once."""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", sorted(HALF_PRECISION))
async def test_half_precision_steers_as_hf_computing_in_float32(dtype, models, lifecycle, engine_starts, request):
    from transformers import AutoModelForCausalLM

    from workbench.hf_reference import forward_reference

    torch_dtype = getattr(torch, dtype)
    model, processes = engine_starts.take(request)
    hf_model = AutoModelForCausalLM.from_pretrained(models / f"llama-{dtype}", dtype=torch_dtype).eval()
    try:
        cases = specs(hf_model, model.tokenizer(PROMPT).input_ids, model.hidden_size)
        _, handles = await model.generate(
            [PROMPT] * len(cases), max_tokens=NEW_TOKENS, temperature=0.0, capture_layers=LAYERS,
            steering_spec=list(cases.values()),
        )  # fmt: skip
        await model.fetch_captures_batch(handles)
        min_cosine, mean_error = HALF_PRECISION[dtype]
        epsilon = torch.finfo(torch_dtype).eps
        for (name, spec), handle in zip(cases.items(), handles):
            # Teacher-forced on the engine's tokens: greedy text may part at a near-tie in half precision.
            tokens = list(handle.prompt_token_ids) + list(handle.generated_token_ids)[:-1]
            reference = forward_reference(hf_model, tokens, spec, LAYERS, prompt_length=len(handle.prompt_token_ids))
            for layer in LAYERS:
                ours, theirs = handle.hidden(layer).float(), reference[layer].float()
                cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min().item()
                error = ((ours - theirs).abs().mean() / theirs.abs().mean()).item()
                assert cosine >= min_cosine and error <= mean_error, (name, layer, cosine, error)
            rows = handle.hidden(1).float()
            norms = rows.norm(dim=-1)
            # Held to one rounding step of the row, not several: half a step from casting the op's
            # float32 result back once, half from summing the (hidden, residual) pair for the capture.
            if name == "cap":
                direction = spec.layers[1].projection_cap.vector
                excess = ((rows @ direction).abs() - 0.5).clamp(min=0)
                assert (excess <= epsilon * norms).all(), (excess / norms).max()
            if name == "ablation":
                direction = spec.layers[1].ablation.vector
                assert ((rows @ direction).abs() <= epsilon * norms).all(), ((rows @ direction).abs() / norms).max()
    finally:
        del model
    await lifecycle.after_del("llama", processes)


@pytest.mark.slow
async def test_an_unclaimed_layer_class_is_refused_at_start_up(models, lifecycle):
    """Nemotron's layers hand on the stream like Llama's, but no parity test
    checks them: the engine refuses the model instead of guessing."""
    folder = tiny_model("nemotron", models / "nemotron")
    with pytest.raises(UnsupportedModelError, match=r"NemotronDecoderLayer.*pair-sum"):
        VLLMSteerModel(engine_config(folder))
    await lifecycle.after_del("nemotron")


@pytest.mark.slow
async def test_an_engine_that_cannot_start_raises_with_vllms_reason(models, lifecycle):
    """A checkpoint whose weights file is cut short fails inside the engine's
    worker process, where the client only sees the process die."""
    broken = models / "broken"
    shutil.copytree(tiny_model("llama", models / "llama"), broken, dirs_exist_ok=True)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    started = time.monotonic()
    with pytest.raises(EngineStartError, match=r"failed to start: [\w.]*SafetensorError: "):
        VLLMSteerModel(engine_config(broken))
    assert time.monotonic() - started < 120  # promptly: no hang once the engine has given up
    await lifecycle.after_del("llama")


@pytest.mark.slow
def test_deleted_engines_leave_nothing_and_memory_stays_flat(lifecycle):
    """``del model``, 20 times and more (the tests above), leaves no engine
    process (checked after each) and this process's memory flat once the
    architectures' code is loaded: the engines of architectures seen before
    (the compiled runs, half precision, the failed start) add nothing."""
    if len(lifecycle.cycles) < LIFECYCLE_CYCLES:
        pytest.skip(f"only {len(lifecycle.cycles)} engines ran (a subset of this module was selected)")
    seen: set[str] = set()
    repeats = []
    for arch, memory in lifecycle.cycles:
        if arch in seen:
            repeats.append(memory)
        seen.add(arch)
    assert len(repeats) >= 5, lifecycle.cycles
    assert max(repeats) - repeats[0] < MEMORY_GROWTH_MB, lifecycle.cycles
