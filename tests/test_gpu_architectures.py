"""Real model shapes under CUDA graphs on a GPU (dummy bf16 weights, token-id
prompts), on both of vLLM's model runners: steering changes a later layer's
rows, clearing restores a request's tokens and rows exactly, each request of a batch of
per-request specs matches its row of the same prompts run under its spec
alone, and captures have the right shape.

Run on a CUDA host: ``bash bench/run_device.sh shapes`` (several shapes at once
on one GPU). The shapes are the public configs in ``bench/models/``.
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
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = [[(7 * i + 13 * j) % 30000 + 100 for j in range(9 + 4 * i)] for i in range(4)]


def add_spec(model: VLLMSteerModel, layer: int, seed: int) -> SteeringSpec:
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(seed))
    # Large enough to move greedy tokens of random-weight models, far from overflow.
    return SteeringSpec({layer: LayerSteeringSpec(add=AddSpec(vector, scale=4.0))})


async def run(model, prompts, steering_spec=None, layer=None):
    """Greedy token ids of each prompt and, with ``layer``, that layer's captured rows."""
    if layer is None:
        outputs = await model.generate(prompts, GREEDY, steering_spec=steering_spec, raw_output=True)
        return [list(output.outputs[0].token_ids) for output in outputs], None
    outputs, handles = await model.generate(
        prompts, GREEDY, steering_spec=steering_spec, capture_layers=[layer], raw_output=True
    )
    await model.fetch_captures_batch(handles)
    return [list(output.outputs[0].token_ids) for output in outputs], [h.hidden(layer) for h in handles]


def row_cosines(rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-row cosine. Rows of the same prompts batched with other requests match up to
    bfloat16 rounding (other kernel shapes round differently; dummy weights leave greedy
    tokens at near-ties, so tokens can flip, rows cannot move far)."""
    return torch.nn.functional.cosine_similarity(rows.float(), other.float(), dim=-1)


# Named, not "auto": vLLM picks V1 for MoE models by default (0.26), so "auto" would run
# Qwen3-30B-A3B on V1 twice.
@pytest.mark.parametrize("runner", ["v2", "v1"])
@pytest.mark.parametrize("shape", SHAPES)
async def test_shape_steers_restores_batches_and_captures(shape, runner):
    cfg = VLLMSteeringConfig(
        model_name=str(MODELS / shape),
        dtype="bfloat16",
        max_model_len=256,
        load_format="dummy",
        # Several shapes share the GPU (run_device.sh shapes): each engine takes
        # its weights and a fixed 1 GiB of KV cache instead of a share of the card.
        gpu_memory_utilization=0.05,
        max_steering_slots=4,
        model_runner=runner,
        # A few CUDA-graph sizes are enough for these batches, and capture them in seconds.
        engine_kwargs={
            "skip_tokenizer_init": True,
            "max_num_seqs": 8,
            "max_num_batched_tokens": 256,
            "kv_cache_memory_bytes": 1 << 30,
            "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8]},
        },
    )
    model = VLLMSteerModel(cfg)
    try:
        middle, late = model.layer_count // 2, model.layer_count - 2
        # Rows of a later layer show the change even where random weights make greedy tokens degenerate (GPT-2).
        baseline, baseline_rows = await run(model, PROMPTS, layer=late)
        solo, solo_rows = await run(model, PROMPTS[-1:], layer=late)
        await model.apply_steering_spec(add_spec(model, middle, 1))
        _, steered_rows = await run(model, PROMPTS, layer=late)
        await model.clear_all_vectors()
        assert all(not torch.equal(s, b) for s, b in zip(steered_rows, baseline_rows))
        # A request alone runs in the same steps every time: clearing restores it bit for bit.
        # Several requests may be split over steps differently from run to run (the engine
        # takes those that have arrived), and bfloat16 rounds other batch shapes differently.
        solo_cleared, solo_cleared_rows = await run(model, PROMPTS[-1:], layer=late)
        assert solo_cleared == solo
        difference = (solo_cleared_rows[0].float() - solo_rows[0].float()).abs().max().item()
        assert torch.equal(solo_cleared_rows[0], solo_rows[0]), f"largest difference {difference:.3g}"
        _, cleared_rows = await run(model, PROMPTS, layer=late)
        for i, (cleared, before) in enumerate(zip(cleared_rows, baseline_rows)):
            prompt = len(PROMPTS[i])
            matching = row_cosines(cleared[:prompt], before[:prompt]).min()
            assert matching >= 0.999, f"request {i}: cosine {matching:.6f} to its rows before steering"

        # Each request of a mixed batch gets its own spec and no other: its prompt's rows match
        # those of the same prompts run under its spec alone, and steered ones are far from unsteered.
        specs = [SteeringSpec(), add_spec(model, middle, 2), add_spec(model, late, 3), SteeringSpec()]
        _, together = await run(model, PROMPTS, specs, layer=late)
        for i, spec in enumerate(specs):
            _, alone = await run(model, PROMPTS, [spec] * len(PROMPTS), layer=late)
            prompt = len(PROMPTS[i])
            matching = row_cosines(together[i][:prompt], alone[i][:prompt]).min()
            assert matching >= 0.999, f"request {i}: cosine {matching:.6f}"
            if not spec.is_empty():
                unsteered = row_cosines(together[i][:prompt], baseline_rows[i][:prompt]).max()
                assert unsteered < 0.99, f"request {i} is steered, yet its rows match the baseline"

        _, handles = await model.generate(PROMPTS[:2], GREEDY, capture_layers=[0, middle, late])
        await model.fetch_captures_batch(handles)
        for handle, prompt in zip(handles, PROMPTS):
            for layer in (0, middle, late):
                rows = handle.hidden(layer)
                assert rows.shape == (len(prompt) + GREEDY.max_tokens - 1, model.hidden_size)
                assert rows.isfinite().all() and rows[-1].abs().sum() > 0
    finally:
        model.close()
