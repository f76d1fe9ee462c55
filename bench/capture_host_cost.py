"""Host-side cost of recording captures in a worker, without an engine.

Feeds ``CaptureStore`` the rows of the GPU preset's workload (256 requests x
64 prompt + 128 generated tokens, hidden 4096, bf16: 400 MB per captured
layer) the way the step hook does on CPU (rows written in place on the
calling thread), then fetches them and maps them as the client does. Prints
the time of the prefill step (which opens the capture files), the mean time
per decode step, the worker's fetch and the client's mapping.

    python bench/capture_host_cost.py [--layers 1 4]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from workbench import transfer
from workbench.capture_store import CaptureStore
from workbench.worker import request_payload

REQUESTS, PROMPT, GENERATED, HIDDEN = 256, 64, 128, 4096


@dataclass(frozen=True)
class Step:
    starts: np.ndarray
    computed: np.ndarray


def measure(layers: int) -> dict[str, float]:
    folder = transfer.make_folder()
    captured = range(layers)
    store = CaptureStore(frozenset(captured), HIDDEN, torch.bfloat16, torch.device("cpu"))
    payloads = [
        request_payload(1, f"c{i}", tuple(captured), PROMPT + GENERATED - 1, folder.name) for i in range(REQUESTS)
    ]
    buffers = {layer: torch.randn(REQUESTS * PROMPT, HIDDEN).to(torch.bfloat16) for layer in captured}
    batch, capturing = object(), list(range(REQUESTS))
    start = time.perf_counter()
    prefill = Step(np.arange(REQUESTS + 1) * PROMPT, np.zeros(REQUESTS, dtype=np.int64))
    store.record(batch, payloads, capturing, prefill, buffers)
    prefilled = time.perf_counter()
    decode_rows = {layer: rows[:REQUESTS] for layer, rows in buffers.items()}
    for step in range(GENERATED - 1):
        store.record(
            batch, payloads, capturing, Step(np.arange(REQUESTS + 1), np.full(REQUESTS, PROMPT + step)), decode_rows
        )
    decoded = time.perf_counter()
    reply = store.fetch([f"c{i}" for i in range(REQUESTS)])
    fetched = time.perf_counter()
    rows = transfer.read_reply(reply, HIDDEN)
    mapped = time.perf_counter()
    assert len(rows) == REQUESTS * layers
    folder.cleanup()
    return {
        "layers": layers,
        "prefill_step_ms": round(1e3 * (prefilled - start), 1),
        "decode_step_us": round(1e6 * (decoded - prefilled) / (GENERATED - 1)),
        "fetch_ms": round(1e3 * (fetched - decoded), 1),
        "client_map_ms": round(1e3 * (mapped - fetched), 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4])
    for count in parser.parse_args().layers:
        print(measure(count))
