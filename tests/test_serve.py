"""The steering server against the Hugging Face reference, over HTTP.

One real ``workbench serve`` on 127.0.0.1 (the embedded model, float32,
eager; the ``server`` fixture of conftest.py), driven with the official ``openai`` client and with
raw HTTP (httpx). References come from the Hugging Face model in this
process (no second engine): unsteered and steered greedy tokens and
captured rows must equal it, as the in-process engine's do
(``tests/test_parity.py``).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.conftest import CAPTURE_TTL_S, MODEL
from tests.helpers import assert_rows_match, mean_direction, vector
from workbench import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
from workbench.capture_file import CaptureFile
from workbench.hf_reference import generate_reference

HIDDEN = 576
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "My favourite animal is",
]
GREEDY = {"temperature": 0.0, "max_tokens": 16}


def add_spec(layer: int, seed: int, scale: float = 6.0, positions: str = "all") -> SteeringSpec:
    return SteeringSpec({layer: LayerSteeringSpec(add=AddSpec(vector(seed), scale=scale, positions=positions))})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=300) as session:
        yield session


def complete(client, prompt, steering=None, capture_layers=None, **options):
    """One greedy completion with the openai client; returns the response."""
    extra = {"return_token_ids": True}
    if steering is not None:
        extra["steering"] = steering
    if capture_layers is not None:
        extra["capture_layers"] = capture_layers
    return client.completions.create(model=MODEL, prompt=prompt, extra_body=extra, **{**GREEDY, **options})


def fetch(http, capture_id: str) -> CaptureFile:
    reply = http.get(f"/v1/captures/{capture_id}")
    assert reply.status_code == 200, reply.text
    return CaptureFile.from_bytes(reply.content)


# -- unsteered and steered requests against the reference ------------------------------


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_unsteered_completions_equal_the_reference(client, hf, prompt):
    choice = complete(client, prompt).choices[0]
    reference = generate_reference(hf[0], choice.prompt_token_ids, GREEDY["max_tokens"], SteeringSpec())
    assert choice.token_ids == reference.token_ids


def spec_of(kind: str, hf) -> SteeringSpec:
    ids = hf[1](PROMPTS[0]).input_ids
    if kind == "add":
        return add_spec(3, 1)
    if kind == "cap":
        return SteeringSpec(
            {5: LayerSteeringSpec(projection_cap=ProjectionCapSpec(mean_direction(hf[0], ids, 5), min=-2.0, max=2.0))}
        )
    if kind == "ablation":
        return SteeringSpec({8: LayerSteeringSpec(ablation=AblationSpec(mean_direction(hf[0], ids, 8), scale=0.0))})
    assert kind == "generated-only add"
    return add_spec(4, 2, scale=8.0, positions="generated")


@pytest.mark.parametrize("kind", ["add", "cap", "ablation", "generated-only add"])
def test_steered_completions_equal_the_reference_with_the_same_spec(client, hf, kind):
    spec = spec_of(kind, hf)
    unsteered = complete(client, PROMPTS[0]).choices[0]
    as_lists = complete(client, PROMPTS[0], steering=spec.to_dict()).choices[0]
    as_base64 = complete(client, PROMPTS[0], steering=spec.to_dict(vector_format="base64")).choices[0]
    reference = generate_reference(hf[0], as_lists.prompt_token_ids, GREEDY["max_tokens"], spec)
    assert as_lists.token_ids == as_base64.token_ids == reference.token_ids
    assert as_lists.token_ids != unsteered.token_ids
    assert as_lists.nonfinite_layer is None


def test_steered_chat_completion_equals_the_reference(client, hf):
    spec = add_spec(6, 3, scale=5.0)
    messages = [{"role": "user", "content": "Name three colours."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, extra_body={"steering": spec.to_dict(), "return_token_ids": True}, **GREEDY
    )
    reference = generate_reference(hf[0], reply.prompt_token_ids, GREEDY["max_tokens"], spec)
    assert reply.choices[0].token_ids == reference.token_ids
    assert reply.choices[0].nonfinite_layer is None


def test_a_spec_that_breaks_the_stream_is_flagged(client):
    # Each add fits the float32 stream (|value| <= 1.8e19); together, at layer 13, they do not.
    spike = torch.zeros(HIDDEN)
    spike[0] = 1e19
    broken = SteeringSpec({12: LayerSteeringSpec(add=AddSpec(spike)), 13: LayerSteeringSpec(add=AddSpec(spike))})
    choice = complete(client, PROMPTS[0], steering=broken.to_dict(vector_format="base64"), max_tokens=4).choices[0]
    assert choice.nonfinite_layer == 13


# -- concurrency and streaming ------------------------------------------------------------


async def test_32_concurrent_requests_with_8_specs_each_equal_their_solo_run(aclient):
    specs = [add_spec(layer, 10 + layer, scale=4.0) for layer in (1, 4, 7, 10, 13, 16, 19)] + [SteeringSpec()]
    jobs = [(prompt, spec) for spec in specs for prompt in PROMPTS]

    async def run(prompt, spec):
        extra = {"steering": spec.to_dict(vector_format="base64"), "return_token_ids": True}
        reply = await aclient.completions.create(model=MODEL, prompt=prompt, extra_body=extra, **GREEDY)
        return reply.choices[0].token_ids

    started = time.monotonic()
    together = await asyncio.gather(*(run(prompt, spec) for prompt, spec in jobs))
    concurrent_s = time.monotonic() - started
    solo = [await run(prompt, spec) for prompt, spec in jobs]
    assert together == solo
    assert len({tuple(tokens) for tokens in solo}) > len(PROMPTS)  # the specs changed outputs
    print(f"32 requests: {concurrent_s:.1f} s together")


def test_streaming_steered_equals_the_whole_reply(client, http):
    spec = add_spec(5, 4)
    whole = complete(client, PROMPTS[1], steering=spec.to_dict())
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPTS[1], stream=True, extra_body={"steering": spec.to_dict()}, **GREEDY
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason is not None and chunks[-1].choices[0].nonfinite_layer is None
    # Streaming with capture: the id comes in a header and in every event.
    with http.stream(
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": PROMPTS[1], "stream": True, "capture_layers": [3], **GREEDY},
    ) as reply:
        capture_id = reply.headers["x-workbench-capture-id"]
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    assert {event["capture_id"] for event in events} == {capture_id}
    assert fetch(http, capture_id).choices[0].rows[3].shape[1] == HIDDEN


async def test_streamed_chat_with_steering(aclient):
    spec = add_spec(6, 3, scale=5.0)
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = await aclient.chat.completions.create(
        model=MODEL, messages=messages, extra_body={"steering": spec.to_dict()}, **GREEDY
    )
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=messages, stream=True, extra_body={"steering": spec.to_dict()}, **GREEDY
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text == whole.choices[0].message.content


# -- captures -------------------------------------------------------------------------------


@pytest.mark.parametrize("steered", [False, True], ids=["unsteered", "steered"])
def test_captured_rows_equal_the_reference(client, http, hf, steered):
    spec = add_spec(3, 7) if steered else SteeringSpec()
    layers = [0, 3, 15, 29]
    reply = complete(client, PROMPTS[1], steering=spec.to_dict(), capture_layers=layers)
    choice = reply.choices[0]
    capture = fetch(http, reply.capture_id)
    assert capture.layers == tuple(layers)
    (entry,) = capture.choices
    assert list(entry.prompt_token_ids) == choice.prompt_token_ids
    assert list(entry.generated_token_ids) == choice.token_ids
    reference = generate_reference(hf[0], choice.prompt_token_ids, GREEDY["max_tokens"], spec, layers)
    assert choice.token_ids == reference.token_ids
    for layer in layers:
        rows = entry.rows[layer]
        assert rows.shape == (len(choice.prompt_token_ids) + len(choice.token_ids) - 1, HIDDEN)
        assert_rows_match(rows, reference.captures[layer])
    # Fetching frees: the second fetch finds nothing.
    assert http.get(f"/v1/captures/{reply.capture_id}").status_code == 404


def test_a_capture_of_several_prompts_has_one_choice_each(http):
    reply = http.post(
        "/v1/completions", json={"model": MODEL, "prompt": PROMPTS[:3], "capture_layers": [2, 9], **GREEDY}
    ).json()
    handles = fetch(http, reply["capture_id"]).handles()
    assert [h.generated_token_ids for h in handles] == [
        tuple(http.post("/v1/completions", json={"model": MODEL, "prompt": p, "return_token_ids": True, **GREEDY})
              .json()["choices"][0]["token_ids"]) for p in PROMPTS[:3]
    ]  # fmt: skip
    assert all(h.hidden(9).shape[0] == h.expected_rows for h in handles)


def test_chat_captures_carry_message_boundaries(client, http):
    messages = [
        {"role": "system", "content": "You are a math tutor."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, extra_body={"capture_layers": [4], "return_token_ids": True}, **GREEDY
    )
    (handle,) = fetch(http, reply.capture_id).handles()
    assert [b.role for b in handle.message_boundaries] == ["system", "user", "assistant", "user"]
    assert handle.message_boundaries[0].start == 0
    assert handle.message_boundaries[-1].end == len(reply.prompt_token_ids)
    assert (
        handle.get_message_activations(-1, 4, include_generated=True).shape[0]
        > handle.message_boundaries[-1].num_tokens
    )


def test_captures_can_be_deleted_and_expire_unfetched(http):
    body = {"model": MODEL, "prompt": PROMPTS[0], "capture_layers": [1], **GREEDY}
    deleted, kept = (http.post("/v1/completions", json=body).json()["capture_id"] for _ in range(2))
    assert http.delete(f"/v1/captures/{deleted}").status_code == 200
    assert http.get(f"/v1/captures/{deleted}").status_code == 404
    assert http.get("/v1/steering/info").json()["captures"]["captures"] >= 1
    time.sleep(CAPTURE_TTL_S + 3)
    reply = http.get(f"/v1/captures/{kept}")
    assert reply.status_code == 404 and "expired" in reply.json()["error"]["message"]
    assert http.get("/v1/steering/info").json()["captures"]["held_bytes"] == 0


# -- named specs --------------------------------------------------------------------------------


def test_named_specs_over_http(client, http, server):
    spec = add_spec(2, 21, scale=3.0)
    assert http.put("/v1/steering/specs/sea", json=spec.to_dict()).status_code == 201
    assert http.put("/v1/steering/specs/sea", json=spec.to_dict(vector_format="base64")).status_code == 200
    listed = {entry["name"]: entry for entry in http.get("/v1/steering/specs").json()["data"]}
    assert listed["sea"]["kind"] == "spec" and listed["sea"]["layers"] == {"2": ["add"]}
    assert listed["joy-l6"]["kind"] == "vector" and listed["joy-l6"]["metadata"]["layer"] == 6
    assert SteeringSpec.from_dict(http.get("/v1/steering/specs/sea").json()["spec"]) == spec
    assert sorted(path.name for path in Path(server.folder).iterdir()) == [
        "joy-l6.json",
        "joy-l6.safetensors",
        "sea.safetensors",
    ]  # fmt: skip  (written atomically: no temporary files left)

    by_name = complete(client, PROMPTS[0], steering={"name": "sea", "scale": 7.0}).choices[0].token_ids
    inline = complete(client, PROMPTS[0], steering=add_spec(2, 21, scale=7.0).to_dict()).choices[0].token_ids
    assert by_name == inline
    vector_by_name = complete(client, PROMPTS[0], steering={"name": "joy-l6", "scale": 5.0}).choices[0].token_ids
    vector_inline = complete(client, PROMPTS[0], steering=add_spec(6, 60, scale=5.0).to_dict()).choices[0].token_ids
    assert vector_by_name == vector_inline
    assert (
        complete(client, PROMPTS[0], steering="sea").choices[0].token_ids
        == complete(client, PROMPTS[0], steering=spec.to_dict()).choices[0].token_ids
    )

    assert http.delete("/v1/steering/specs/sea").status_code == 200
    assert http.get("/v1/steering/specs/sea").status_code == 404
    assert http.delete("/v1/steering/specs/joy-l6").status_code == 400  # vectors are read-only over HTTP
    wrong = http.put(
        "/v1/steering/specs/bad", json=SteeringSpec({1: LayerSteeringSpec(add=AddSpec(torch.ones(8)))}).to_dict()
    )
    assert wrong.status_code == 400 and wrong.json()["error"]["type"] == "HiddenSizeError"
    assert http.put("/v1/steering/specs/..%2Fescape", json=spec.to_dict()).status_code in (400, 404)
    assert not (Path(server.folder) / "bad.safetensors").exists()


# -- bad requests ----------------------------------------------------------------------------------


def spec_body(layer="4", **op):
    return {"layers": {layer: {"add": {"vector": [0.5] * HIDDEN, **op}}}}


BAD = [
    ("unknown spec name", {"steering": {"name": "no-such-spec"}}, "SpecNotFoundError", "no-such-spec"),
    ("wrong vector length", {"steering": {"layers": {"4": {"add": {"vector": [1.0] * 7}}}}},
     "HiddenSizeError", "size 7"),
    ("NaN in a vector", {"steering": {"layers": {"4": {"add": {"vector": [1.0, math.nan] + [0.0] * 574}}}}},
     "SpecError", "non-finite value nan at index 1"),
    ("layer out of range", {"steering": spec_body("30")}, "LayerIndexError", "layer 30"),
    ("layer not a number", {"steering": spec_body("four")}, "LayerIndexError", "'four'"),
    ("bad positions", {"steering": spec_body(positions="middle")}, "SpecError", "'middle'"),
    ("infinite scale", {"steering": spec_body(scale=math.inf)}, "SpecError", "inf"),
    ("bad base64", {"steering": {"layers": {"4": {"add": {"vector": "not base64!"}}}}}, "SpecError", "base64"),
    ("unknown op", {"steering": {"layers": {"4": {"steer": {"vector": [1.0]}}}}}, "SpecError", "'steer'"),
    ("capture layer out of range", {"capture_layers": [2, 31]}, "LayerIndexError", "layer 31"),
    ("capture layers empty", {"capture_layers": []}, "CaptureError", "empty"),
    ("capture with n > 1", {"capture_layers": [2], "n": 2, "temperature": 1.0}, "CaptureError", "n=2"),
    ("steering with beam search", {"steering": spec_body(), "use_beam_search": True}, "SpecError", "beam"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "fields", "kind", "text"), BAD, ids=[case for case, *_ in BAD])
def test_bad_requests_are_400_naming_the_value(http, case, fields, kind, text):
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[0], **GREEDY, **fields})  # NaN / Infinity as JSON allows
    reply = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == kind and text in error["message"], error
    assert error["param"] in ("steering", "capture_layers")


def test_steering_on_another_route_is_refused(http):
    reply = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "steering": spec_body()})
    assert reply.status_code == 400 and "/v1/completions" in reply.json()["error"]["message"]


async def test_bad_requests_leave_the_rest_of_the_batch_alone(aclient, server):
    good = [(prompt, add_spec(3, 30 + i, scale=4.0)) for i, prompt in enumerate(PROMPTS)]

    async def good_run(prompt, spec):
        extra = {"steering": spec.to_dict(vector_format="base64"), "return_token_ids": True}
        reply = await aclient.completions.create(model=MODEL, prompt=prompt, extra_body=extra, **GREEDY)
        return reply.choices[0].token_ids

    async def bad_run(fields):
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as session:
            body = json.dumps({"model": MODEL, "prompt": PROMPTS[0], **GREEDY, **fields})
            return (
                await session.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            ).status_code

    mixed = await asyncio.gather(*[good_run(*job) for job in good], *[bad_run(fields) for _, fields, *_ in BAD])
    assert mixed[len(good) :] == [400] * len(BAD)
    assert mixed[: len(good)] == [await good_run(*job) for job in good]


def test_the_server_still_answers_like_before(client, hf):
    test_unsteered_completions_equal_the_reference(client, hf, PROMPTS[0])
