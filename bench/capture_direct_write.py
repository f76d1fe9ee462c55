"""Could a CUDA engine write captured rows straight into shared memory? An experiment without an engine.

Today a CUDA worker copies each step's captured rows to pinned staging memory
(the copy engine) and helper threads copy them on into the capture files:
at all 32 layers of the GPU preset that is 12.5 GB a run, and host page
faults and copies bound it (``capture_host_cost.py``). Here a file in
shared memory is registered with the GPU (``cudaHostRegister``: its pages are
pinned, and under unified addressing the GPU writes them at their host
address), and each step's rows are scattered into it by the GPU, no host
thread touching them. For one decode step of the preset (256 requests,
hidden 4096, bf16) and 1, 4 and 32 layers it times, on a side stream:

- ``scatter``: one ``index_copy_`` per layer from a GPU buffer into the file;
- ``staged``: the first leg of today's path, the same rows copied to pinned
  staging memory;

each alone, and beside a stream of bf16 GEMMs the size of an 8B model's
decode step (what the writes take from compute shows as the GEMMs' slowdown).
It also times registering and unregistering the file, and checks that the
scattered rows landed where the host reads them.

    python bench/capture_direct_write.py [--layers 1 4 32] [--steps 127]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import tempfile
import time
from pathlib import Path

import torch

REQUESTS, POSITIONS, HIDDEN = 256, 192, 4096
ROW_BYTES = HIDDEN * 2
REGISTER_PORTABLE_MAPPED = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped


class HostMapped:
    """A CUDA tensor view (int16 words) of host memory registered with the GPU: kernels write it over PCIe."""

    def __init__(self, address: int, words: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (words,),
            "typestr": "<i2",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


def shared_file(size: int) -> tuple[Path, mmap.mmap]:
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    stats = os.statvfs(folder)
    if stats.f_bavail * stats.f_frsize < size:  # pages a full tmpfs cannot give kill the process (SIGBUS)
        raise SystemExit(f"{folder} has less than the {size / 1e9:.1f} GB this needs; try fewer --layers")
    path = folder / f"capture-direct-{os.getpid()}"
    with open(path, "w+b") as file:
        file.truncate(size)
        return path, mmap.mmap(file.fileno(), size)


def gemm_load() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Activations and weights of a decode step's GEMMs at batch 256 (8B model: 32 layers of 4 matmuls)."""
    x = torch.randn(REQUESTS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(HIDDEN, size, device="cuda", dtype=torch.bfloat16) for size in (6144, 4096, 28672, 14336)]
    return x, weights


def run_gemms(x: torch.Tensor, weights: list[torch.Tensor], layers: int = 32) -> None:
    for _ in range(layers):
        for weight in weights:
            out = x @ weight
            x = out[:, :HIDDEN].contiguous() if out.shape[1] != HIDDEN else out


def timed(stream: torch.cuda.Stream, work, repeats: int) -> float:
    """Seconds per repeat of ``work`` on ``stream`` (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        for index in range(repeats):
            work(index)
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def measure(layers: int, steps: int) -> dict[str, float]:
    size = layers * REQUESTS * POSITIONS * ROW_BYTES
    path, memory = shared_file(size)
    address = torch.frombuffer(memory, dtype=torch.uint8).data_ptr()
    result: dict[str, float] = {"layers": layers, "file_gb": round(size / 1e9, 2)}
    try:
        began = time.perf_counter()
        error = int(torch.cuda.cudart().cudaHostRegister(address, size, REGISTER_PORTABLE_MAPPED))
        assert error == 0, f"cudaHostRegister failed: {error}"
        result["register_s_per_gb"] = round((time.perf_counter() - began) / (size / 1e9), 3)
        rows = torch.as_tensor(HostMapped(address, size // 2), device="cuda").view(torch.bfloat16).view(-1, HIDDEN)
        sources = [torch.randn(REQUESTS, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
        requests = torch.arange(REQUESTS, device="cuda")
        staging = torch.empty(layers, REQUESTS, HIDDEN, dtype=torch.bfloat16, pin_memory=True)
        side = torch.cuda.Stream()

        def scatter(step: int) -> None:
            position = step % POSITIONS
            for layer, source in enumerate(sources):  # row (layer, request, position) of the file
                rows.index_copy_(0, (layer * REQUESTS + requests) * POSITIONS + position, source)

        def staged(step: int) -> None:
            for layer, source in enumerate(sources):
                staging[layer].copy_(source, non_blocking=True)

        x, weights = gemm_load()
        main = torch.cuda.current_stream()
        for name, work in (("scatter", scatter), ("staged", staged)):
            timed(side, work, 3)  # warm-up
            result[f"{name}_ms_per_step"] = round(1e3 * timed(side, work, steps), 3)
            result[f"{name}_gb_per_s"] = round(
                layers * REQUESTS * ROW_BYTES / (result[f"{name}_ms_per_step"] / 1e3) / 1e9, 1
            )
        timed(main, lambda _: run_gemms(x, weights), 2)
        alone = timed(main, lambda _: run_gemms(x, weights), 10)
        result["gemm_step_ms"] = round(1e3 * alone, 3)
        for name, work in (("scatter", scatter), ("staged", staged)):
            with torch.cuda.stream(side):  # writes of many steps queued beside the GEMMs
                for step in range(steps):
                    work(step)
            beside = timed(main, lambda _: run_gemms(x, weights), 10)
            torch.cuda.synchronize()
            result[f"gemm_step_ms_beside_{name}"] = round(1e3 * beside, 3)
        # The last step's rows, read back by the host from the file itself.
        torch.cuda.synchronize()
        host = torch.frombuffer(memory, dtype=torch.bfloat16).view(layers, REQUESTS, POSITIONS, HIDDEN)
        last = (steps - 1) % POSITIONS
        result["rows_landed"] = all(
            torch.equal(host[layer, :, last].clone(), source.cpu()) for layer, source in enumerate(sources)
        )
        del host  # an exported view keeps the mapping from closing
        began = time.perf_counter()
        assert int(torch.cuda.cudart().cudaHostUnregister(address)) == 0
        result["unregister_s_per_gb"] = round((time.perf_counter() - began) / (size / 1e9), 3)
    finally:
        memory.close()
        path.unlink()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--steps", type=int, default=127, help="decode steps written (127: the preset's)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    with torch.inference_mode():
        for count in args.layers:
            try:
                print(json.dumps(measure(count, args.steps)), flush=True)
            except Exception as error:  # an experiment: say what failed and go on with the next size
                print(json.dumps({"layers": count, "error": f"{type(error).__name__}: {error}"}), flush=True)
