"""The logit lens: captured rows read out through the model's final norm and
unembedding in the workers give Hugging Face's next-token distribution."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from workbench import HiddenSizeError, SpecError


async def test_logit_lens_matches_hf_norm_and_unembedding(model, hf):
    hf_model, _ = hf
    _, handles = await model.generate(
        "The capital of France is", SamplingParams(temperature=0.0, max_tokens=4), capture_layers=[5, 15, 29]
    )
    await model.fetch_captures_batch(handles)
    handle = handles[0]
    last_prompt = len(handle.prompt_token_ids) - 1
    rows = torch.stack([handle.hidden(layer)[last_prompt] for layer in (5, 15, 29)])
    lens = await model.logit_lens(rows, top_k=5)
    with torch.no_grad():
        probs = torch.softmax(hf_model.lm_head(hf_model.model.norm(rows)).float(), dim=-1)
    top, ids = probs.topk(5, dim=-1)
    assert [[token for token, _, _ in row] for row in lens] == ids.tolist()
    assert torch.allclose(torch.tensor([[p for _, _, p in row] for row in lens]), top, atol=1e-5)
    assert lens[2][0][0] == handle.generated_token_ids[0]  # the last layer's lens is the model's own pick
    assert lens[2][0][1] == model.tokenizer.decode([handle.generated_token_ids[0]])


async def test_logit_lens_rejects_bad_rows(model):
    with pytest.raises(HiddenSizeError, match="rows of size 576"):
        await model.logit_lens(torch.zeros(2, 7))
    with pytest.raises(SpecError, match="finite"):
        await model.logit_lens(torch.full((576,), float("nan")))
    with pytest.raises(SpecError, match="top_k"):
        await model.logit_lens(torch.zeros(576), top_k=0)
