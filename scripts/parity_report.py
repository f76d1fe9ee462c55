"""Print how closely the vLLM runtime matches the Hugging Face reference
(float32, embedded model): per case, greedy-token agreement, the minimum
per-token cosine and the max abs error relative to the largest value.

    python scripts/parity_report.py
"""

from __future__ import annotations

import asyncio
import os

import torch
from vllm import SamplingParams

from workbench import (
    AblationSpec,
    AddSpec,
    LayerSteeringSpec,
    ProjectionCapSpec,
    SteeringSpec,
    VLLMSteeringConfig,
    VLLMSteerModel,
)
from workbench.hf_reference import forward_reference, generate_reference, load_reference_model

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):"]
LAYERS = [0, 3, 5, 8, 15, 29]


def unit_mean(hf_model, ids, layer):
    rows = forward_reference(hf_model, ids, None, [layer])[layer].mean(0)
    return rows / rows.norm()


async def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    model = VLLMSteerModel(VLLMSteeringConfig(dtype="float32", max_model_len=1024))
    hf_model, _ = load_reference_model()
    params = SamplingParams(temperature=0.0, max_tokens=24)
    g = torch.Generator().manual_seed(0)
    print("| case | prompt | tokens equal | min cosine | max rel. error |\n| --- | --- | --- | ---: | ---: |")
    for prompt in PROMPTS:
        ids = model.tokenizer(prompt).input_ids
        cases = {
            "unsteered": SteeringSpec(),
            "add (layer 3)": SteeringSpec({3: LayerSteeringSpec(add=AddSpec(torch.randn(576, generator=g), 6.0))}),
            "cap (layer 5)": SteeringSpec(
                {5: LayerSteeringSpec(projection_cap=ProjectionCapSpec(unit_mean(hf_model, ids, 5), min=-2, max=2))}
            ),
            "ablate (layer 8)": SteeringSpec(
                {8: LayerSteeringSpec(ablation=AblationSpec(unit_mean(hf_model, ids, 8)))}
            ),
        }
        for name, spec in cases.items():
            _, handles = await model.generate(prompt, params, capture_layers=LAYERS, steering_spec=spec)
            await model.fetch_captures_batch(handles)
            ref = generate_reference(hf_model, handles[0].prompt_token_ids, 24, spec, LAYERS)
            cosines, errors = [], []
            for layer in LAYERS:
                ours, theirs = handles[0].hidden(layer).double(), ref.captures[layer].double()
                cosines.append(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min().item())
                errors.append(((ours - theirs).abs().max() / theirs.abs().max()).item())
            same = list(handles[0].generated_token_ids) == ref.token_ids
            print(f"| {name} | {prompt[:24]!r} | {same} | {min(cosines):.7f} | {max(errors):.1e} |")
    model.close()


if __name__ == "__main__":
    asyncio.run(main())
