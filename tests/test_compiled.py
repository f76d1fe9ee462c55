"""The compile-cache salt: a steered engine never shares vLLM's compiled graphs
with plain vLLM or with another version of the runtime. (Steering itself in
compiled mode is checked per layer convention in test_architectures.py.)"""

from __future__ import annotations

import dataclasses

from vllm import AsyncEngineArgs

from workbench import VLLMSteeringConfig
from workbench.config import engine_args


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
