"""Cost of the per-layer steering path alone, in microseconds per layer and step.

Compiles ``SteeredDecoderLayer``'s path (all ops, position masks and the
capture write: what a compiled engine runs on every layer) and, as the
reference, the residual add vLLM's next layer does anyway, each with
torch.compile and replayed from a CUDA graph, at several token counts. The
difference times the number of layers is what steering adds to each
forward pass; the kernel count (from the profiler, one un-graphed call) says
how much of it is launch overhead.

    python bench/layer_cost.py --hidden 4096 --layers 32     # on the GPU
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from workbench import ops
from workbench.runtime.layer import SteeredDecoderLayer, StepPlan
from workbench.runtime.layer_conventions import PAIR_SUM
from workbench.runtime.steering_tables import ALIGNMENT_BYTES, NO_LAYER, SteeringTables


class PassThrough(nn.Module):
    """Stands in for the wrapped decoder layer: hands its inputs on unchanged."""

    def forward(self, positions: Tensor, hidden: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return hidden, residual


def graphed(fn: Callable[..., Any], *args: Tensor) -> Callable[[], None]:
    """``fn(*args)`` compiled, warmed up and captured into a CUDA graph; returns its replay."""
    compiled = torch.compile(fn, dynamic=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            compiled(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        compiled(*args)
    return graph.replay


def time_us(replay: Callable[[], None], repeats: int = 2000) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(50):
        replay()
    start.record()
    for _ in range(repeats):
        replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def kernel_count(fn: Callable[..., Any], *args: Tensor) -> int:
    compiled = torch.compile(fn, dynamic=False)
    compiled(*args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        compiled(*args)
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 256, 2048])
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    max_tokens = max(args.tokens)
    slot_index = torch.randint(0, args.slots + 1, (max_tokens,), device=device)
    phases = torch.from_numpy(ops.row_codes(np.arange(max_tokens) % 97, prompt_length=48)).to(device)
    tables = SteeringTables.create(1, args.slots, args.hidden, dtype, device)
    capture_flags = torch.ones(1, ALIGNMENT_BYTES, dtype=torch.int8, device=device)  # captured: the costliest path
    marks = torch.full((max_tokens,), NO_LAYER, dtype=torch.int32, device=device)
    plan = StepPlan(eager=False)
    layer_tables = tables.of_layer(0, slot_index, phases, capture_flags[0, :1])
    layer = SteeredDecoderLayer(PassThrough(), 0, PAIR_SUM, plan, layer_tables, marks, max_tokens)
    for name in ("add_vectors", "cap_directions", "ablation_directions"):
        getattr(layer, name).normal_()
    # Every slot caps and ablates, so every row takes the full path.
    layer.cap_min.fill_(-1.0)
    layer.cap_max.fill_(1.0)
    layer.ablation_scales.fill_(0.5)
    results = []
    for tokens in args.tokens:
        out = torch.randn(tokens, args.hidden, device=device, dtype=dtype)
        residual = torch.randn_like(out)
        positions = torch.arange(tokens, device=device)
        steered = graphed(layer, positions, out, residual)
        plain = graphed(lambda o, r: o + r, out, residual)
        steered_us, plain_us = time_us(steered), time_us(plain)
        results.append(
            {
                "tokens": tokens,
                "steered_us": round(steered_us, 2),
                "residual_add_us": round(plain_us, 2),
                "added_us_per_layer": round(steered_us - plain_us, 2),
                "added_ms_per_step": round((steered_us - plain_us) * args.layers / 1000, 3),
                "kernels": kernel_count(layer, positions, out, residual),
            }
        )
        print(json.dumps(results[-1]))
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, hidden {args.hidden}, {args.layers} layers")


if __name__ == "__main__":
    main()
