"""The vLLM runtime against the Hugging Face reference on the embedded model
(float32): same captures and same greedy tokens, unsteered and under each op."""

from __future__ import annotations

import asyncio

import pytest
import torch
from vllm import SamplingParams

from tests.conftest import LONG_PROMPT
from tests.helpers import assert_rows_match, mean_direction
from workbench import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
from workbench.hf_reference import generate_reference

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):", LONG_PROMPT]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


async def run_and_reference(model, hf, prompt, spec, layers, params=GREEDY):
    _, handles = await model.generate(prompt, params, capture_layers=layers, steering_spec=spec)
    await model.fetch_captures_batch(handles)
    handle = handles[0]
    reference = generate_reference(hf[0], handle.prompt_token_ids, params.max_tokens, spec, layers)
    return handle, reference


def build_spec(kind: str, hf, token_ids: list[int]) -> SteeringSpec:
    generator = torch.Generator().manual_seed(1234)
    random = lambda: torch.randn(576, generator=generator)  # noqa: E731
    if kind == "add":
        return SteeringSpec({3: LayerSteeringSpec(add=AddSpec(random(), scale=6.0))})
    if kind == "projection_cap":
        direction = mean_direction(hf[0], token_ids, 5)
        return SteeringSpec({5: LayerSteeringSpec(projection_cap=ProjectionCapSpec(direction, min=-2.0, max=2.0))})
    if kind == "ablation":
        direction = mean_direction(hf[0], token_ids, 8)
        return SteeringSpec({8: LayerSteeringSpec(ablation=AblationSpec(direction, scale=0.0))})
    assert kind == "all"
    layers = {}
    for layer in (2, 6, 10):
        layers[layer] = LayerSteeringSpec(
            add=AddSpec(random(), scale=3.0),
            projection_cap=ProjectionCapSpec(mean_direction(hf[0], token_ids, layer), min=-20.0, max=5.0),
            ablation=AblationSpec(random(), scale=0.5),
        )
    return SteeringSpec(layers)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["france", "poem", "code", "long"])
async def test_unsteered_captures_and_tokens_match_hf(model, hf, prompt):
    layers = [0, 7, 15, 29]
    handle, reference = await run_and_reference(model, hf, prompt, SteeringSpec(), layers)
    assert list(handle.generated_token_ids) == reference.token_ids
    for layer in layers:
        hidden = handle.captures[layer][0]["hidden"]
        assert hidden.shape == (len(handle.prompt_token_ids) + len(handle.generated_token_ids) - 1, 576)
        assert_rows_match(hidden, reference.captures[layer])


@pytest.mark.parametrize("kind", ["add", "projection_cap", "ablation", "all"])
async def test_each_op_matches_hf(model, hf, kind):
    prompt = "Write a short poem about the sea."
    token_ids = model.tokenizer(prompt).input_ids
    spec = build_spec(kind, hf, token_ids)
    layers = sorted({*spec.layers, 12, 29})
    baseline = await model.generate(prompt, GREEDY, steering_spec=SteeringSpec())
    handle, reference = await run_and_reference(model, hf, prompt, spec, layers)
    steered_text = model.tokenizer.decode(handle.generated_token_ids)
    assert steered_text != baseline[0], "the op had no effect on the output"
    assert len(reference.token_ids) >= 16
    assert list(handle.generated_token_ids) == reference.token_ids
    for layer in layers:
        assert_rows_match(handle.captures[layer][0]["hidden"], reference.captures[layer])


async def test_clearing_restores_baseline_exactly(model):
    prompt = "The capital of France is"
    baseline = await model.generate(prompt, GREEDY)
    await model.set_layer_vector(4, torch.randn(model.hidden_size) * 10)
    await model.set_layer_ablation(6, torch.randn(model.hidden_size), scale=0.0)
    await model.set_layer_projection_cap(8, torch.randn(model.hidden_size), min=-1.0, max=1.0)
    steered = await model.generate(prompt, GREEDY)
    await model.clear_all_vectors()
    restored = await model.generate(prompt, GREEDY)
    assert steered != baseline
    assert restored == baseline


async def test_concurrent_requests_each_equal_their_solo_run(model):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    generator = torch.Generator().manual_seed(7)
    specs = [
        SteeringSpec()
        if i % 4 == 0
        else SteeringSpec(
            {(i * 3) % 30: LayerSteeringSpec(add=AddSpec(torch.randn(576, generator=generator), scale=4.0))}
        )
        for i in range(8)
    ]
    capture_sets = [[0], [1, 29], [5], [0, 14], [3], [20, 21], [9], [2, 28]]
    solo = []
    for prompt, spec, layers in zip(prompts, specs, capture_sets):
        texts, handles = await model.generate(prompt, GREEDY, capture_layers=layers, steering_spec=spec)
        await model.fetch_captures_batch(handles)
        solo.append((texts[0], handles[0]))
    together = await asyncio.gather(
        *(
            model.generate(prompt, GREEDY, capture_layers=layers, steering_spec=spec)
            for prompt, spec, layers in zip(prompts, specs, capture_sets)
        )
    )
    handles = [result[1][0] for result in together]
    await model.fetch_captures_batch(handles)
    for (solo_text, solo_handle), (texts, _), handle, layers in zip(solo, together, handles, capture_sets):
        assert texts[0] == solo_text
        assert handle.layer_indices == tuple(sorted(layers))
        for layer in layers:
            assert_rows_match(handle.captures[layer][0]["hidden"], solo_handle.captures[layer][0]["hidden"])


