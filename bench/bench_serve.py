"""Serving throughput and time to first token: plain ``vllm serve`` against ``workbench serve``.

Configurations, each measured with the same load (N prompts of random token
ids, streamed greedy ``/v1/completions`` requests with ``ignore_eos``, C
concurrent clients, sent by P load-generator processes of this script, C/P
clients each, so that no one Python process bounds the measurement):

- ``plain vllm serve``: vLLM's own server on the same model and options;
- ``workbench serve, no steering``: the steering server, requests without ``steering``;
- ``workbench serve, 16 distinct specs``: each request carries one of 16 specs
  (an add on every layer, vectors in base64: ~700 kB of JSON per request on
  the GPU preset), so 16 slots run in every batch;
- ``workbench serve, 16 distinct specs by name``: the same specs saved in the
  server's ``--steering-dir``, each request naming one (``{"name": ...}``),
  as an evaluation harness would send them.

One server runs at a time (plain vLLM first, then the workbench server for
both of its configurations), each warmed up before ``rounds`` timed rounds.
Reported per configuration: output tokens per second (median over rounds),
time to first token (mean, median and p99 over requests, median over rounds),
the ratio of throughput to plain vLLM's, the median time between two
streamed events and before the last one (which carries the finish: a
steered request's waits for its inf/NaN marks), how many greedy outputs of the
unsteered workbench server equal plain vLLM's token for token, and the CPU
time of each server and load-generator process per second of the round (the
API server's event loop streams every token; at 1.0 a process is saturated).
``--plain-v1`` adds plain vLLM with its V1 model runner (CUDA), for reference. ``--py-spy DIR`` records
one more round of each workbench configuration with py-spy (collapsed stacks
of the API server and the engine core, in DIR), outside the timed rounds.

    python bench/bench_serve.py --preset cpu     # embedded SmolLM2 on this machine (a check that it runs)
    python bench/bench_serve.py --preset gpu     # Llama-3-8B shape, dummy bf16 weights: 256 prompts, 64 clients

Results go to bench/results/<date>-<card>-<commit>-serve-<preset>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import multiprocessing
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import torch

sys.path.insert(1, str(Path(__file__).parent.parent))  # the workbench of this checkout

from bench_steering import commit, device_name, random_spec  # noqa: E402

from workbench.embedded import resolve_model_name  # noqa: E402
from workbench.serve.launch import ServerProcess  # noqa: E402

HERE = Path(__file__).parent
logger = logging.getLogger("bench_serve")


@dataclass(frozen=True)
class Preset:
    model: str
    server_args: tuple[str, ...]
    prompts: int
    concurrency: int
    prompt_tokens: int
    output_tokens: int
    rounds: int
    load_processes: int
    """Processes sending the requests (the load generator): enough that none is the bottleneck."""
    specs: int = 16


PRESETS = {
    "cpu": Preset(
        model="smollm2-135m-instruct",
        server_args=("--dtype", "float32", "--max-model-len", "512", "--enforce-eager"),
        prompts=32,
        concurrency=8,
        prompt_tokens=32,
        output_tokens=32,
        rounds=2,
        load_processes=1,
    ),
    "gpu": Preset(
        model=str(HERE / "models" / "llama3-8b-shape"),
        server_args=(
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "1024",
            "--load-format",
            "dummy",
            "--skip-tokenizer-init",
            "--gpu-memory-utilization",
            "0.85",
        ),  # fmt: skip
        prompts=256,
        concurrency=64,
        prompt_tokens=64,
        output_tokens=128,
        rounds=3,
        load_processes=4,
    ),
}
"""Both kinds of server get the preset's options, with prefix caching off: every round
sends the same prompts, and cached prefills would hide the cost of prefill."""


@dataclass
class Round:
    tok_per_s: float
    ttft_s: list[float]
    outputs: list[list[int]]
    cpu_share: dict[str, float]
    """Server process name -> its CPU seconds per second of the round."""
    itl_s: list[float]
    """Per request, the median time between two events carrying tokens (the last one left out)."""
    last_gap_s: list[float]
    """Per request, the time before its last token's event (it carries the finish: a steered request's
    waits for its inf/NaN marks; well above ``itl_s``, that wait costs throughput)."""


class ServerCpu:
    """CPU time of a server's processes (the API server and vLLM's engine processes, by name),
    and of the load generator's processes (``load generator N``): at 1.0 a process is the bottleneck."""

    def __init__(self, pid: int, generators: list[int]) -> None:
        self.root = psutil.Process(pid)
        self.generators = [psutil.Process(pid) for pid in generators]

    def processes(self) -> dict[str, psutil.Process]:
        found = {f"load generator {i}": process for i, process in enumerate(self.generators)}
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                name = process.name()
            except psutil.Error:
                continue
            found[name if name not in found else f"{name}:{process.pid}"] = process
        return found

    def seconds(self) -> dict[str, float]:
        taken = {}
        for name, process in self.processes().items():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            taken[name] = times.user + times.system
        return taken

    def shares(self, before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
        """CPU seconds per wall second of each process busy more than 2% of the time."""
        shares = {name: (after[name] - before.get(name, 0.0)) / wall_s for name in after}
        return {name: round(share, 3) for name, share in shares.items() if share > 0.02}


Stream = tuple[float, list[float], list[int], int]
"""One request: its start (``time.monotonic``, the same clock in every process), the arrival
times of its events carrying tokens (from its start), its tokens, their count."""


class LoadGenerator:
    """Processes that send the requests, each ``1/processes`` of them with as large a share of the
    clients: one Python process streaming 64 requests used ~0.9 of a core on the GPU preset and
    bounded what it measured. Each round hands every process its share and starts them all at
    the same instant."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        started = context.SimpleQueue()
        # A pool starts all its processes at once; each says who it is (their CPU time is reported).
        self.pool = context.Pool(processes, initializer=_announce, initargs=(started,))
        self.processes = processes
        self.pids = sorted(started.get() for _ in range(processes))

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *_: object) -> None:
        self.pool.terminate()
        self.pool.join()

    def run(self, url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[Stream]]:
        """Stream every body, ``concurrency`` in flight in total; the round's wall time and each request."""
        shares = [bodies[i :: self.processes] for i in range(self.processes)]
        # Time to unpickle the bodies (700 kB each when steered) before the common start.
        start_at = time.monotonic() + 0.5 + sum(map(len, bodies)) / 1e9
        per_process = max(1, concurrency // self.processes)
        # Each share blocks its process until start_at and then for the round: one share per process.
        pending = [self.pool.apply_async(_stream_share, (url, share, per_process, start_at)) for share in shares]
        streams: list[Any] = [None] * len(bodies)
        for index, share in enumerate(pending):
            streams[index :: self.processes] = share.get()  # back in the order of ``bodies``
        ended = max(started + (arrivals[-1] if arrivals else 0.0) for started, arrivals, *_ in streams)
        # Requests end with their last event; the round's clock starts at the common start.
        return ended - start_at, streams


def _announce(started: Any) -> None:
    started.put(os.getpid())


def _stream_share(url: str, bodies: list[bytes], concurrency: int, start_at: float) -> list[Stream]:
    time.sleep(max(0.0, start_at - time.monotonic()))
    return asyncio.run(_stream_all(url, bodies, concurrency))


async def _stream_all(url: str, bodies: list[bytes], concurrency: int) -> list[Stream]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:

        async def one(body: bytes) -> Stream:
            async with gate:
                started = time.monotonic()
                arrivals: list[float] = []
                tokens: list[int] = []
                count = 0
                async with client.stream("POST", "/v1/completions", content=body, headers=headers) as reply:
                    if reply.status_code != 200:
                        raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        for choice in event.get("choices") or ():
                            if choice.get("token_ids"):
                                arrivals.append(time.monotonic() - started)
                                tokens += choice["token_ids"]
                        if event.get("usage"):
                            count = event["usage"]["completion_tokens"]
            return started, arrivals, tokens, count

        return await asyncio.gather(*(one(body) for body in bodies))


def encode(model: str, prompts: list[list[int]], preset: Preset, bodies: list[dict[str, Any]]) -> list[bytes]:
    """Each prompt's streamed greedy request, with ``bodies[i]`` merged in, as bytes (encoded once:
    a spec on every layer is ~700 kB of JSON)."""
    return [
        json.dumps(
            {
                "model": model,
                "prompt": ids,
                "max_tokens": preset.output_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
                "return_token_ids": True,
                **extra,
            }
        ).encode()
        for ids, extra in zip(prompts, bodies)
    ]


def load(url: str, generator: LoadGenerator, encoded: list[bytes], preset: Preset, cpu: ServerCpu) -> Round:
    """One round: every request, ``preset.concurrency`` at a time."""
    cpu_before = cpu.seconds()
    elapsed, results = generator.run(url, encoded, preset.concurrency)
    shares = cpu.shares(cpu_before, cpu.seconds(), elapsed)
    gaps = [np.diff(arrivals) for _, arrivals, _, _ in results if len(arrivals) > 2]
    return Round(
        tok_per_s=sum(count for *_, count in results) / elapsed,
        ttft_s=[arrivals[0] if arrivals else 0.0 for _, arrivals, _, _ in results],
        outputs=[tokens for _, _, tokens, _ in results],
        cpu_share=shares,
        itl_s=[float(np.median(gap[:-1])) for gap in gaps],
        last_gap_s=[float(gap[-1]) for gap in gaps],
    )


def summary(rounds: list[Round]) -> dict[str, Any]:
    def p99(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]

    return {
        "tok_per_s": [round(r.tok_per_s, 1) for r in rounds],
        "median_tok_per_s": round(statistics.median(r.tok_per_s for r in rounds), 1),
        "ttft_mean_s": round(statistics.median(statistics.fmean(r.ttft_s) for r in rounds), 4),
        "ttft_median_s": round(statistics.median(statistics.median(r.ttft_s) for r in rounds), 4),
        "ttft_p99_s": round(statistics.median(p99(r.ttft_s) for r in rounds), 4),
        "itl_median_s": round(statistics.median(statistics.median(r.itl_s) for r in rounds), 5),
        "last_gap_median_s": round(statistics.median(statistics.median(r.last_gap_s) for r in rounds), 5),
        "cpu_share": {
            name: round(statistics.median(r.cpu_share.get(name, 0.0) for r in rounds), 3)
            for name in sorted({name for r in rounds for name in r.cpu_share})
        },
    }


def measure(
    server: ServerProcess,
    generator: LoadGenerator,
    preset: Preset,
    configs: dict[str, list[bytes]],
    profile_dir: Path | None = None,
) -> dict[str, list[Round]]:
    """Warm each configuration up once, then time ``preset.rounds`` rounds of each, alternating;
    with ``profile_dir``, one more round of each under py-spy."""
    cpu = ServerCpu(server.pid, generator.pids)
    for encoded in configs.values():
        load(server.url, generator, encoded, preset, cpu)
    rounds: dict[str, list[Round]] = {name: [] for name in configs}
    for index in range(preset.rounds):
        for name, encoded in configs.items():
            rounds[name].append(load(server.url, generator, encoded, preset, cpu))
            logger.info(
                "%s, round %d: %.0f tok/s, CPU per process %s",
                name, index + 1, rounds[name][-1].tok_per_s, rounds[name][-1].cpu_share,
            )  # fmt: skip
    if profile_dir is not None:
        for name, encoded in configs.items():
            with py_spy(cpu, profile_dir / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")):
                load(server.url, generator, encoded, preset, cpu)
    return rounds


@contextlib.contextmanager
def py_spy(cpu: ServerCpu, prefix: Path) -> Iterator[None]:
    """py-spy records each server process while the block runs (collapsed stacks, ``<prefix>-<process>.txt``)."""
    recorders = [
        subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(process.pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                f"{prefix}-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}.txt",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for name, process in cpu.processes().items()
        if not name.startswith("load generator") and "resource_tracker" not in " ".join(process.cmdline())
    ]
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)
        for recorder in recorders:
            recorder.wait(60)


def main(args: argparse.Namespace) -> None:
    preset = PRESETS[args.preset]
    if args.rounds:
        preset = Preset(**{**preset.__dict__, "rounds": args.rounds})
    model = resolve_model_name(preset.model)
    served = preset.model if model != preset.model else model
    config = json.loads((Path(model) / "config.json").read_text())
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    seeded = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, min(vocab, 32000), (preset.prompt_tokens,), generator=seeded).tolist()
        for _ in range(preset.prompts)
    ]
    specs = [random_spec(list(range(layers)), hidden, seed=100 + i) for i in range(preset.specs)]
    inline = [spec.to_dict(vector_format="base64") for spec in specs]
    steered = encode(served, prompts, preset, [{"steering": inline[i % preset.specs]} for i in range(preset.prompts)])
    by_name = encode(
        served, prompts, preset, [{"steering": {"name": f"spec{i % preset.specs}"}} for i in range(preset.prompts)]
    )
    unsteered = encode(served, prompts, preset, [{} for _ in prompts])
    common = [
        *("--model", model, "--served-model-name", served, "--seed", "0", "--no-enable-prefix-caching"),
        *preset.server_args,
    ]
    checkout = str(HERE.parent)  # the servers run this checkout's workbench too
    env = {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        "PYTHONPATH": os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")])),
    }
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    steering_dir = logs / "steering"
    steering_dir.mkdir()
    for i, spec in enumerate(specs):
        spec.save(steering_dir / f"spec{i}.safetensors")
    profile_dir = Path(args.py_spy) if args.py_spy else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[Round]] = {}
    startup: dict[str, float] = {}
    with LoadGenerator(args.load_processes or preset.load_processes) as generator:
        plain_kinds = {} if args.no_plain else {"plain vllm serve": {}}
        if torch.cuda.is_available() and args.plain_v1:  # V2 is vLLM's CUDA default; V1 for reference
            plain_kinds["plain vllm serve, V1 runner"] = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
        for name, extra_env in plain_kinds.items():
            started = time.perf_counter()
            with ServerProcess.vllm(common, env={**env, **extra_env}, log_path=logs / f"{name}.log") as server:
                startup[name] = round(time.perf_counter() - started, 1)
                results.update(measure(server, generator, preset, {name: unsteered}, profile_dir))
        started = time.perf_counter()
        workbench_args = [*common, "--steering-dir", str(steering_dir)]
        with ServerProcess.workbench(workbench_args, env=env, log_path=logs / "workbench.log") as server:
            startup["workbench serve"] = round(time.perf_counter() - started, 1)
            configs = {
                "workbench serve, no steering": unsteered,
                f"workbench serve, {preset.specs} distinct specs": steered,
                f"workbench serve, {preset.specs} distinct specs by name": by_name,
            }
            results.update(measure(server, generator, preset, configs, profile_dir))

    base = "workbench serve, no steering" if args.no_plain else "plain vllm serve"
    plain = statistics.median(r.tok_per_s for r in results[base])
    same = sum(a == b for a, b in zip(results[base][-1].outputs, results["workbench serve, no steering"][-1].outputs))
    import vllm

    report = {
        "date": dt.date.today().isoformat(),
        "device": device_name(),
        "commit": commit(),
        "preset": args.preset,
        "workload": {
            "model": preset.model,
            "server_args": list(preset.server_args),
            "prompts": preset.prompts,
            "concurrency": preset.concurrency,
            "load_processes": generator.processes,
            "prompt_tokens": preset.prompt_tokens,
            "output_tokens": preset.output_tokens,
            "rounds": preset.rounds,
            "specs": preset.specs,
        },
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "startup_s": startup,
        "configurations": {name: summary(rounds) for name, rounds in results.items()},
        "ratios_to": base,
        "ratio_to_plain": {
            name: round(statistics.median(r.tok_per_s for r in rounds) / plain, 3) for name, rounds in results.items()
        },
        "unsteered_outputs_equal_plain": f"{same}/{len(prompts)}",
    }
    slug = report["device"].replace(" ", "-").lower()
    path = HERE / "results" / f"{report['date']}-{slug}-{report['commit']}-serve-{args.preset}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['device']} | vLLM {vllm.__version__} | {preset.prompts} prompts, {preset.concurrency} clients")
    print(
        f"| configuration | tok/s | vs {base} | TTFT mean | TTFT p99 | between tokens | before the last "
        "| CPU per process |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    for name, row in report["configurations"].items():
        cpu = ", ".join(f"{process} {share:.2f}" for process, share in row["cpu_share"].items())
        print(
            f"| {name} | {row['median_tok_per_s']:,.0f} | {report['ratio_to_plain'][name]:.3f} "
            f"| {row['ttft_mean_s'] * 1000:.0f} ms | {row['ttft_p99_s'] * 1000:.0f} ms "
            f"| {row['itl_median_s'] * 1000:.1f} ms | {row['last_gap_median_s'] * 1000:.1f} ms | {cpu} |"
        )
    print(f"unsteered outputs equal to plain vLLM's: {report['unsteered_outputs_equal_plain']}; server logs in {logs}")
    print(f"written to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--rounds", type=int, help="override the preset's timed rounds")
    parser.add_argument(
        "--no-plain", action="store_true", help="skip plain vLLM: ratios are then to the unsteered workbench server"
    )
    parser.add_argument("--load-processes", type=int, help="override the preset's load generator processes")
    parser.add_argument("--plain-v1", action="store_true", help="also plain vLLM with its V1 model runner (CUDA)")
    parser.add_argument("--py-spy", metavar="DIR", help="record one more round of each configuration into DIR")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    main(parser.parse_args())
