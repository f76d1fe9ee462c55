"""Where a step's time goes: plain vLLM against the workbench runtime, from vLLM's torch profiler.

Runs the GPU preset's workload (shorter: 256 requests x 64 prompt + 32
generated tokens) once per configuration under vLLM's own profiler and
prints, per configuration: GPU kernel time and count, time spent in CUDA
synchronisation calls on the host, time inside workbench's step hooks
(``workbench.before_step`` / ``after_step`` ranges), and the kernels whose
total time differs most from plain vLLM's. Equal kernel time with lower
throughput means the cost is on the host side.

    python bench/profile_steps.py [gpu|cpu]                          # traces under /tmp/workbench-profile
    python bench/profile_steps.py gpu --requests 1 --max-tokens 128  # batch-1 decode

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

from bench_steering import PRESETS, random_spec  # noqa: E402  (run from bench/ or with it on sys.path)

OUT = Path("/tmp/workbench-profile")


def summarise(traces: list[Path]) -> dict[str, Any]:
    kernels: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    syncs: Counter[str] = Counter()
    annotations: Counter[str] = Counter()
    for trace in traces:
        opener = gzip.open if trace.suffix == ".gz" else open
        with opener(trace, "rt") as handle:
            events = json.load(handle).get("traceEvents", [])
        for event in events:
            category, name, duration = event.get("cat", ""), event.get("name", ""), event.get("dur", 0)
            if category == "kernel":
                kernels[name[:80]] += duration
                counts[name[:80]] += 1
            elif category == "cuda_runtime" and "Synchronize" in name:
                syncs[name] += duration
            elif category == "user_annotation" and name.startswith("workbench."):
                annotations[name] += duration
    return {
        "kernel_ms": sum(kernels.values()) / 1000,
        "kernel_count": sum(counts.values()),
        "sync_ms": {name: round(us / 1000, 2) for name, us in syncs.items()},
        "workbench_hooks_ms": {name: round(us / 1000, 2) for name, us in annotations.items()},
        "kernels": kernels,
    }


async def main() -> None:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.config import ProfilerConfig
    from vllm.v1.engine.async_llm import AsyncLLM

    from workbench import SteeringSpec, VLLMSteeringConfig, VLLMSteerModel
    from workbench.embedded import resolve_model_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--requests", type=int, help="requests per run (default: the preset's)")
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request")
    args = parser.parse_args()
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    preset = PRESETS[args.preset]
    requests = args.requests or preset.requests
    prompts = [[100 + (i * 7 + j) % 30000 for j in range(preset.prompt_tokens)] for i in range(requests)]
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
    results = {}

    async def profiled(name: str, engine: Any, folder: Path, run: Any) -> None:
        await run()  # warm-up
        before = set(folder.rglob("*.json*"))
        await engine.start_profile()
        start = time.perf_counter()
        await run()
        seconds = time.perf_counter() - start
        await engine.stop_profile()
        await asyncio.sleep(10)  # the workers write their traces
        results[name] = {"wall_s": round(seconds, 3), **summarise(sorted(set(folder.rglob("*.json*")) - before))}

    plain = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=resolve_model_name(preset.model),
            load_format=preset.load_format,
            profiler_config=profiler("plain"),
            **common,
        )
    )

    async def run_plain() -> None:
        async def one(ids: list[int], i: int) -> None:
            async for _ in plain.generate({"prompt_token_ids": ids}, params, f"p{time.time_ns()}-{i}"):
                pass

        await asyncio.gather(*(one(ids, i) for i, ids in enumerate(prompts)))

    await profiled("plain", plain, OUT / "plain", run_plain)
    plain.shutdown()

    engine_only = ("skip_tokenizer_init", "enable_prefix_caching")
    settings = {key: value for key, value in common.items() if key not in engine_only}
    cfg = VLLMSteeringConfig(
        model_name=preset.model,
        load_format=preset.load_format,
        engine_kwargs={key: common[key] for key in engine_only},
        **settings,
    )
    model = VLLMSteerModel(cfg, profiler_config=profiler("workbench"))
    add_all = random_spec(list(range(model.layer_count)), model.hidden_size, seed=1)
    for name, spec in (("loaded", SteeringSpec()), ("add-all", add_all)):
        await profiled(
            name, model.engine, OUT / "workbench", lambda spec=spec: model.generate(prompts, params, steering_spec=spec)
        )
    model.close()

    reference = results["plain"]["kernels"]
    for name, result in results.items():
        kernels = result.pop("kernels")
        print(f"\n== {name}: {json.dumps(result)}")
        if name != "plain":
            diff = {k: (kernels.get(k, 0) - reference.get(k, 0)) / 1000 for k in set(kernels) | set(reference)}
            for kernel, ms in sorted(diff.items(), key=lambda item: -abs(item[1]))[:12]:
                print(f"  {ms:+9.2f} ms  {kernel}")


if __name__ == "__main__":
    asyncio.run(main())
