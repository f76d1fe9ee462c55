"""The server's parts without an engine: request fields, the spec store, the
capture registry and file, the middleware over a stand-in app, the command line."""

from __future__ import annotations

import asyncio
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from starlette.middleware import Middleware

from tests.helpers import vector
from workbench import (
    AddSpec,
    CaptureError,
    CaptureLimitError,
    CapturePendingError,
    HandleReleasedError,
    HiddenSizeError,
    LayerIndexError,
    LayerSteeringSpec,
    ProjectionCapSpec,
    SpecError,
    SpecNotFoundError,
    SteeringSpec,
)
from workbench.capture import MessageBoundary
from workbench.capture_file import CaptureChoice, CaptureFile
from workbench.engine_link import FetchedRows
from workbench.serve.captures import CaptureRegistry, chat_source
from workbench.serve.middleware import SteeringMiddleware
from workbench.serve.request_body import RequestBody
from workbench.serve.request_fields import ModelShape, RecentSpecs, parse_capture_layers, parse_steering
from workbench.serve.spec_store import SpecStore
from workbench.serve.steering import TICKET_KEY, Ticket
from workbench.vector_library import VectorLibrary
from workbench.wire import CaptureRequest

MODEL = ModelShape(hidden_size=576, layer_count=30, dtype=torch.float32)


@pytest.fixture
def store(tmp_path):
    VectorLibrary(tmp_path / "a").save("joy", vector(1), layer=6)
    VectorLibrary(tmp_path / "b").save("layerless", vector(2))
    SteeringSpec({3: LayerSteeringSpec(add=AddSpec(vector(3), scale=2.0))}).save(tmp_path / "b" / "sea.safetensors")
    return SpecStore([tmp_path / "a", tmp_path / "b"])


# -- request fields -------------------------------------------------------------------


def test_steering_fields_resolve_to_specs(store):
    spec = SteeringSpec({4: LayerSteeringSpec(add=AddSpec(vector(4), scale=3.0, positions="prompt"))})
    assert parse_steering(spec.to_dict(), MODEL, store) == spec
    assert parse_steering(spec.to_dict(vector_format="base64"), MODEL, store) == spec
    assert parse_steering(None, MODEL, store).is_empty() and parse_steering({}, MODEL, store).is_empty()
    assert parse_steering("sea", MODEL, store).layers[3].add.scale == 2.0
    assert parse_steering({"name": "sea", "scale": 9.0}, MODEL, store).layers[3].add.scale == 9.0
    joy = parse_steering({"name": "joy", "scale": 4.0, "positions": "generated"}, MODEL, store)
    assert joy == SteeringSpec({6: LayerSteeringSpec(add=AddSpec(vector(1), scale=4.0, positions="generated"))})
    assert list(parse_steering({"name": "layerless", "layer": 2}, MODEL, store).layers) == [2]


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [
        ({"name": "missing"}, SpecNotFoundError, "known: ['joy', 'layerless', 'sea']"),
        ({"name": "../etc/passwd"}, SpecError, "not a path"),
        ({"name": "layerless"}, LayerIndexError, "no layer in its metadata"),
        ({"name": "sea", "layer": 2}, SpecError, "fixes its own"),
        ({"name": "joy", "colour": "red"}, SpecError, "unknown keys ['colour']"),
        ({"name": "joy", "scale": "big"}, SpecError, "'big'"),
        ({"vectors": []}, SpecError, "needs 'layers'"),
        ([1, 2], SpecError, "spec dict"),
        ({"layers": {"2": {"add": {"vector": [1.0] * 8}}}}, HiddenSizeError, "size 8"),
        ({"layers": {"2": {"add": {"vector": "AAAA="}}}}, SpecError, "base64"),
        ({"layers": {"2": {"add": {"vector": [1e39] * 576}}}}, SpecError, "non-finite value inf at index 0"),
    ],
)
def test_bad_steering_fields_name_the_value(store, value, error, text):
    with pytest.raises(error, match=re.escape(text)):
        parse_steering(value, MODEL, store)


