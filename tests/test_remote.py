"""``RemoteSteerModel`` on the test server (conftest's ``server``): the design
README's examples as ``VLLMSteerModel`` runs them, steering state applied per
request, chats with message boundaries, typed errors, the research helpers and
the notebook engine. References: the Hugging Face model in this process."""

from __future__ import annotations

import asyncio
import gc
import inspect

import pytest
from vllm import SamplingParams

from tests import test_design_examples as examples
from tests.helpers import assert_rows_match, vector
from workbench import (
    AddSpec,
    CaptureError,
    HandleReleasedError,
    LayerSteeringSpec,
    RemoteSteerModel,
    SpecNotFoundError,
    SteeringSpec,
)
from workbench.capture_file import CaptureFile
from workbench.chat import format_conversation
from workbench.hf_reference import generate_reference

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)

EXAMPLES = [
    examples.test_core_concepts_steering_specifications,
    examples.test_additive_steering,
    examples.test_projection_capping,
    examples.test_component_ablation,
    examples.test_capture_basic_usage_generate,
    examples.test_capture_length_and_slicing,
    examples.test_analyzing_steering_effects_generate,
    examples.test_concurrent_capture_isolation,
    examples.test_multi_layer_analysis,
    examples.test_validating_against_huggingface,
    examples.test_capture_basic_usage_chat,
    examples.test_batch_chat_with_captures,
    examples.test_splitting_activations_by_message,
    examples.test_comparing_messages_in_a_conversation,
    examples.test_analyzing_steering_effects_chat,
]


@pytest.fixture(scope="module")
async def remote(server):
    model = RemoteSteerModel(server.url)
    yield model
    await model.aclose()


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.__name__.removeprefix("test_") for e in EXAMPLES])
async def test_design_readme_examples_run_on_a_remote_model(remote, hf, example):
    arguments = {"model": remote, "hf": hf}
    await example(**{name: arguments[name] for name in inspect.signature(example).parameters})
    assert remote.export_steering_spec().is_empty()


async def test_generate_equals_the_reference_steered_and_not(remote, hf):
    spec = SteeringSpec({3: LayerSteeringSpec(add=AddSpec(vector(5), scale=6.0))})
    prompt = "The capital of France is"
    raw = await remote.generate([prompt, prompt], GREEDY, steering_spec=[SteeringSpec(), spec], raw_output=True)
    for reply, steering in zip(raw, [SteeringSpec(), spec]):
        choice = reply["choices"][0]
        reference = generate_reference(hf[0], choice["prompt_token_ids"], GREEDY.max_tokens, steering)
        assert choice["token_ids"] == reference.token_ids
    assert raw[0]["choices"][0]["token_ids"] != raw[1]["choices"][0]["token_ids"]


async def test_steering_state_applies_per_request(remote):
    prompt, spec = "Write a haiku about rain:", SteeringSpec({7: LayerSteeringSpec(add=AddSpec(vector(9), scale=5.0))})
    baseline = await remote.generate(prompt, GREEDY)
    explicit = await remote.generate(prompt, GREEDY, steering_spec=spec)
    await remote.set_layer_vector(7, vector(9), scale=5.0)
    pending = asyncio.ensure_future(remote.generate(prompt, GREEDY))
    await asyncio.sleep(0)  # the request starts, taking the state of now
    await remote.clear_all_vectors()
    assert await pending == explicit != baseline
    async with remote.steering(spec):
        assert await remote.generate(prompt, GREEDY) == explicit
    assert await remote.generate(prompt, GREEDY) == baseline


async def test_chat_boundaries_and_rows_equal_the_servers_chat_endpoint(remote, server):
    import httpx

    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    responses, handles = await remote.chat(messages, GREEDY, capture_layers=[4, 20])
    await remote.fetch_captures_batch(handles)
    handle = handles[0]
    local = format_conversation(remote.tokenizer, messages, with_boundaries=True)
    assert handle.message_boundaries == local.boundaries and list(handle.prompt_token_ids) == local.token_ids
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
        body = {"model": remote.model_id, "messages": messages, "capture_layers": [4, 20], "temperature": 0.0}
        reply = (await http.post("/v1/chat/completions", json={**body, "max_tokens": 16})).json()
        assert reply["choices"][0]["message"]["content"] == str(responses[0])
        (served,) = CaptureFile.from_bytes((await http.get(f"/v1/captures/{reply['capture_id']}")).content).handles()
    assert served.message_boundaries == handle.message_boundaries
    for layer in (4, 20):
        assert_rows_match(served.hidden(layer), handle.hidden(layer))


async def test_errors_come_back_typed(remote):
    with pytest.raises(SpecNotFoundError, match="no-such-spec"):
        await remote.get_spec("no-such-spec")
    _, handles = await remote.generate("Hi", max_tokens=3, temperature=0.0, capture_layers=[2])
    await remote.fetch_captures_batch(handles)
    copy = handles[0].__class__(
        request_id="r", capture_id=handles[0].capture_id, layer_indices=(2,), prompt_token_ids=(1,)
    )
    with pytest.raises(HandleReleasedError, match="unknown"):
        await remote.fetch_captures_batch([copy])
    with pytest.raises(TypeError, match="not both"):
        await remote.generate("Hi", GREEDY, max_tokens=3)
    with pytest.raises(CaptureError, match="n == 1"):
        await remote.generate("Hi", n=2, capture_layers=[2])


async def test_named_specs_round_trip_and_run(remote):
    spec = SteeringSpec({5: LayerSteeringSpec(add=AddSpec(vector(11), scale=4.0))})
    await remote.put_spec("remote-test", spec)
    try:
        assert await remote.get_spec("remote-test") == spec
        assert "remote-test" in {entry["name"] for entry in await remote.list_specs()}
    finally:
        await remote.delete_spec("remote-test")


async def test_dropped_handles_free_their_server_captures(remote, server):
    import httpx

    async def held() -> set[str]:
        async with httpx.AsyncClient(base_url=server.url) as http:
            return {capture["id"] for capture in (await http.get("/v1/captures")).json()["data"]}

    _, handles = await remote.generate(["One", "Two"], max_tokens=3, temperature=0.0, capture_layers=[1])
    ids = {handle.capture_id for handle in handles}
    assert ids <= await held()
    del handles
    gc.collect()
    for _ in range(50):
        await asyncio.sleep(0.1)
        if not ids & await held():
            break
    assert not ids & await held()


async def test_sweep_and_contrast_vectors_run_remotely(remote):
    from workbench.contrast import extract_contrast_vectors

    frame = await remote.sweep("Tell me about your day.", 6, vector(3), [-4.0, 0.0, 4.0], max_tokens=8, progress=False)
    assert list(frame["scale"]) == [-4.0, 0.0, 4.0]
    assert frame["text"][1] == str((await remote.generate("Tell me about your day.", max_tokens=8, temperature=0.0))[0])
    vectors = await extract_contrast_vectors(remote, ["I love this!", "What a joy."], ["I hate this.", "How sad."], [6])
    assert vectors[6].vector.shape == (remote.hidden_size,) and vectors[6].model_name == remote.model_id


def test_the_notebook_engine_runs_on_a_server(server):
    from workbench.notebook import get_engine, shutdown_engine

    try:
        engine = get_engine(url=server.url)
        assert isinstance(engine.model, RemoteSteerModel) and get_engine(url=server.url) is engine
        texts = engine.run(engine.model.generate("Hello", max_tokens=4, temperature=0.0))
        assert len(texts) == 1
    finally:
        shutdown_engine()
