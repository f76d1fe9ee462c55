"""Steering in vLLM's compiled mode (torch.compile), and the compile-cache salt."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from vllm import AsyncEngineArgs, SamplingParams

from tests.conftest import ENGINE_SETTINGS
from tests.helpers import assert_rows_match
from workbench import AddSpec, LayerSteeringSpec, SteeringSpec, VLLMSteeringConfig, VLLMSteerModel
from workbench.config import engine_args
from workbench.hf_reference import generate_reference

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
PROMPT = "The capital of France is"


def config_hash(args: AsyncEngineArgs) -> str:
    return args.create_engine_config().compute_hash()


def test_compile_cache_key_separates_steered_from_plain_engines():
    cfg = VLLMSteeringConfig(dtype="float32", max_model_len=512)
    steered = engine_args(cfg, enforce_eager=False)
    plain = AsyncEngineArgs(model=steered.model, dtype="float32", max_model_len=512, seed=0, enforce_eager=False)
    assert config_hash(steered) != config_hash(plain)
    salted = dataclasses.replace(
        steered, additional_config={"workbench": {**steered.additional_config["workbench"], "runtime": "other"}}
    )
    assert config_hash(salted) != config_hash(steered)


@pytest.fixture(scope="module")
async def compiled():
    settings = {**ENGINE_SETTINGS, "max_steering_slots": 4}
    engine = VLLMSteerModel(VLLMSteeringConfig(**settings), enforce_eager=False)
    yield engine
    engine.close()


@pytest.mark.slow
async def test_compiled_mode_steers_restores_and_captures(compiled, hf):
    assert not compiled.enforce_eager
    baseline = await compiled.generate(PROMPT, GREEDY)
    spec = SteeringSpec(
        {4: LayerSteeringSpec(add=AddSpec(torch.randn(576, generator=torch.Generator().manual_seed(3)), scale=8.0))}
    )
    async with compiled.steering(spec):
        steered = await compiled.generate(PROMPT, GREEDY)
    restored = await compiled.generate(PROMPT, GREEDY)
    assert steered != baseline
    assert restored == baseline

    # Mixed batch: unsteered and steered requests in one compiled step.
    mixed = await compiled.generate([PROMPT, PROMPT], GREEDY, steering_spec=[SteeringSpec(), spec])
    assert mixed == [baseline[0], steered[0]]

    # Position targeting runs as per-token masks inside the compiled graph.
    spec = SteeringSpec(
        {
            4: LayerSteeringSpec(add=AddSpec(spec.layers[4].add.vector, scale=8.0, positions="generated")),
            9: LayerSteeringSpec(add=AddSpec(spec.layers[4].add.vector, scale=4.0, positions="prompt")),
        }
    )
    _, handles = await compiled.generate(PROMPT, GREEDY, capture_layers=[4, 20], steering_spec=spec)
    await compiled.fetch_captures_batch(handles)
    reference = generate_reference(hf[0], handles[0].prompt_token_ids, 16, spec, [4, 20])
    assert list(handles[0].generated_token_ids) == reference.token_ids
    for layer in (4, 20):
        assert_rows_match(handles[0].captures[layer][0]["hidden"], reference.captures[layer])
