"""Research workflows: contrast vectors, the vector library, sweeps, tidy tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from vllm import SamplingParams

from workbench import LayerSteeringSpec, SpecError, SteeringSpec
from workbench.contrast import difference_of_means, extract_contrast_vectors, first_principal_component
from workbench.tables import capture_frame, captures_frame
from workbench.vector_library import VectorLibrary

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)

POSITIVE = [
    "I love this day, everything is wonderful and bright.",
    "What a joyful surprise, I am so happy and grateful!",
    "The party was fantastic and everyone was smiling.",
    "This is the best news I have heard all year, hooray!",
    "We laughed and danced together, it was delightful.",
    "My heart is full of joy and excitement today.",
]
NEGATIVE = [
    "I hate this day, everything is terrible and dark.",
    "What an awful shock, I am so sad and hopeless.",
    "The funeral was grim and everyone was crying.",
    "This is the worst news I have heard all year, sadly.",
    "We argued and cried alone, it was miserable.",
    "My heart is full of grief and dread today.",
]
HELD_OUT = ["Tell me about your weekend.", "Describe the weather outside.", "How was the meeting?"]


@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_methods_recover_a_planted_direction(method):
    g = torch.Generator().manual_seed(0)
    hidden, pairs = 64, 40
    planted = torch.nn.functional.normalize(torch.randn(hidden, generator=g), dim=0)
    base = torch.randn(pairs, hidden, generator=g) * 3
    strength = 2 + torch.rand(pairs, 1, generator=g)
    positive = base + strength * planted + torch.randn(pairs, hidden, generator=g) * 0.5
    negative = base - strength * planted + torch.randn(pairs, hidden, generator=g) * 0.5
    if method == "mean_diff":
        found = difference_of_means(positive, negative)
    else:
        found = first_principal_component(positive - negative)
    cosine = torch.nn.functional.cosine_similarity(found, planted, dim=0).item()
    assert cosine > 0.95
    assert 4.0 < found.norm().item() < 7.0  # about twice the mean strength


async def test_extracted_vector_moves_held_out_projections(model):
    vectors = await extract_contrast_vectors(model, POSITIVE, NEGATIVE, layers=[10, 14], method="mean_diff")
    steer, probe = vectors[10], vectors[14]
    assert steer.layer == 10 and steer.num_pairs == 6 and steer.method == "mean_diff"

    async def mean_projection(scale: float) -> float:
        spec = SteeringSpec({10: LayerSteeringSpec(add=steer.to_add_spec(scale))}) if scale else SteeringSpec()
        _, handles = await model.generate(HELD_OUT, GREEDY, capture_layers=[14], steering_spec=spec)
        await model.fetch_captures_batch(handles)
        rows = torch.cat([handle.hidden(14)[: len(handle.prompt_token_ids)] for handle in handles])
        return (rows @ probe.direction).mean().item()

    baseline, more, less = await mean_projection(0.0), await mean_projection(1.0), await mean_projection(-1.0)
    assert less < baseline < more


async def test_pca_and_conversation_examples(model):
    positive = [[{"role": "user", "content": text}] for text in POSITIVE[:4]]
    negative = [[{"role": "user", "content": text}] for text in NEGATIVE[:4]]
    vectors = await extract_contrast_vectors(model, positive, negative, layers=[6], method="pca", tokens="message_mean")
    mean_diff = await extract_contrast_vectors(model, positive, negative, layers=[6], tokens="message_mean")
    cosine = torch.nn.functional.cosine_similarity(vectors[6].vector, mean_diff[6].vector, dim=0).item()
    assert cosine > 0.8
    with pytest.raises(SpecError, match="paired"):
        await extract_contrast_vectors(model, POSITIVE, NEGATIVE[:2], layers=[6])
    with pytest.raises(SpecError, match="tokens must be one of"):
        await extract_contrast_vectors(model, POSITIVE, NEGATIVE, layers=[6], tokens="first")


def test_vector_library_round_trip(tmp_path):
    from workbench.contrast import ContrastVector

    library = VectorLibrary(tmp_path / "vectors")
    vector = ContrastVector(torch.arange(4.0), layer=3, method="pca", tokens="last_prompt", model_name="m", num_pairs=5)
    library.save("joy", vector, note="test")
    library.save("plain", torch.ones(4), layer=1)
    loaded, metadata = library.load("joy")
    assert torch.equal(loaded, torch.arange(4.0))
    assert metadata["layer"] == 3 and metadata["method"] == "pca" and metadata["model"] == "m"
    assert metadata["note"] == "test" and "created" in metadata and metadata["hidden_size"] == 4
    assert library.names() == ["joy", "plain"]
    assert json.loads((tmp_path / "vectors" / "joy.json").read_text())["name"] == "joy"
    library.delete("plain")
    assert library.names() == ["joy"]


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x.json"])
def test_vector_library_rejects_path_names(tmp_path, name):
    with pytest.raises(SpecError, match="vector name"):
        VectorLibrary(tmp_path).save(name, torch.ones(3))


def test_vector_library_reports_missing_and_corrupt_files(tmp_path):
    library = VectorLibrary(tmp_path)
    with pytest.raises(SpecError, match="no vector named 'nope'"):
        library.load("nope")
    library.save("v", torch.ones(3))
    (tmp_path / "v.safetensors").write_bytes(b"garbage")
    with pytest.raises(SpecError, match="unreadable"):
        library.load("v")


async def test_sweep_runs_every_scale_in_one_call(model):
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(2))
    scales = [-8.0, -4.0, 0.0, 4.0, 8.0]
    frame = await model.sweep("Once upon a time", 5, vector, scales, GREEDY, progress=False)
    assert list(frame["scale"]) == scales
    assert frame["text"].map(len).gt(0).all()
    assert frame["nonfinite_layer"].isna().all()  # no scale here breaks the stream
    # The add moves every prompt row along the direction by scale * |vector|.
    shift = np.diff(frame["proj_prompt_mean"].to_numpy())
    assert np.allclose(shift, 4.0 * vector.norm().item(), rtol=1e-3)
    baseline = await model.generate("Once upon a time", GREEDY, steering_spec=SteeringSpec())
    assert frame.loc[frame.scale == 0.0, "text"].item() == baseline[0]
    assert frame["text"].nunique() > 1


async def test_tidy_tables(model):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    _, handles = await model.chat(conversation, sampling_params=GREEDY, capture_layers=[2, 7])
    _, more = await model.generate("Hello there", GREEDY, capture_layers=[2, 7])
    await model.fetch_captures_batch(handles + more)
    handle = handles[0]
    direction = torch.randn(model.hidden_size)
    frame = capture_frame(handle, model.tokenizer, {"d": direction})
    rows = handle.expected_rows
    assert len(frame) == 2 * rows
    assert set(frame.columns) >= {
        "request",
        "layer",
        "position",
        "token_id",
        "token",
        "phase",
        "message",
        "role",
        "norm",
        "proj_d",
    }
    layer7 = frame[frame.layer == 7].reset_index(drop=True)
    hidden = handle.hidden(7)
    assert np.allclose(layer7["norm"], hidden.norm(dim=-1).numpy(), rtol=1e-5)
    assert np.allclose(layer7["proj_d"], (hidden @ (direction / direction.norm())).numpy(), rtol=1e-4, atol=1e-3)
    assert (layer7["phase"] == "prompt").sum() == len(handle.prompt_token_ids)
    assert list(layer7["role"].iloc[[0, -1]]) == ["system", "user"]  # generated rows belong to the last message
    assert layer7.loc[layer7.phase == "generated", "message"].eq(1).all()
    assert layer7["token"].iloc[0] == model.tokenizer.decode([handle.prompt_token_ids[0]])
    both = captures_frame([handle, more[0]], labels=["chat", "plain"])
    assert set(both["request"]) == {"chat", "plain"}
    assert both.loc[both.request == "plain", "message"].eq(-1).all()
