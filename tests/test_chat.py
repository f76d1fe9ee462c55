"""The chat API on the real engine: formatting, boundaries, prefill, batches, steering."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from tests.helpers import assert_rows_match
from workbench import (
    AblationSpec,
    AddSpec,
    CaptureError,
    CaptureIndexError,
    ChatError,
    ChatResponse,
    LayerSteeringSpec,
    SpecError,
    SteeringSpec,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
HISTORY = [
    {"role": "system", "content": "You are a math tutor."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 equals 4."},
    {"role": "user", "content": "What is 10*10?"},
]


async def test_boundaries_cover_prompt_and_match_tokenizer(model):
    responses, handles = await model.chat(HISTORY, sampling_params=GREEDY, capture_layers=[4])
    await model.fetch_captures_batch(handles)
    handle = handles[0]
    boundaries = handle.message_boundaries
    assert [b.role for b in boundaries] == [m["role"] for m in HISTORY]
    assert boundaries[0].start == 0 and boundaries[-1].end == len(handle.prompt_token_ids)
    for before, after in zip(boundaries, boundaries[1:]):
        assert before.end == after.start  # no gaps, no overlaps
    tokenizer = model.tokenizer
    for boundary in boundaries:
        text = tokenizer.decode(list(handle.prompt_token_ids[boundary.start : boundary.end]))
        assert boundary.content in text
        assert boundary.num_tokens == boundary.end - boundary.start
    # The prompt is exactly what the template renders, tokenized once.
    rendered = tokenizer.apply_chat_template(HISTORY, tokenize=False, add_generation_prompt=True)
    assert list(handle.prompt_token_ids) == tokenizer(rendered, add_special_tokens=False).input_ids
    assert isinstance(responses[0], ChatResponse)


async def test_message_slices_are_rows_of_the_full_capture(model):
    _, handles = await model.chat(HISTORY, sampling_params=GREEDY, capture_layers=[3, 9])
    await model.fetch_captures_batch(handles)
    handle = handles[0]
    full = handle.captures[9][0]["hidden"]
    pieces = [handle.get_message_activations(i, 9) for i in range(len(HISTORY))]
    assert torch.equal(torch.cat(pieces), full[: len(handle.prompt_token_ids)])
    with_generated = handle.get_message_activations(3, 9, include_generated=True)
    assert torch.equal(with_generated, full[handle.message_boundaries[3].start :])
    assert with_generated.shape[0] == pieces[3].shape[0] + len(handle.generated_token_ids) - 1
    with pytest.raises(CaptureIndexError, match="message_idx 4 is out of range for 4 messages"):
        handle.get_message_activations(4, 9)
    with pytest.raises(CaptureIndexError, match=r"layer_idx 5 is not in captured layers"):
        handle.get_message_activations(0, 5)
    with pytest.raises(CaptureError, match="only applies to the last message"):
        handle.get_message_activations(1, 9, include_generated=True)


async def test_multi_turn_history_round_trips_with_to_message(model):
    conversation = [{"role": "user", "content": "Name a colour."}]
    first = (await model.chat(conversation, sampling_params=GREEDY))[0]
    conversation.append(first.to_message())
    assert conversation[-1] == {"role": "assistant", "content": str(first)}
    conversation.append({"role": "user", "content": "Name another one."})
    second = (await model.chat(conversation, sampling_params=GREEDY))[0]
    assert second and str(second) == second.generated
    # The second prompt contains the first reply verbatim.
    raw = await model.chat(conversation, sampling_params=GREEDY, raw_output=True)
    assert first.generated.strip() in model.tokenizer.decode(raw[0].prompt_token_ids)


async def test_prefill_continues_the_given_text(model):
    prefill = '{"colour": "'
    messages = [
        {"role": "user", "content": "Give a colour as JSON."},
        {"role": "assistant", "content": prefill},
    ]
    responses = await model.chat(
        messages,
        sampling_params=GREEDY,
        chat_options={"add_generation_prompt": False, "continue_final_message": True},
    )
    response = responses[0]
    assert response.has_prefill and response.prefill == prefill
    assert response.full_text().startswith(prefill)
    assert response.full_text() == prefill + response.generated
    assert response.to_message() == {"role": "assistant", "content": response.full_text()}


async def test_batched_chat_captures_are_isolated(model, hf):
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Explain quantum computing."}],
        [{"role": "user", "content": "Write a haiku about programming."}],
    ]
    responses, handles = await model.chat(conversations, sampling_params=GREEDY, capture_layers=[6])
    await model.fetch_captures_batch(handles)
    assert len(responses) == len(handles) == 3
    from workbench.hf_reference import generate_reference

    for handle in handles:
        reference = generate_reference(hf[0], handle.prompt_token_ids, 16, None, [6])
        assert list(handle.generated_token_ids) == reference.token_ids
        assert_rows_match(handle.captures[6][0]["hidden"], reference.captures[6])


async def test_chat_under_steering_and_clear_restores(model):
    messages = [{"role": "user", "content": "Write a formal email."}]
    baseline = await model.chat(messages, sampling_params=GREEDY)
    await model.set_layer_vector(4, torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(5)) * 10)
    steered = await model.chat(messages, sampling_params=GREEDY)
    await model.clear_all_vectors()
    restored = await model.chat(messages, sampling_params=GREEDY)
    assert steered != baseline
    assert restored == baseline
    spec = SteeringSpec({4: LayerSteeringSpec(add=AddSpec(torch.ones(model.hidden_size), scale=12.0))})
    mixed = await model.chat([messages, messages], sampling_params=GREEDY, steering_spec=[None, spec])
    assert mixed[0] == baseline[0] and mixed[1] != baseline[0]


async def test_sampling_keyword_arguments(model):
    responses = await model.chat([{"role": "user", "content": "Hi"}], temperature=0.0, max_tokens=5)
    raw = await model.chat([{"role": "user", "content": "Hi"}], temperature=0.0, max_tokens=5, raw_output=True)
    assert len(raw[0].outputs[0].token_ids) <= 5
    assert responses[0] == raw[0].outputs[0].text
    with pytest.raises(TypeError, match="not both"):
        await model.chat([{"role": "user", "content": "Hi"}], sampling_params=GREEDY, max_tokens=5)


@pytest.mark.parametrize(
    ("messages", "options", "message"),
    [
        ([], None, "non-empty list"),
        ([[]], None, "conversation 0 is empty"),
        ([{"role": "wizard", "content": "hi"}], None, "unknown role 'wizard'"),
        ([{"role": "user"}], None, "needs a string 'content'"),
        ([{"role": "user", "content": "hi"}], {"continue_final_message": True}, "got role 'user'"),
        (
            [{"role": "user", "content": "hi"}],
            {"continue_final_message": True, "add_generation_prompt": True},
            "cannot both be True",
        ),
    ],
)
async def test_bad_conversations_raise_chat_errors(model, messages, options, message):
    with pytest.raises(ChatError, match=message):
        await model.chat(messages, sampling_params=GREEDY, chat_options=options)


CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Name another one."},
]


async def test_role_and_message_targeting_matches_hf(model, hf):
    """Ops that target a role or a message act on exactly those rows (the
    assistant's include what it generates), as the Hugging Face reference
    with the same message boundaries does."""
    from workbench.hf_reference import generate_reference

    generator = torch.Generator().manual_seed(21)
    vector = torch.randn(576, generator=generator)
    spec = SteeringSpec(
        {
            3: LayerSteeringSpec(add=AddSpec(vector, scale=6.0, positions="user")),
            6: LayerSteeringSpec(ablation=AblationSpec(torch.randn(576, generator=generator), scale=0.0, positions=2)),
            9: LayerSteeringSpec(add=AddSpec(vector, scale=3.0, positions="assistant")),
        }
    )
    layers = [3, 6, 9, 20]
    (_, baseline), (_, steered) = [
        await model.chat(CONVERSATION, sampling_params=GREEDY, capture_layers=layers, steering_spec=s)
        for s in (SteeringSpec(), spec)
    ]
    await model.fetch_captures_batch([*baseline, *steered])
    handle = steered[0]
    reference = generate_reference(hf[0], handle.prompt_token_ids, 16, spec, layers, handle.message_boundaries)
    assert list(handle.generated_token_ids) == reference.token_ids
    assert list(handle.generated_token_ids) != list(baseline[0].generated_token_ids)
    for layer in layers:
        assert_rows_match(handle.hidden(layer), reference.captures[layer])
    # At layer 3 only the user messages' rows moved, each by exactly the added vector.
    moved = handle.hidden(3)[: len(handle.prompt_token_ids)] - baseline[0].hidden(3)[: len(handle.prompt_token_ids)]
    for index, boundary in enumerate(handle.message_boundaries):
        rows = moved[boundary.start : boundary.end]
        if boundary.role == "user":
            assert torch.allclose(rows, (vector * 6.0).expand_as(rows), atol=1e-4), index
        else:
            assert torch.equal(rows, torch.zeros_like(rows)), index


async def test_role_targeting_needs_a_chat(model):
    spec = SteeringSpec({3: LayerSteeringSpec(add=AddSpec(torch.ones(576), positions="user"))})
    with pytest.raises(SpecError, match="chat roles or messages"):
        await model.generate("Hello", GREEDY, steering_spec=spec)
