"""Shared fixtures: one real vLLM engine (eager, float32) on the embedded model
and the Hugging Face reference model, each started once per test session."""

from __future__ import annotations

import os
import traceback

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

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


@pytest.fixture(scope="session")
def greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=16)
