"""Real model shapes under CUDA graphs on a GPU (dummy bf16 weights, token-id
prompts): steering changes the output, clearing restores it exactly, a batch
of per-request specs equals each request's solo run, and captures have the
right shape, on vLLM's default model runner and, for some, on V1 too.

Run on a CUDA host: ``bash bench/run_device.sh tests``. The shapes are the
public configs in ``bench/models/``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from vllm import SamplingParams  # noqa: E402

from workbench import AddSpec, LayerSteeringSpec, SteeringSpec, VLLMSteeringConfig, VLLMSteerModel  # noqa: E402

pytestmark = pytest.mark.gpu

MODELS = Path(__file__).parent.parent / "bench" / "models"
SHAPES = sorted(path.name for path in MODELS.iterdir() if (path / "config.json").exists())
V1_TOO = ("llama3-8b-shape", "gemma2-9b-shape", "gpt2-medium-shape")
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = [[(7 * i + 13 * j) % 30000 + 100 for j in range(9 + 4 * i)] for i in range(4)]


def add_spec(model: VLLMSteerModel, layer: int, seed: int) -> SteeringSpec:
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(seed))
    # Large enough to move greedy tokens of random-weight models, far from overflow.
    return SteeringSpec({layer: LayerSteeringSpec(add=AddSpec(vector, scale=4.0))})


async def token_ids(model, prompts, steering_spec=None):
    outputs = await model.generate(prompts, GREEDY, steering_spec=steering_spec, raw_output=True)
    return [list(output.outputs[0].token_ids) for output in outputs]


@pytest.mark.parametrize(
    "shape, runner",
    [(shape, "auto") for shape in SHAPES] + [(shape, "v1") for shape in V1_TOO],
)
async def test_shape_steers_restores_batches_and_captures(shape, runner):
    cfg = VLLMSteeringConfig(
        model_name=str(MODELS / shape),
        dtype="bfloat16",
        max_model_len=256,
        load_format="dummy",
        gpu_memory_utilization=0.85,
        max_steering_slots=4,
        model_runner=runner,
        # A few CUDA-graph sizes are enough for these batches, and capture them in seconds.
        engine_kwargs={
            "skip_tokenizer_init": True,
            "max_num_seqs": 8,
            "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8]},
        },
    )
    model = VLLMSteerModel(cfg)
    try:
        middle, late = model.layer_count // 2, model.layer_count - 2
        baseline = await token_ids(model, PROMPTS)
        await model.apply_steering_spec(add_spec(model, middle, 1))
        steered = await token_ids(model, PROMPTS)
        await model.clear_all_vectors()
        assert steered != baseline
        assert await token_ids(model, PROMPTS) == baseline

        specs = [SteeringSpec(), add_spec(model, middle, 2), add_spec(model, late, 3), SteeringSpec()]
        together = await token_ids(model, PROMPTS, specs)
        solo = [(await token_ids(model, [prompt], spec))[0] for prompt, spec in zip(PROMPTS, specs)]
        assert together == solo

        _, handles = await model.generate(PROMPTS[:2], GREEDY, capture_layers=[0, middle, late])
        await model.fetch_captures_batch(handles)
        for handle, prompt in zip(handles, PROMPTS):
            for layer in (0, middle, late):
                rows = handle.hidden(layer)
                assert rows.shape == (len(prompt) + GREEDY.max_tokens - 1, model.hidden_size)
                assert rows.isfinite().all() and rows[-1].abs().sum() > 0
    finally:
        model.close()
