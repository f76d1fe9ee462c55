"""Streaming replies (``on_text``) and stopping a generation by cancelling its task."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from workbench import AddSpec, LayerSteeringSpec, SteeringSpec


async def test_on_text_streams_growing_prefixes_of_each_reply(model, greedy):
    seen: dict[int, list[str]] = {0: [], 1: []}
    texts = await model.generate(
        ["The capital of France is", "Once upon a time"],
        greedy,
        on_text=lambda index, text: seen[index].append(text),
    )
    for index, text in enumerate(texts):
        updates = seen[index]
        assert len(updates) > 1 and updates[-1] == str(text)
        assert all(later.startswith(earlier) for earlier, later in zip(updates, updates[1:]))


async def test_chat_streams_without_the_prefill(model, greedy):
    seen: list[str] = []
    conversation = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Sure:"}]
    (response,) = await model.chat(
        conversation,
        sampling_params=greedy,
        chat_options={"add_generation_prompt": False, "continue_final_message": True},
        on_text=lambda _, text: seen.append(text),
    )
    assert seen[-1] == response.generated and not seen[-1].startswith("Sure:")


async def test_cancelling_a_generation_aborts_it_and_the_engine_keeps_serving(model, greedy):
    vector = AddSpec(torch.ones(model.hidden_size), scale=0.5)
    specs = [SteeringSpec(), SteeringSpec({3: LayerSteeringSpec(add=vector)})]
    started = asyncio.Event()
    task = asyncio.ensure_future(
        model.generate(
            ["Write a very long story about a dragon."] * 2,
            max_tokens=800,
            ignore_eos=True,
            capture_layers=[2],
            steering_spec=specs,
            on_text=lambda *_: started.set(),
        )
    )
    await asyncio.wait_for(started.wait(), 60)
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The engine drops the aborted requests within a couple of steps.
    while model.engine.output_processor.get_num_unfinished_requests():
        assert time.monotonic() - began < 2.0
        await asyncio.sleep(0.02)
    assert time.monotonic() - began < 2.0
    assert str((await model.generate("The capital of France is", greedy))[0])
