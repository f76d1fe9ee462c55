"""Shared fixtures: one real vLLM engine (eager, float32) on the embedded model,
the Hugging Face reference model, and a steering server (``workbench serve``,
a subprocess with its own engine), each started once per test session when a
test asks for it."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# vLLM's CPU backend binds each tensor-parallel worker to a NUMA node of its own;
# this one-node machine splits its cores between them instead.
os.environ.setdefault("VLLM_CPU_SIM_MULTI_NUMA", "1")

ENGINE_SETTINGS = {
    "dtype": "float32",
    "max_model_len": 1024,
    "max_steering_slots": 16,
    # Small steps so long prompts are prefilled in several chunks (tests chunked prefill).
    "engine_kwargs": {"max_num_batched_tokens": 64, "max_num_seqs": 16, "enable_prefix_caching": True},
}

LONG_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a wooden screw press into a system that could "
    "produce books far faster than scribes. Within fifty years printers worked in more than two "
    "hundred European cities, and the price of books fell sharply. Scholars argue about how much "
    "this changed science, religion and politics, but few doubt that it mattered. Summarise the "
    "argument in one sentence:"
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Once a failure is reported, let go of its frames: a failing test's
    traceback keeps its locals, and so any engine it started (2-3 GiB each),
    alive until the session ends."""
    yield
    if call.excinfo is not None:
        traceback.clear_frames(call.excinfo.tb)


@pytest.fixture(scope="session")
async def model():
    from workbench import VLLMSteeringConfig, VLLMSteerModel

    engine = VLLMSteerModel(VLLMSteeringConfig(**ENGINE_SETTINGS))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def hf():
    """(model, tokenizer) of the Hugging Face reference, float32."""
    from workbench.hf_reference import load_reference_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return load_reference_model(dtype=torch.float32)


MODEL = "smollm2-135m-instruct"
"""The embedded model's served name."""
CAPTURE_TTL_S = 8
"""The test server's capture expiry: short, so a test can watch a capture expire."""


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``workbench serve`` on 127.0.0.1 (float32, eager on CPU), with a steering folder holding one library vector."""
    from tests.helpers import vector
    from workbench.serve.launch import ServerProcess
    from workbench.vector_library import VectorLibrary

    folder = tmp_path_factory.mktemp("steering")
    VectorLibrary(folder).save("joy-l6", vector(60), layer=6)
    args = [
        "--dtype", "float32",
        "--max-model-len", "1024",
        "--max-steering-slots", "16",
        "--steering-dir", str(folder),
        "--capture-ttl", str(CAPTURE_TTL_S),
        "--seed", "0",
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": str(Path(__file__).parent.parent)}
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with ServerProcess.workbench(args, env=env, log_path=log, start_timeout_s=420) as process:
        process.folder = folder
        yield process


@pytest.fixture(scope="session")
def greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=16)
