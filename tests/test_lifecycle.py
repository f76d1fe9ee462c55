"""Engine lifecycle: ``del model`` frees the engine (its processes and memory),
and an engine that cannot start raises at once with vLLM's own reason."""

from __future__ import annotations

import asyncio
import gc
import shutil
import time

import psutil
import pytest

from tests.tiny_models import tiny_llama
from workbench import EngineStartError, VLLMSteeringConfig, VLLMSteerModel

CYCLES = 20
MEMORY_GROWTH_MB = 150
"""Allowed growth of this process's memory between the third and the last cycle."""


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def engine_processes(known: set[int]) -> list[psutil.Process]:
    """Live vLLM processes below this one that were not there before (``known``)."""
    alive = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.pid not in known and process.status() != psutil.STATUS_ZOMBIE and "VLLM" in process.name():
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


async def wait_for_exit(known: set[int], timeout_s: float = 60.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := engine_processes(known)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return left


@pytest.mark.slow
async def test_create_generate_del_cycles_leave_no_engine_and_flat_memory(tiny_path):
    known = {process.pid for process in psutil.Process().children(recursive=True)}  # e.g. the shared engine
    memory_mb = []
    for cycle in range(CYCLES):
        model = VLLMSteerModel(VLLMSteeringConfig(model_name=tiny_path, max_model_len=256, max_steering_slots=2))
        try:
            texts = await model.generate("Hello", max_tokens=4, temperature=0.0)
            assert len(texts) == 1
        finally:
            del model
        gc.collect()
        left = await wait_for_exit(known)
        assert left == [], f"cycle {cycle}: engine processes still running after del: {[p.name() for p in left]}"
        memory_mb.append(psutil.Process().memory_info().rss >> 20)
    assert memory_mb[-1] - memory_mb[2] < MEMORY_GROWTH_MB, memory_mb


@pytest.mark.slow
async def test_an_engine_that_cannot_start_raises_with_vllms_reason(tiny_path, tmp_path):
    """A checkpoint whose weights file is cut short fails inside the engine's
    worker process, where the client only sees the process die."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    known = {process.pid for process in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    with pytest.raises(EngineStartError, match=r"failed to start: [\w.]*SafetensorError: "):
        VLLMSteerModel(VLLMSteeringConfig(model_name=str(broken), max_model_len=256))
    assert time.monotonic() - started < 120  # promptly: no hang once the engine has given up
    assert await wait_for_exit(known) == []