def test_a_scale_for_a_spec_without_adds_is_refused(store, tmp_path):
    SteeringSpec({1: LayerSteeringSpec(projection_cap=ProjectionCapSpec(vector(5), max=1.0))}).save(
        tmp_path / "a" / "cap.safetensors"
    )
    with pytest.raises(SpecError, match="no add op"):
        parse_steering({"name": "cap", "scale": 2.0}, MODEL, store)


def test_capture_fields():
    assert parse_capture_layers(None, MODEL) == ()
    assert parse_capture_layers(5, MODEL) == (5,)
    assert parse_capture_layers([9, 2, 9], MODEL) == (2, 9)
    with pytest.raises(LayerIndexError, match="layer 30"):
        parse_capture_layers([30], MODEL)
    with pytest.raises(LayerIndexError, match="must be an int"):
        parse_capture_layers(["2"], MODEL)
    with pytest.raises(CaptureError, match="empty"):
        parse_capture_layers([], MODEL)


# -- the spec store ---------------------------------------------------------------------


def test_the_store_writes_atomically_into_the_first_folder_only(store, tmp_path):
    spec = SteeringSpec({2: LayerSteeringSpec(add=AddSpec(vector(7)))})
    assert store.put("new", spec) is True and store.put("new", spec) is False
    assert (tmp_path / "a" / "new.safetensors").exists()
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == [
        "joy.json",
        "joy.safetensors",
        "new.safetensors",
    ]
    assert [(e.name, e.kind, e.writable) for e in store.entries()] == [
        ("joy", "vector", True),
        ("layerless", "vector", False),
        ("new", "spec", True),
        ("sea", "spec", False),
    ]
    with pytest.raises(SpecError, match="library vector"):
        store.put("joy", spec)
    with pytest.raises(SpecError, match="only spec files"):
        store.delete("sea")
    store.delete("new")
    with pytest.raises(SpecNotFoundError):
        store.find("new")
    described = store.describe(store.find("sea"), with_vectors=True)
    assert (
        described["layers"] == {"3": ["add"]} and SteeringSpec.from_dict(described["spec"]).layers[3].add.scale == 2.0
    )


def test_the_store_picks_up_changed_files(store, tmp_path):
    path = tmp_path / "b" / "sea.safetensors"
    assert store.load_spec(store.find("sea")).layers[3].add.scale == 2.0
    SteeringSpec({3: LayerSteeringSpec(add=AddSpec(vector(3), scale=5.0))}).save(path)
    assert store.load_spec(store.find("sea")).layers[3].add.scale == 5.0


# -- the capture registry ------------------------------------------------------------------


class Link:
    """The part of ``EngineLink`` the registry uses, with rows of its own."""

    hidden_size, dtype = 4, torch.float32

    def __init__(self) -> None:
        self.released: list[str] = []
        self.count = 0

    def capture_request(self, layers, prompt_tokens, max_tokens):
        self.count += 1
        return CaptureRequest(f"engine-{self.count}", layers, prompt_tokens + max_tokens - 1, None)

    async def fetch_rows(self, ids):
        return FetchedRows({i: {1: torch.ones(20, 4), 2: torch.zeros(20, 4)} for i in ids}, {})

    def release_soon(self, capture_id):
        self.released.append(capture_id)


def output(prompt: int, generated: int) -> SimpleNamespace:
    return SimpleNamespace(prompt_token_ids=list(range(prompt)), outputs=[SimpleNamespace(token_ids=[7] * generated)])


async def test_a_capture_is_fetched_once_after_its_request():
    clock = [0.0]
    registry = CaptureRegistry(Link(), ttl_s=10, memory_limit=1 << 20, tokenizer=lambda: None, clock=lambda: clock[0])
    capture_id = registry.open((1, 2))
    registry.add_choice(capture_id, 0, 5, 8)
    registry.finish_choice(capture_id, 0, output(5, 3), None)
    with pytest.raises(CapturePendingError, match="still being recorded"):
        await registry.take(capture_id)
    registry.end(capture_id)
    assert registry.held_bytes == (5 + 3 - 1) * 2 * 4 * 4
    file = await registry.take(capture_id)
    assert [choice.rows[1].shape for choice in file.choices] == [(7, 4)]
    with pytest.raises(HandleReleasedError, match="already fetched"):
        await registry.take(capture_id)
    assert registry.held_bytes == 0


