"""The GPU shape tests (``tests/test_gpu_architectures.py``) in parallel lanes on one GPU.

An engine start under CUDA graphs takes a minute or more and mostly keeps
the CPU busy (compiling, capturing graphs), while the GPU holds each shape's
weights with room to spare: so several pytest processes run at once, each
taking its shapes one by one (both model runners of a shape in the same lane,
the second start then finds the first's compiled graphs in vLLM's cache).
Shapes are spread so that each lane gets a similar number of layers to
compile. Each lane is interrupted at ``--deadline`` seconds and killed
``GRACE_S`` later (an engine starting up may not stop sooner); the summary says
what ran, and each failure's traceback is in its lane's log as soon as it fails.

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

from lane_report import OUTCOME

HERE = Path(__file__).parent
TESTS = "tests/test_gpu_architectures.py"
GRACE_S = 30.0


def shape_weight(shape: Path) -> int:
    """Rough start-up cost: the layers to compile, MoE layers counted twice."""
    config = json.loads((shape / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config.get("n_layer") or 1
    return layers * (2 if config.get("num_experts") or config.get("num_local_experts") else 1)


def lanes_of(shapes: list[Path], count: int) -> list[list[str]]:
    """Heaviest shape first onto the lightest lane."""
    lanes: list[tuple[int, list[str]]] = [(0, []) for _ in range(count)]
    for shape in sorted(shapes, key=shape_weight, reverse=True):
        index = min(range(count), key=lambda i: lanes[i][0])
        weight, names = lanes[index]
        lanes[index] = (weight + shape_weight(shape), [*names, shape.name])
    return [names for _, names in lanes if names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lanes", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=500.0, help="seconds before each lane is interrupted")
    parser.add_argument("--logs", type=Path, default=Path(os.environ.get("OUT", "/tmp")), help="where lane logs go")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression applied in every lane")
    parser.add_argument("--shapes", default="", help="regex: only the shapes whose folder name it finds")
    args = parser.parse_args()
    shapes = sorted(
        path
        for path in (HERE / "models").iterdir()
        if (path / "config.json").exists() and re.search(args.shapes, path.name)
    )
    args.logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for index, names in enumerate(lanes_of(shapes, args.lanes)):
        # One shape after another, both runners of each: ``-k`` picks a lane's shapes by name.
        selection = " or ".join(names)
        keyword = f"({selection})" + (f" and ({args.keyword})" if args.keyword else "")
        log = args.logs / f"lane{index}.log"
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "bench.lane_report"]
        command += ["-rA", "--tb=short", "--durations=0"]
        command += [TESTS, "-k", keyword]
        print(f"lane {index}: {', '.join(names)} -> {log}", flush=True)
        with open(log, "wb") as out:
            # A session of its own: killing the lane also kills its engine's processes.
            lane = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            processes.append((index, log, lane))
        time.sleep(5)  # staggered: the first seconds of an engine start are the busiest on the CPU
    deadline = time.monotonic() + args.deadline
    for _, _, process in processes:
        try:
            process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)  # pytest reports what ran so far
    failed = False
    for index, log, process in processes:
        try:
            process.wait(max(1.0, deadline + GRACE_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        failed |= process.returncode != 0
        text = log.read_text(errors="replace")
        for outcome, test in re.findall(rf"^{OUTCOME} (\w+) (\S+)", text, re.MULTILINE):
            print(f"lane {index}: {outcome} {test.split('::')[-1]}")
        print(f"lane {index}: exit {process.returncode}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
