"""Throughput of the workbench runtime against plain vLLM, as ratios measured in one run.

Both engines load the same model with the same settings. Each round runs
plain vLLM first and then every workbench configuration, so drift on the
machine hits both; the table reports medians over rounds and each
configuration's median relative to plain vLLM's.

    python bench/bench_steering.py --preset cpu            # embedded SmolLM2, this machine
    python bench/bench_steering.py --preset gpu            # Llama-3-8B shape, dummy bf16 weights
    python bench/bench_steering.py --preset gpu --model gemma3-1b-shape   # another shape in bench/models/

Results go to bench/results/<date>-<card>-<commit>-<mode>.json (the commit from
``git`` or ``$WORKBENCH_COMMIT``, for trees copied without their history).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import random
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

HERE = Path(__file__).parent
logger = logging.getLogger("bench")


@dataclass(frozen=True)
class Preset:
    model: str
    dtype: str
    requests: int
    prompt_tokens: int
    output_tokens: int
    rounds: int
    load_format: str = "auto"
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.9
    """Per engine; the GPU preset runs three engines on one card."""
    engine_kwargs: tuple[tuple[str, Any], ...] = ()


PRESETS = {
    "cpu": Preset(
        model="smollm2-135m-instruct", dtype="bfloat16", requests=16, prompt_tokens=32, output_tokens=48, rounds=3
    ),
    "gpu": Preset(
        model=str(HERE / "models" / "llama3-8b-shape"),
        dtype="bfloat16",
        requests=256,
        prompt_tokens=64,
        output_tokens=128,
        rounds=5,
        load_format="dummy",
        gpu_memory_utilization=0.3,
        engine_kwargs=(("skip_tokenizer_init", True),),
    ),
}


def commit() -> str:
    """The measured code's commit (``-dirty`` with uncommitted changes)."""
    if os.environ.get("WORKBENCH_COMMIT"):
        return os.environ["WORKBENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", str(HERE.parent / "workbench")], cwd=HERE, capture_output=True
        )
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def prompt_ids(preset: Preset, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    upper = min(vocab, 32000)
    return [
        torch.randint(100, upper, (preset.prompt_tokens,), generator=generator).tolist() for _ in range(preset.requests)
    ]


def random_spec(layers: list[int], hidden: int, seed: int, with_cap_and_ablation: bool = False) -> SteeringSpec:
    generator = torch.Generator().manual_seed(seed)
    specs = {}
    for layer in layers:
        vector = lambda: torch.randn(hidden, generator=generator)  # noqa: E731
        specs[layer] = LayerSteeringSpec(
            add=AddSpec(vector(), scale=0.5),
            projection_cap=ProjectionCapSpec(vector(), min=-10.0, max=10.0) if with_cap_and_ablation else None,
            ablation=AblationSpec(vector(), scale=0.5) if with_cap_and_ablation else None,
        )
    return SteeringSpec(specs)


class GpuClocks:
    """Samples the GPU's SM clock and power draw (NVML) while a configuration
    runs: a card at its power limit clocks down, so throughput can differ
    with the data a run computes on, not only with the work it does."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError:  # vLLM ships a copy
            from vllm.third_party import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.readings: dict[str, list[tuple[float, float]]] = {}

    @contextlib.contextmanager
    def sample(self, name: str) -> Iterator[None]:
        """Record the mean SM clock (MHz) and power (W) of the enclosed run under ``name``."""
        values: list[tuple[int, int]] = []
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.02):
                values.append(
                    (
                        self._nvml.nvmlDeviceGetClockInfo(self._handle, self._nvml.NVML_CLOCK_SM),
                        self._nvml.nvmlDeviceGetPowerUsage(self._handle),
                    )
                )

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            if values:
                clocks, milliwatts = zip(*values)
                reading = (statistics.fmean(clocks), statistics.fmean(milliwatts) / 1000)
                self.readings.setdefault(name, []).append(reading)

    def medians(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "sm_clock_mhz": round(statistics.median(clock for clock, _ in values)),
                "power_w": round(statistics.median(power for _, power in values)),
            }
            for name, values in self.readings.items()
        }


def add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """``--eager`` / ``--graphs`` (``args.eager``: True, False, or None for the platform's default)."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--eager", dest="eager", action="store_true", default=None, help="enforce_eager=True for both engines"
    )
    mode.add_argument("--graphs", dest="eager", action="store_false", help="compile / CUDA graphs for both engines")


async def timed(run: Callable[[], Awaitable[int]]) -> float:
    """Generated tokens per second of one run."""
    start = time.perf_counter()
    tokens = await run()
    return tokens / (time.perf_counter() - start)


def with_model(preset: Preset, model: str) -> Preset:
    """``preset`` on another model: a shape folder of bench/models/ (its config with
    dummy weights and no tokenizer, as the GPU preset runs), or any name or path as is."""
    shape = HERE / "models" / model
    if not shape.is_dir():
        return dataclasses.replace(preset, model=model)
    kwargs = {**dict(preset.engine_kwargs), "skip_tokenizer_init": True}
    return dataclasses.replace(preset, model=str(shape), load_format="dummy", engine_kwargs=tuple(kwargs.items()))


async def main(args: argparse.Namespace) -> None:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from workbench import VLLMSteeringConfig, VLLMSteerModel
    from workbench.config import in_engine_core_executor, is_cpu_platform
    from workbench.embedded import resolve_model_name

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # both engines fit beside each other on CPU
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # the plain engine starts before ours sets it
    preset = PRESETS[args.preset]
    if args.rounds:
        preset = dataclasses.replace(preset, rounds=args.rounds)
    if args.model:
        preset = with_model(preset, args.model)
    enforce_eager = args.eager
    # Every configuration reruns the same prompts; with prefix caching the engine that
    # runs fewer configurations (plain vLLM) would keep its prompts cached and skip prefill.
    engine_kwargs = {"enable_prefix_caching": False, **dict(preset.engine_kwargs)}
    if is_cpu_platform():
        # A steered CPU engine runs its worker in the engine core; plain vLLM gets the
        # same executor, so the ratios measure steering and capture, not the executor.
        engine_kwargs["distributed_executor_backend"] = in_engine_core_executor()
    cfg = VLLMSteeringConfig(
        model_name=preset.model,
        dtype=preset.dtype,
        max_model_len=preset.max_model_len,
        load_format=preset.load_format,
        gpu_memory_utilization=preset.gpu_memory_utilization,
        max_steering_slots=64,
        engine_kwargs=engine_kwargs,
    )
    if enforce_eager is None:
        enforce_eager = is_cpu_platform()

    def plain_engine() -> AsyncLLM:
        return AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=resolve_model_name(preset.model),
                dtype=preset.dtype,
                max_model_len=preset.max_model_len,
                load_format=preset.load_format,
                gpu_memory_utilization=preset.gpu_memory_utilization,
                enforce_eager=enforce_eager,
                seed=0,
                **engine_kwargs,
            )
        )

    # Plain vLLM runs as shipped (its default model runner). Workbench pins the
    # V1 runner, so on CUDA (where V2 is the default) plain vLLM on V1 runs too.
    start = time.perf_counter()
    plain = plain_engine()
    plain_startup = time.perf_counter() - start

    def wanted(name: str) -> bool:
        """Configurations ``--only`` keeps, with the plain references they are compared to."""
        return not args.only or name in ("plain vLLM", "batch-1 decode, plain") or bool(re.search(args.only, name))

    plain_v1 = None
    if torch.cuda.is_available() and wanted("plain vLLM, V1 runner"):
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        plain_v1 = plain_engine()
    start = time.perf_counter()
    model = VLLMSteerModel(cfg, enforce_eager=enforce_eager)
    steered_startup = time.perf_counter() - start
    hidden, layers = model.hidden_size, model.layer_count
    vocab = model.engine.model_config.get_vocab_size()
    prompts = prompt_ids(preset, vocab)
    params = SamplingParams(temperature=0.0, max_tokens=preset.output_tokens, ignore_eos=True)

    async def run_plain(batch: list[list[int]], engine: Any = plain) -> int:
        async def one(ids: list[int], index: int) -> int:
            final = None
            async for out in engine.generate({"prompt_token_ids": ids}, params, f"plain-{time.time_ns()}-{index}"):
                final = out
            return len(final.outputs[0].token_ids)

        return sum(await asyncio.gather(*(one(ids, i) for i, ids in enumerate(batch))))

    capture_phases: dict[int, list[dict[str, float]]] = {}
    """Captured layers -> per run, seconds spent generating, fetching, checking and closing, and releasing."""

    async def run_steered(batch: list[list[int]], spec: Any = None, capture: list[int] | None = None) -> int:
        start = time.perf_counter()
        result = await model.generate(batch, params, capture_layers=capture, steering_spec=spec)
        if capture is None:
            return preset.output_tokens * len(batch)
        generated = time.perf_counter()
        _, handles = result
        await model.fetch_captures_batch(handles)
        fetched = time.perf_counter()
        rows = preset.prompt_tokens + preset.output_tokens - 1
        for handle in handles:  # verify every captured row came back, the last one written
            for layer in capture:
                captured = handle.captures[layer][0]["hidden"]
                assert captured.shape == (rows, hidden) and captured[-1].any()
            handle.close()
        closed = time.perf_counter()
        # Freeing the captures' memory (1.6 GB a run for 4 layers) finishes on the
        # workers' helper threads; wait for it here, so that it counts against
        # this configuration rather than slowing whichever runs next.
        await model.worker_stats()
        marks = (start, generated, fetched, closed, time.perf_counter())
        phases = dict(zip(("generate", "fetch", "check_and_close", "release"), np.diff(marks).tolist()))
        capture_phases.setdefault(len(capture), []).append(phases)
        return preset.output_tokens * len(batch)

    async def run_extract(batch: list[list[int]], capture: list[int]) -> int:
        """``model.extract`` of every row of ``capture`` into sharded files on disk, all requests in flight."""
        with tempfile.TemporaryDirectory(prefix="bench-extract-") as folder:
            reader = await model.extract(
                batch, capture, folder, sampling_params=params, max_in_flight=len(batch), progress=False
            )
            assert reader.is_complete
        return preset.output_tokens * len(batch)

    all_layers = list(range(layers))
    eight = all_layers[:: max(1, layers // 8)][:8]
    global_add = random_spec(all_layers, hidden, seed=1)
    global_mixed = random_spec(eight, hidden, seed=2, with_cap_and_ablation=True)
    distinct16 = [random_spec(all_layers, hidden, seed=100 + i % 16) for i in range(preset.requests)]
    distinct64 = [
        random_spec(eight, hidden, seed=200 + i % 64, with_cap_and_ablation=True) for i in range(preset.requests)
    ]
    middle = layers // 2
    configs: dict[str, Callable[[], Awaitable[int]]] = {
        "plain vLLM": lambda: run_plain(prompts),
        **({"plain vLLM, V1 runner": lambda: run_plain(prompts, plain_v1)} if plain_v1 else {}),
        "runtime loaded, no steering": lambda: run_steered(prompts, SteeringSpec()),
        f"one global spec: add on all {layers} layers": lambda: run_steered(prompts, global_add),
        "add + cap + ablate on 8 layers": lambda: run_steered(prompts, global_mixed),
        "16 distinct per-request specs (add, all layers)": lambda: run_steered(prompts, distinct16),
        "64 distinct per-request specs (cap + ablate, 8 layers)": lambda: run_steered(prompts, distinct64),
        "capture 1 layer (all tokens, rows verified)": lambda: run_steered(prompts, SteeringSpec(), [middle]),
        "capture 4 layers": lambda: run_steered(prompts, SteeringSpec(), eight[:4]),
        f"capture all {layers} layers": lambda: run_steered(prompts, SteeringSpec(), all_layers),
        f"extract all {layers} layers to disk": lambda: run_extract(prompts, all_layers),
        "batch-1 decode, plain": lambda: run_plain(prompts[:1]),
        **({"batch-1 decode, plain V1 runner": lambda: run_plain(prompts[:1], plain_v1)} if plain_v1 else {}),
        "batch-1 decode, add on all layers": lambda: run_steered(prompts[:1], global_add),
    }
    configs = {name: run for name, run in configs.items() if wanted(name)}
    # Warm-up: every path once (loads slots, compiles any remaining shapes).
    for run in configs.values():
        await run()
    samples: dict[str, list[float]] = {name: [] for name in configs}
    # Plain vLLM opens every round; the rest run in a fresh order each round, so
    # no configuration always follows the same one (a position effect showed up
    # with a fixed order: the first steered configuration after the plain engines
    # measured below configurations doing more work).
    order = random.Random(0)
    clocks = None
    if torch.cuda.is_available():
        try:
            clocks = GpuClocks()
        except Exception:  # NVML missing or not permitted: the benchmark runs without clock readings
            logger.warning("no GPU clock readings", exc_info=True)
    first, *rest = configs
    orders = []
    for round_index in range(preset.rounds):
        order.shuffle(rest)
        orders.append([first, *rest])
        for name in orders[-1]:
            with clocks.sample(name) if clocks else contextlib.nullcontext():
                samples[name].append(await timed(configs[name]))
        logger.info("round %d/%d done", round_index + 1, preset.rounds)
    model.close()
    plain.shutdown()
    if plain_v1 is not None:
        plain_v1.shutdown()

    medians = {name: statistics.median(values) for name, values in samples.items()}
    reference = {
        name: medians["batch-1 decode, plain" if name.startswith("batch-1") else "plain vLLM"] for name in medians
    }
    import vllm

    results = {
        "date": dt.date.today().isoformat(),
        "device": device_name(),
        "commit": commit(),
        "preset": args.preset,
        "workload": {
            "model": preset.model,
            "load_format": preset.load_format,
            "dtype": preset.dtype,
            "requests": preset.requests,
            "prompt_tokens": preset.prompt_tokens,
            "output_tokens": preset.output_tokens,
            "rounds": preset.rounds,
            "enforce_eager": enforce_eager,
        },
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "plain_runner": "V2 (CUDA default); 'plain vLLM, V1 runner' uses V1 like workbench"
        if torch.cuda.is_available()
        else "V1",
        "startup_s": {"plain vLLM": round(plain_startup, 1), "workbench": round(steered_startup, 1)},
        "tok_per_s": {name: [round(v, 1) for v in values] for name, values in samples.items()},
        "order_per_round": orders,
        "capture_phases_s": {
            f"{layers} layers": {phase: round(statistics.median(run[phase] for run in runs), 4) for phase in runs[0]}
            for layers, runs in capture_phases.items()
        },
        **({"gpu_clocks": clocks.medians()} if clocks else {}),
        "median_tok_per_s": {name: round(v, 1) for name, v in medians.items()},
        "ratio_to_plain": {name: round(medians[name] / reference[name], 3) for name in medians},
    }
    mode = "eager" if enforce_eager else "graphs"
    if args.model:
        mode += "-" + re.sub(r"[^a-z0-9]+", "-", Path(args.model).name.lower()).strip("-")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    slug = results["device"].replace(" ", "-").lower()
    path = out_dir / f"{results['date']}-{slug}-{results['commit']}-{mode}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['device']} | vLLM {vllm.__version__} | torch {torch.__version__} | {mode}")
    print(f"startup: plain {plain_startup:.1f} s, workbench {steered_startup:.1f} s")
    print("| configuration | median tok/s | vs plain |\n| --- | ---: | ---: |")
    for name in configs:
        print(f"| {name} | {medians[name]:,.0f} | {results['ratio_to_plain'][name]:.3f} |")
    for layers, phases in results["capture_phases_s"].items():
        print(f"capture {layers}, median seconds per run: {phases}")
    if clocks:
        print(f"GPU clocks and power per configuration: {clocks.medians()}")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--rounds", type=int, help="override the preset's rounds (5 on the GPU)")
    parser.add_argument(
        "--only", help="run only configurations matching this regex (and the plain vLLM they are compared to)"
    )
    parser.add_argument(
        "--model", help="another model: a shape folder of bench/models/ (dummy weights), or a name or path"
    )
    add_mode_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(parser.parse_args()))
