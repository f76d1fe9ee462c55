"""Host-side cost of recording captures in a worker, without an engine.

Feeds ``CaptureStore`` the rows of the GPU preset's workload (256 requests x
64 prompt + 128 generated tokens, hidden 4096, bf16: 400 MB per captured
layer) the way the step hook does, then fetches them and maps them as the
client does. On CPU the rows are written in place on the calling thread; with
``--device cuda`` the capture buffers live on the GPU and the store stages
each step's rows to pinned memory and writes them on its helper threads, as
in a CUDA engine. Prints, for a run into fresh files and one into the files
the first run gave back: the prefill step (which opens the capture files),
the mean decode step on the calling thread, the time until every row has
been written (``rows_written_s``, helper threads included) with the rate
that makes, the worker's fetch, and the client's mapping and release.

    python bench/capture_host_cost.py [--layers 1 4 32] [--device cuda] [--requests 256]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from workbench import transfer, wire
from workbench.runtime.capture_store import CaptureStore

PROMPT, GENERATED, HIDDEN = 64, 128, 4096


@dataclass(frozen=True)
class Step:
    starts: np.ndarray
    computed: np.ndarray


def measure(layers: int, device: torch.device, requests: int = 256) -> list[dict[str, float]]:
    """Two runs on one store: into fresh files, then into the first run's files given back."""
    folder = wire.HandoffFolder()
    captured = range(layers)
    store = CaptureStore(frozenset(captured), HIDDEN, torch.bfloat16, device)
    buffers = {layer: torch.randn(requests * PROMPT, HIDDEN, device=device).to(torch.bfloat16) for layer in captured}
    decode_rows = {layer: rows[:requests] for layer, rows in buffers.items()}
    given_back: list[str] = []
    results = []
    row_bytes = requests * (PROMPT + GENERATED - 1) * layers * HIDDEN * 2
    for run in ("fresh files", "recycled files"):
        ids = [f"{run[0]}{i}" for i in range(requests)]
        captures = [wire.CaptureRequest(i, tuple(captured), PROMPT + GENERATED - 1, folder.name) for i in ids]
        batch, capturing = object(), list(range(requests))
        start = time.perf_counter()
        prefill = Step(np.arange(requests + 1) * PROMPT, np.zeros(requests, dtype=np.int64))
        store.record(batch, captures, capturing, prefill, buffers)
        prefilled = time.perf_counter()
        for step in range(GENERATED - 1):
            decode = Step(np.arange(requests + 1), np.full(requests, PROMPT + step))
            store.record(batch, captures, capturing, decode, decode_rows)
        decoded = time.perf_counter()
        store._lanes.drain()
        written = time.perf_counter()
        reply = store.fetch(ids)
        fetched = time.perf_counter()
        rows = transfer.read_reply(reply, HIDDEN, given_back.append)
        mapped = time.perf_counter()
        assert len(rows) == requests * layers
        del rows  # the client lets go: its files go back to the store (to be freed, after the last run)
        released = time.perf_counter()
        store.recycle(given_back)
        given_back.clear()
        results.append(
            {
                "layers": layers,
                "run": run,
                "prefill_step_ms": round(1e3 * (prefilled - start), 1),
                "decode_step_us": round(1e6 * (decoded - prefilled) / (GENERATED - 1)),
                "rows_written_s": round(written - start, 3),
                "write_gb_per_s": round(row_bytes / (written - start) / 1e9, 2),
                "fetch_ms": round(1e3 * (fetched - written), 1),
                "client_map_ms": round(1e3 * (mapped - fetched), 1),
                "client_release_ms": round(1e3 * (released - mapped), 1),
            }
        )
    start = time.perf_counter()
    folder.cleanup()
    results[-1]["freeing_files_ms"] = round(1e3 * (time.perf_counter() - start), 1)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: rows staged and written as in a CUDA engine")
    parser.add_argument("--requests", type=int, default=256)
    args = parser.parse_args()
    with torch.inference_mode():  # as vLLM runs its steps
        for count in args.layers:
            for result in measure(count, torch.device(args.device), args.requests):
                print(result, flush=True)