async def test_unfetched_captures_expire_and_memory_is_bounded():
    clock = [0.0]
    link = Link()
    registry = CaptureRegistry(link, ttl_s=10, memory_limit=4000, tokenizer=lambda: None, clock=lambda: clock[0])
    first = registry.open((1,))
    assert registry.add_choice(first, 0, 50, 50) is not None  # 99 rows x 16 B
    assert registry.add_choice(first, 1, 500, 500) is None  # would pass the limit: runs without rows
    registry.finish_choice(first, 0, output(50, 50), None)
    registry.finish_choice(first, 1, output(500, 500), None)
    registry.end(first)
    second = registry.open((1,))
    registry.add_choice(second, 0, 60, 60)  # 119 rows: 3488 of 4000 bytes held
    registry.open((1,), min_rows=32)
    with pytest.raises(CaptureLimitError, match="limit"):
        registry.open((1,), min_rows=33)  # 33 more rows would pass the limit
    registry.end(second)  # its prompt never finished: dropped, nothing held
    clock[0] = 10.5
    assert registry.expire() == [first]
    assert link.released == ["engine-1"]
    assert registry.held_bytes == 0
    registry.open((1,))


def test_chat_sources_keep_text_conversations_only():
    body = {"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"enable_thinking": False}}
    source = chat_source(body)
    assert source.options == {"enable_thinking": False, "add_generation_prompt": True}
    assert chat_source({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}) is None


def test_capture_files_round_trip():
    rows = {3: torch.randn(6, 4), 8: torch.randn(6, 4)}
    boundary = MessageBoundary("user", "Hi", 0, 4)
    file = CaptureFile(
        "cap-1",
        (3, 8),
        [
            CaptureChoice(0, (1, 2, 3, 4), (5, 6, 7), rows, (boundary,), nonfinite_layer=None),
            CaptureChoice(1, (1,), (2,), error="not recorded"),
        ],
    )
    back = CaptureFile.from_bytes(file.to_bytes())
    assert back.layers == (3, 8) and back.choices[1].error == "not recorded" and not back.choices[1].rows
    assert torch.equal(back.choices[0].rows[8], rows[8]) and back.choices[0].message_boundaries == (boundary,)
    with pytest.raises(CaptureError, match="choice 1: not recorded"):
        back.handles()
    with pytest.raises(CaptureError, match="not a workbench capture file"):
        CaptureFile.from_bytes(b"nonsense")


# -- the middleware over a stand-in app ------------------------------------------------------


class Steering:
    """The part of ``ServerSteering`` the middleware uses."""

    def __init__(self) -> None:
        self.opened: list[Ticket] = []
        self.closed: list[str] = []

    def open_ticket(self, spec, layers, chat, min_rows):
        ticket = Ticket(f"t{len(self.opened)}", spec, "cap-x" if layers else None)
        ticket.nonfinite[0] = 7
        self.opened.append(ticket)
        return ticket

    def close_ticket(self, ticket):  # once, as ServerSteering's
        if ticket.id not in self.closed:
            self.closed.append(ticket.id)


@pytest.fixture
def app(store):
    app = FastAPI()
    steering = Steering()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("stream"):

            async def events():
                yield 'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n'  # as vLLM writes it
                yield 'data: {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}]}\n\n'
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"echo": body, "choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await request.json()

    app.user_middleware.append(Middleware(SteeringMiddleware, steering=steering, model=MODEL, store=store))
    app.state.steering = steering
    return app


def test_the_middleware_hands_vllm_a_ticket_and_annotates_the_reply(app):
    client = TestClient(app)
    spec = SteeringSpec({4: LayerSteeringSpec(add=AddSpec(vector(4)))})
    reply = client.post(
        "/v1/completions",
        json={"prompt": "Hi", "steering": spec.to_dict(), "capture_layers": [2], "vllm_xargs": {"mine": 1}},
    )
    body = reply.json()
    assert body["echo"] == {"prompt": "Hi", "vllm_xargs": {"mine": 1, TICKET_KEY: "t0"}}
    assert body["capture_id"] == reply.headers["x-workbench-capture-id"] == "cap-x"
    assert body["choices"][0]["nonfinite_layer"] == 7
    assert int(reply.headers["content-length"]) == len(reply.content)
    assert app.state.steering.closed == ["t0"]
    streamed = client.post("/v1/completions", json={"prompt": "Hi", "stream": True, "steering": spec.to_dict()})
    events = [line for line in streamed.text.split("\n\n") if line]
    assert events[0] == 'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}'  # passed through as is
    assert json.loads(events[1][6:])["choices"][0]["nonfinite_layer"] == 7 and events[2] == "data: [DONE]"


def test_the_middleware_passes_other_requests_through_untouched(app):
    client = TestClient(app)
    raw = b'{"prompt":  "Hi",  "n": 1}'
    reply = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert reply.json()["echo"] == {"prompt": "Hi", "n": 1} and "capture_id" not in reply.json()
    assert client.post("/v1/completions", json={"prompt": "Hi", "steering": None}).json()["echo"] == {"prompt": "Hi"}
    assert app.state.steering.opened == []


@pytest.mark.parametrize(
    ("path", "body", "param", "kind"),
    [
        ("/v1/completions", {"steering": {"name": "missing"}}, "steering", "SpecNotFoundError"),
        ("/v1/completions", {"capture_layers": [40]}, "capture_layers", "LayerIndexError"),
        ("/v1/completions", {"capture_layers": [1], "n": 3}, "capture_layers", "CaptureError"),
        ("/v1/completions", {"steering": "joy", "use_beam_search": True}, "steering", "SpecError"),
        ("/v1/embeddings", {"steering": "joy"}, "steering", "SpecError"),
    ],
)
def test_the_middleware_refuses_bad_fields_with_400(app, path, body, param, kind):
    reply = TestClient(app).post(path, json={"prompt": "Hi", **body})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param and reply.json()["error"]["type"] == kind
    assert app.state.steering.opened == []


def test_the_middleware_refuses_a_field_it_reads_that_is_not_json_with_400(app):
    """Values are split from the body undecoded; one the middleware reads and cannot decode is named."""
    raw = b'{"prompt": "Hi", "steering": "joy", "max_tokens": "\xff"}'
    reply = TestClient(app).post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "max_tokens is not valid JSON" in reply.json()["error"]["message"]
    assert app.state.steering.opened == []


# -- the command line ----------------------------------------------------------------------------


def test_the_command_line_takes_vllm_options_and_ours():
    from workbench.serve.cli import parse_args

    args, options = parse_args(["--dtype", "float32", "--steering-dir", "/tmp/a", "--capture-ttl", "30"])
    assert args.served_model_name == ["smollm2-135m-instruct"] and args.model.endswith("smollm2-135m-instruct-0.1.2")
    assert args.enforce_eager is True and args.dtype == "float32"  # eager: this is a CPU
    assert options.capture_ttl_s == 30 and [str(p) for p in options.steering_dirs] == ["/tmp/a"]
    args, _ = parse_args(["some/model", "--no-enforce-eager", "--served-model-name", "m"])
    assert (args.model, args.served_model_name, args.enforce_eager) == ("some/model", ["m"], False)


@pytest.mark.parametrize("option", [["--data-parallel-size", "2"], ["--api-server-count", "2"], ["--headless"]])
def test_the_command_line_refuses_what_one_server_cannot_steer(option, capsys):
    from workbench.serve.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(option)
    assert "load balancer" in capsys.readouterr().err


def test_the_engine_arguments_get_the_runtime_added():
    from vllm import AsyncEngineArgs

    from workbench import EngineConfigError, wire
    from workbench.config import steered_engine_args

    args = AsyncEngineArgs(
        model="m", load_format="dummy", model_loader_extra_config={"x": 1}, additional_config={"y": 2}
    )
    steered = steered_engine_args(args, 8, "smollm2-135m-instruct")
    assert steered.load_format == wire.LOAD_FORMAT and steered.worker_extension_cls == wire.WORKER_EXTENSION
    assert steered.model_loader_extra_config == {"x": 1, wire.INNER_LOAD_FORMAT_KEY: "dummy"}
    assert steered.additional_config["y"] == 2 and steered.additional_config[wire.SETTINGS_KEY]["num_slots"] == 8
    assert steered.dtype == "float32"
    with pytest.raises(Exception, match="worker extension"):
        steered_engine_args(AsyncEngineArgs(model="m", worker_extension_cls="other.Ext"), 8)
    with pytest.raises(EngineConfigError, match="kv_sharing_fast_prefill"):
        steered_engine_args(AsyncEngineArgs(model="m", kv_sharing_fast_prefill=True), 8)


def test_a_cpu_engine_runs_its_one_worker_in_the_engine_core():
    """The class, not the name "uni" (vLLM's CPU platform swaps that for its multiprocessing
    executor); a backend the caller names, or several workers, keep vLLM's choice."""
    from vllm import AsyncEngineArgs
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    from workbench.config import steered_engine_args

    assert steered_engine_args(AsyncEngineArgs(model="m"), 8).distributed_executor_backend is UniProcExecutor
    assert (
        steered_engine_args(
            AsyncEngineArgs(model="m", distributed_executor_backend="mp"), 8
        ).distributed_executor_backend
        == "mp"
    )
    assert (
        steered_engine_args(AsyncEngineArgs(model="m", tensor_parallel_size=2), 8).distributed_executor_backend is None
    )


async def test_tickets_route_only_their_requests(tmp_path):
    from workbench.serve.steering import ServerSteering

    class Registry:
        def open(self, layers, chat, min_rows):
            return "cap"

        def end(self, capture_id):
            pass

    steering = ServerSteering(link=None, captures=Registry())
    seen = []

    async def original(prompt, params, request_id, **kwargs):
        seen.append(params.extra_args)
        yield "out"

    params = SimpleNamespace(extra_args={"workbench": "forged", "other": 1})
    assert [item async for item in steering.generate(original, {}, params, "r1")] == ["out"]
    assert seen == [{"other": 1}]  # a forged payload never reaches the workers
    ticket = steering.open_ticket(SteeringSpec(), (), None)
    steering.close_ticket(ticket)
    params = SimpleNamespace(extra_args={TICKET_KEY: ticket.id})
    assert [item async for item in steering.generate(original, {}, params, "r2")] == ["out"]  # closed: plain
    assert seen[-1] is None
    await asyncio.sleep(0)


def test_the_workbench_command_dispatches_serve(capsys, monkeypatch):
    from workbench import logs
    from workbench.cli import main

    monkeypatch.setattr(logs, "_level_chosen", True)  # keep this process's vLLM log level as it is

    main(["--help"])
    assert "workbench serve [MODEL]" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown command 'train'"):
        main(["train"])
    with pytest.raises(SystemExit):
        main(["serve", "--data-parallel-size", "2"])
    assert "load balancer" in capsys.readouterr().err


def test_the_remote_client_needs_no_vllm():
    """A laptop notebook has workbench without vLLM: RemoteSteerModel and its helpers import without it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class NoVllm:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vllm' or name.startswith('vllm.'):\n"
        "            raise ImportError('vllm is not installed here')\n"
        "sys.meta_path.insert(0, NoVllm())\n"
        "from workbench import RemoteSteerModel\n"
        "import workbench.capture_file, workbench.contrast, workbench.sweep\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def text(value) -> bytes:
    return json.dumps(value).encode()


def test_recent_specs_parse_a_text_once_and_keep_the_newest(store):
    specs = RecentSpecs(size=2)
    values = [SteeringSpec({layer: LayerSteeringSpec(add=AddSpec(vector(4)))}).to_dict("base64") for layer in range(3)]
    first = specs.parse(text(values[0]), MODEL, store)
    assert specs.parse(text(values[0]), MODEL, store) is first  # the same text, a new object
    specs.parse(text(values[1]), MODEL, store)
    specs.parse(text(values[2]), MODEL, store)  # evicts values[0], the least recently used
    again = specs.parse(text(values[0]), MODEL, store)
    assert again is not first and again == first
    scaled = json.loads(json.dumps(values[1]))
    scaled["layers"]["1"]["add"]["scale"] = True  # equal to 1 in Python, not in JSON
    with pytest.raises(SpecError):
        specs.parse(text(scaled), MODEL, store)


def test_recent_specs_keep_texts_within_their_byte_bound(store):
    """Listed vectors are remembered too; the texts held stay under ``text_bytes``."""
    listed = [text(SteeringSpec({2: LayerSteeringSpec(add=AddSpec(vector(5 + i)))}).to_dict()) for i in range(3)]
    specs = RecentSpecs(text_bytes=2 * len(listed[0]) + 10)
    first = specs.parse(listed[0], MODEL, store)
    assert specs.parse(listed[0], MODEL, store) is first
    specs.parse(listed[1], MODEL, store)
    specs.parse(listed[2], MODEL, store)  # three texts are over the bound: the oldest goes
    assert specs.parse(listed[2], MODEL, store) is specs.parse(listed[2], MODEL, store)
    assert specs.parse(listed[0], MODEL, store) is not first


def test_recent_specs_remember_names_until_their_file_changes(store):
    """A name is parsed once per version of its file: one written over HTTP (PUT) is read anew."""
    specs = RecentSpecs()
    first = specs.parse(text({"name": "sea", "scale": 3.0}), MODEL, store)
    assert specs.parse(text({"name": "sea", "scale": 3.0}), MODEL, store) is first
    assert specs.parse(text({"name": "sea", "scale": 4.0}), MODEL, store).layers[3].add.scale == 4.0
    assert specs.parse(text("joy"), MODEL, store) is specs.parse(text("joy"), MODEL, store)
    replacement = SteeringSpec({5: LayerSteeringSpec(add=AddSpec(vector(9)))})
    store.put("sea", replacement)  # the first folder's "sea" now hides the second's
    assert specs.parse(text({"name": "sea"}), MODEL, store) == replacement
    assert specs.parse(text({"name": "sea", "scale": 3.0}), MODEL, store).layers.keys() == {5}
    rewritten = SteeringSpec({5: LayerSteeringSpec(add=AddSpec(vector(10)))})
    store.put("sea", rewritten)  # the same folder, a file of the same size, within a timestamp's granularity
    assert specs.parse(text({"name": "sea"}), MODEL, store) == rewritten
    with pytest.raises(SpecError):
        specs.parse(text({"name": "nowhere"}), MODEL, store)
    with pytest.raises(SpecError, match="steering is not valid JSON"):
        specs.parse(b'{"name": "\xff"}', MODEL, store)


def test_request_body_decodes_only_what_is_read_and_sends_the_rest_as_it_came():
    body = b'{"model": "m", "prompt": [1, 2], "steering": {"layers": {"0": {}}},  "n": 2}'
    request = RequestBody.parse(body)
    assert "steering" in request and "capture_layers" not in request
    assert request["n"] == 2 and request.get("prompt") == [1, 2] and request.get("absent") is None
    assert request.pop_text("steering") == b'{"layers": {"0": {}}}' and "steering" not in request
    request.set("vllm_xargs", {"ticket": "t1"})
    assert json.loads(request.encode()) == {"model": "m", "prompt": [1, 2], "n": 2, "vllm_xargs": {"ticket": "t1"}}
    assert b'"prompt":[1, 2]' in request.encode()  # untouched values keep their text
    # Not strict JSON, as vLLM's own routes accept it: split by the standard library instead.
    loose = RequestBody.parse(b'{"steering": {"layers": {}}, "temperature": NaN, "top_p": 1e999}')
    assert math.isnan(loose["temperature"]) and loose["top_p"] == math.inf and loose["steering"] == {"layers": {}}
    assert RequestBody.parse(b"[1, 2]") is None and RequestBody.parse(b'{"steering": tru}') is None
    broken = RequestBody.parse(b'{"messages": "\xff"}')  # bytes that are not UTF-8 inside a string
    with pytest.raises(SpecError, match="messages is not valid JSON"):
        broken["messages"]
