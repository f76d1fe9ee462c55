"""Where a step's time goes: plain vLLM against the workbench runtime, from vLLM's torch profiler.

Runs the GPU preset's workload (shorter: 256 requests x 64 prompt + 32
generated tokens) once per configuration under vLLM's own profiler and
prints, per configuration: GPU kernel time and count, time spent in CUDA
synchronisation calls on the host, time inside workbench's step hooks
(``workbench.before_step`` / ``after_step`` ranges), and the kernels whose
total time differs most from plain vLLM's. Equal kernel time with lower
throughput means the cost is on the host side.

    python bench/profile_steps.py [gpu|cpu]                          # traces under /tmp/workbench-profile
    python bench/profile_steps.py gpu --requests 1 256 --max-tokens 64  # batch-1 and batch-256 decode
    python bench/profile_steps.py gpu --requests 256 --configs loaded     # one configuration
    python bench/profile_steps.py gpu --eager --requests 1 --configs add-all  # both engines eager

Both engines run in the runtime's default mode for the platform (CUDA graphs
on GPUs, eager on CPU) unless ``--eager`` / ``--graphs`` says otherwise.

Both engines use vLLM's V1 model runner and no prefix caching, as in the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench_steering import PRESETS, add_mode_arguments, random_spec  # noqa: E402  (run from bench/ or with it on sys.path)

OUT = Path("/tmp/workbench-profile")
CONFIGURATIONS = ["loaded", "add-all", "capture-4"]


def summarise(traces: list[Path], steps: int) -> dict[str, Any]:
    """Totals over the traces, and per step where that is what compares across runs."""
    kernels: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    syncs: Counter[str] = Counter()
    runtime_calls: Counter[str] = Counter()
    annotations: Counter[str] = Counter()
    timeline: list[tuple[float, float, str, dict[str, Any]]] = []
    first, last = float("inf"), 0.0
    for trace in traces:
        opener = gzip.open if trace.suffix == ".gz" else open
        with opener(trace, "rt") as handle:
            events = json.load(handle).get("traceEvents", [])
        for event in events:
            category, name, duration = event.get("cat", ""), event.get("name", ""), event.get("dur", 0)
            if category in ("kernel", "gpu_memcpy"):
                kernels[name[:80]] += duration
                counts[name[:80]] += 1
                first, last = min(first, event["ts"]), max(last, event["ts"] + duration)
                args = event.get("args", {})
                detail = {key: args[key] for key in ("grid", "block", "bytes", "correlation", "stream") if key in args}
                timeline.append((event["ts"], duration, name[:80], detail))
            elif category == "cuda_runtime":
                runtime_calls[name] += 1
                if "Synchronize" in name:
                    syncs[name] += duration
            elif category == "user_annotation" and name.startswith("workbench."):
                annotations[name] += duration
    kernel_us = sum(kernels.values())
    return {
        "kernel_us_per_step": round(kernel_us / steps, 1),
        "kernels_per_step": round(sum(counts.values()) / steps, 1),
        "gpu_span_us_per_step": round((last - first) / steps, 1) if kernels else 0.0,
        "gpu_busy": round(kernel_us / (last - first), 3) if kernels else 0.0,
        "sync_ms": {name: round(us / 1000, 2) for name, us in syncs.items()},
        "runtime_calls_per_step": {name: round(n / steps, 1) for name, n in runtime_calls.most_common(8)},
        "workbench_hooks_us_per_step": {name: round(us / steps, 1) for name, us in annotations.items()},
        "kernels": kernels,
        "counts": counts,
        "timeline": sorted(timeline),
    }


async def wait_for_traces(folder: Path, before: set[Path]) -> list[Path]:
    """The trace files written since ``before``, once their sizes stop changing."""
    sizes: dict[Path, int] = {}
    for _ in range(120):
        await asyncio.sleep(1)
        now = {path: path.stat().st_size for path in set(folder.rglob("*.json*")) - before}
        if now and now == sizes:
            return sorted(now)
        sizes = now
    raise TimeoutError(f"no complete trace under {folder}")


async def main() -> None:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.config import ProfilerConfig
    from vllm.v1.engine.async_llm import AsyncLLM

    from workbench import SteeringSpec, VLLMSteeringConfig, VLLMSteerModel
    from workbench.embedded import resolve_model_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--requests", type=int, nargs="+", help="batch sizes, one workload each")
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument(
        "--configs", nargs="+", choices=CONFIGURATIONS, default=CONFIGURATIONS, help="workbench configurations to run"
    )
    add_mode_arguments(parser)
    args = parser.parse_args()
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    from workbench.config import is_cpu_platform

    enforce_eager = is_cpu_platform() if args.eager is None else args.eager  # the runtime's default per platform
    preset = PRESETS[args.preset]
    workloads = {
        count: [[100 + (i * 7 + j) % 30000 for j in range(preset.prompt_tokens)] for i in range(count)]
        for count in args.requests or [preset.requests]
    }
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def profiler(name: str) -> ProfilerConfig:
        return ProfilerConfig(profiler="torch", torch_profiler_dir=str(OUT / name), torch_profiler_with_stack=False)

    common = {
        "dtype": preset.dtype,
        "max_model_len": preset.max_model_len,
        "gpu_memory_utilization": preset.gpu_memory_utilization,
        "skip_tokenizer_init": True,
        "enable_prefix_caching": False,
    }
    results: dict[str, dict[str, Any]] = {}

    async def profiled(name: str, engine: Any, folder: Path, run: Any) -> None:
        await run()  # warm-up
        before = set(folder.rglob("*.json*"))
        await engine.start_profile()
        start = time.perf_counter()
        await run()
        seconds = time.perf_counter() - start
        await engine.stop_profile()
        traces = await wait_for_traces(folder, before)
        wall = {"wall_ms_per_step": round(seconds * 1000 / args.max_tokens, 3)}
        results[name] = {**wall, **summarise(traces, args.max_tokens)}

    plain = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=resolve_model_name(preset.model),
            load_format=preset.load_format,
            profiler_config=profiler("plain"),
            enforce_eager=enforce_eager,
            **common,
        )
    )

    def run_plain(prompts: list[list[int]]) -> Any:
        async def one(ids: list[int], i: int) -> None:
            async for _ in plain.generate({"prompt_token_ids": ids}, params, f"p{time.time_ns()}-{i}"):
                pass

        return asyncio.gather(*(one(ids, i) for i, ids in enumerate(prompts)))

    for count, prompts in workloads.items():
        await profiled(f"plain x{count}", plain, OUT / "plain", lambda prompts=prompts: run_plain(prompts))
    plain.shutdown()

    engine_only = ("skip_tokenizer_init", "enable_prefix_caching")
    settings = {key: value for key, value in common.items() if key not in engine_only}
    cfg = VLLMSteeringConfig(
        model_name=preset.model,
        load_format=preset.load_format,
        engine_kwargs={key: common[key] for key in engine_only},
        **settings,
    )
    model = VLLMSteerModel(cfg, enforce_eager=enforce_eager, profiler_config=profiler("workbench"))
    add_all = random_spec(list(range(model.layer_count)), model.hidden_size, seed=1)

    async def run_steered(prompts: list[list[int]], spec: Any, capture: list[int] | None) -> None:
        result = await model.generate(prompts, params, capture_layers=capture, steering_spec=spec)
        if capture is not None:
            await model.fetch_captures_batch(result[1])
            for handle in result[1]:
                handle.close()

    configurations = {
        "loaded": (SteeringSpec(), None),
        "add-all": (add_all, None),
        "capture-4": (SteeringSpec(), [0, 4, 8, 12]),
    }
    for count, prompts in workloads.items():
        for name in args.configs:
            spec, capture = configurations[name]
            await profiled(
                f"{name} x{count}",
                model.engine,
                OUT / "workbench",
                lambda spec=spec, capture=capture, prompts=prompts: run_steered(prompts, spec, capture),
            )
    model.close()

    kernels = {name: result.pop("kernels") for name, result in results.items()}
    counts = {name: result.pop("counts") for name, result in results.items()}
    timelines = {name: result.pop("timeline") for name, result in results.items()}
    if os.environ.get("OUT"):  # every GPU event, for a closer look
        for name, timeline in timelines.items():
            with gzip.open(Path(os.environ["OUT"]) / f"events-{name.replace(' ', '-')}.json.gz", "wt") as handle:
                json.dump(timeline, handle)
    for name, result in results.items():
        print(f"\n== {name}: {json.dumps(result)}")
        if not name.startswith("plain"):
            reference = f"plain x{name.split(' x')[1]}"
            mine, theirs = kernels[name], kernels[reference]
            diff = {k: (mine.get(k, 0) - theirs.get(k, 0)) / args.max_tokens for k in set(mine) | set(theirs)}
            for kernel, us in sorted(diff.items(), key=lambda item: -abs(item[1]))[:12]:
                more = (counts[name][kernel] - counts[reference][kernel]) / args.max_tokens
                print(f"  {us:+9.1f} us/step {more:+7.1f} calls/step  {kernel}")


if __name__ == "__main__":
    asyncio.run(main())
