"""The GPU shape tests (``tests/test_gpu_architectures.py``) several at a time on one GPU.

An engine start under CUDA graphs takes a minute or more and mostly keeps
the CPU busy (compiling, capturing graphs), while the GPU holds each shape's
weights with room to spare: so up to ``--lanes`` pytest processes run at
once, one per shape (both model runners of it, the second start finding the
first's compiled graphs in vLLM's cache). Shapes start heaviest to compile
first, each as soon as a lane is free and the card has room for it beside
the shapes running (weights counted from the config: on an 80 GB card
Qwen3-30B-A3B runs beside the small shapes only). At ``--deadline`` seconds
running shapes are interrupted and killed ``GRACE_S`` later (an engine
starting up may not stop sooner), and none starts after it; the summary
says what ran, and each failure's traceback is in its shape's log as soon
as it fails.

    python3 bench/shape_lanes.py [--lanes 4] [--deadline 500] [--logs DIR] [--shapes REGEX] [-k EXPR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from lane_report import OUTCOME

HERE = Path(__file__).parent
TESTS = "tests/test_gpu_architectures.py"
GRACE_S = 30.0


ENGINE_OVERHEAD_GIB = 2.5
"""Per engine beside its weights: the test's 1 GiB of KV cache, activations, CUDA graphs, the CUDA context."""


def _config(shape: Path) -> dict:
    return json.loads((shape / "config.json").read_text())


def shape_weight(shape: Path) -> int:
    """Rough start-up cost: the layers to compile, MoE layers counted twice."""
    config = _config(shape)
    layers = config.get("num_hidden_layers") or config.get("n_layer") or 1
    return layers * (2 if config.get("num_experts") or config.get("num_local_experts") else 1)


def shape_gib(shape: Path) -> float:
    """Rough GPU memory of a shape's engine: bf16 weights counted from the config, plus the overhead."""
    config = _config(shape)
    hidden = config.get("hidden_size") or config["n_embd"]
    layers = config.get("num_hidden_layers") or config["n_layer"]
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    experts = config.get("num_experts") or config.get("num_local_experts")
    if experts:
        mlp = experts * 3 * hidden * (config.get("moe_intermediate_size") or config["intermediate_size"])
    elif config["architectures"][0].startswith(("GPT2", "GPTNeoX")):  # up and down, no gate
        mlp = 2 * hidden * (config.get("intermediate_size") or config.get("n_inner") or 4 * hidden)
    else:
        mlp = 3 * hidden * config["intermediate_size"]
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return 2 * (embeddings + layers * (attention + mlp)) / 2**30 + ENGINE_OVERHEAD_GIB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lanes", type=int, default=4, help="shapes running at once, at most")
    parser.add_argument("--deadline", type=float, default=500.0, help="seconds before running shapes are interrupted")
    parser.add_argument(
        "--logs", type=Path, default=Path(os.environ.get("OUT", "/tmp")), help="where each shape's log goes"
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression applied to every shape")
    parser.add_argument("--shapes", default="", help="regex: only the shapes whose folder name it finds")
    args = parser.parse_args()
    shapes = sorted(
        path
        for path in (HERE / "models").iterdir()
        if (path / "config.json").exists() and re.search(args.shapes, path.name)
    )
    args.logs.mkdir(parents=True, exist_ok=True)
    card_gib = 0.92 * torch.cuda.mem_get_info()[1] / 2**30
    gib = {shape.name: shape_gib(shape) for shape in shapes}
    waiting = sorted(shapes, key=shape_weight, reverse=True)
    too_large = [shape.name for shape in waiting if gib[shape.name] > card_gib]
    if too_large:
        print(f"not run, larger than the card's {card_gib:.0f} GiB: {', '.join(too_large)}", flush=True)
        waiting = [shape for shape in waiting if shape.name not in too_large]
    running: dict[str, subprocess.Popen] = {}
    finished: dict[str, int] = {}
    deadline = time.monotonic() + args.deadline
    while waiting or running:
        for name, process in list(running.items()):
            if process.poll() is not None:
                finished[name] = process.returncode
                del running[name]
        in_use = sum(gib[name] for name in running)
        fits = [shape for shape in waiting if in_use + gib[shape.name] <= card_gib]
        if fits and len(running) < args.lanes and time.monotonic() < deadline:
            shape = fits[0]
            waiting.remove(shape)
            running[shape.name] = start(shape, args)
            print(f"{shape.name}: started (~{gib[shape.name]:.0f} GiB, {in_use:.0f} in use)", flush=True)
            time.sleep(5)  # staggered: the first seconds of an engine start are the busiest on the CPU
            continue
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    for process in running.values():
        process.send_signal(signal.SIGINT)  # pytest reports what ran so far
    for name, process in running.items():
        try:
            process.wait(max(1.0, deadline + GRACE_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        finished[name] = process.returncode
    for shape in waiting:
        print(f"{shape.name}: not started before the deadline")
    for name, code in finished.items():
        text = (args.logs / f"{name}.log").read_text(errors="replace")
        for outcome, test in re.findall(rf"^{OUTCOME} (\w+) (\S+)", text, re.MULTILINE):
            print(f"{name}: {outcome} {test.split('::')[-1]}")
        print(f"{name}: exit {code}")
    return 1 if too_large or waiting or any(finished.values()) else 0


def start(shape: Path, args: argparse.Namespace) -> subprocess.Popen:
    """pytest on one shape's tests (both runners), in a session of its own: killing it kills its engine too."""
    keyword = shape.name + (f" and ({args.keyword})" if args.keyword else "")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "bench.lane_report"]
    command += ["-rA", "--tb=short", "--durations=0", TESTS, "-k", keyword]
    with open(args.logs / f"{shape.name}.log", "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


if __name__ == "__main__":
    sys.exit(main())