async def test_per_request_specs_in_one_batch(model):
    prompt = "Write a short poem about the sea."
    spec_a = SteeringSpec({4: LayerSteeringSpec(add=AddSpec(torch.randn(576), scale=8.0))})
    spec_b = SteeringSpec({10: LayerSteeringSpec(add=AddSpec(torch.randn(576), scale=8.0))})
    batch = await model.generate([prompt] * 3, GREEDY, steering_spec=[SteeringSpec(), spec_a, spec_b])
    solo = [(await model.generate(prompt, GREEDY, steering_spec=spec))[0] for spec in (SteeringSpec(), spec_a, spec_b)]
    assert batch == solo
    assert len(set(batch)) == 3


async def test_new_specs_of_one_batch_load_in_one_worker_call(model, monkeypatch):
    prompt = "Write a short poem about the sea."
    generator = torch.Generator().manual_seed(5)
    specs = [
        SteeringSpec({layer: LayerSteeringSpec(add=AddSpec(torch.randn(576, generator=generator), scale=8.0))})
        for layer in (2, 6, 11, 17, 23)
    ]
    calls = []
    rpc = model._link.rpc

    async def counting_rpc(method, *args):
        calls.append(method)
        return await rpc(method, *args)

    monkeypatch.setattr(model._link, "rpc", counting_rpc)
    batch = await model.generate([prompt] * len(specs), GREEDY, steering_spec=specs)
    assert calls.count("workbench_load_slots") == 1
    monkeypatch.undo()
    assert batch == [(await model.generate(prompt, GREEDY, steering_spec=spec))[0] for spec in specs]


async def test_prefix_cache_never_serves_other_steering(model, hf):
    # The long prompt spans several KV blocks; run it unsteered first so they are cached.
    await model.generate(LONG_PROMPT, GREEDY, steering_spec=SteeringSpec())
    spec = SteeringSpec({0: LayerSteeringSpec(add=AddSpec(torch.randn(576), scale=2.0))})
    handle, reference = await run_and_reference(model, hf, LONG_PROMPT, spec, [0, 20])
    assert list(handle.generated_token_ids) == reference.token_ids
    assert_rows_match(handle.captures[20][0]["hidden"], reference.captures[20])
    # A capture of a cached prompt still holds every prompt row.
    handle, reference = await run_and_reference(model, hf, LONG_PROMPT, SteeringSpec(), [20])
    assert_rows_match(handle.captures[20][0]["hidden"], reference.captures[20])


@pytest.mark.parametrize("positions", ["prompt", "generated"])
async def test_position_targeting_matches_hf(model, hf, positions):
    prompt = "Once upon a time, in a small village,"
    token_ids = model.tokenizer(prompt).input_ids
    generator = torch.Generator().manual_seed(11)
    spec = SteeringSpec(
        {
            3: LayerSteeringSpec(add=AddSpec(torch.randn(576, generator=generator), scale=6.0, positions=positions)),
            8: LayerSteeringSpec(
                ablation=AblationSpec(mean_direction(hf[0], token_ids, 8), scale=0.0, positions=positions)
            ),
        }
    )
    baseline, _ = await run_and_reference(model, hf, prompt, SteeringSpec(), [3])
    handle, reference = await run_and_reference(model, hf, prompt, spec, [3, 8, 20])
    assert list(handle.generated_token_ids) == reference.token_ids
    assert list(handle.generated_token_ids) != list(baseline.generated_token_ids)
    for layer in (3, 8, 20):
        assert_rows_match(handle.captures[layer][0]["hidden"], reference.captures[layer])
    prompt_rows = len(token_ids)
    steered_prompt = handle.captures[3][0]["hidden"][:prompt_rows]
    baseline_prompt = baseline.captures[3][0]["hidden"][:prompt_rows]
    if positions == "generated":  # prompt rows untouched, bit for bit
        assert torch.equal(steered_prompt, baseline_prompt)
    else:  # prompt rows moved by exactly the added vector
        added = spec.layers[3].add.effect.expand(prompt_rows, -1)
        assert torch.allclose(steered_prompt - baseline_prompt, added, atol=1e-4)
