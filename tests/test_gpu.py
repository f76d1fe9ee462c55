"""GPU checks (vLLM with CUDA graphs): skipped without CUDA.

Run on a CUDA host (`bash bench/run_device.sh tests`): dummy bf16 weights of the
embedded model's shape (vLLM seeds dummy weights, so every engine here holds
the same ones), token-id prompts, no tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from vllm import SamplingParams  # noqa: E402

from workbench import AblationSpec, AddSpec, LayerSteeringSpec, SteeringSpec, VLLMSteeringConfig, VLLMSteerModel  # noqa: E402

pytestmark = pytest.mark.gpu

SMOLLM2_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = [[(7 * i + 13 * j) % 40000 + 100 for j in range(11 + 5 * i)] for i in range(6)]


def make_engine(path: str, eager: bool, tp: int = 1, load_format: str = "dummy") -> VLLMSteerModel:
    cfg = VLLMSteeringConfig(
        model_name=path,
        dtype="bfloat16",
        max_model_len=512,
        load_format=load_format,
        gpu_memory_utilization=0.25,
        tensor_parallel_size=tp,
        max_steering_slots=8,
        engine_kwargs={"skip_tokenizer_init": True},
    )
    return VLLMSteerModel(cfg, enforce_eager=eager)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2-shape")
    (folder / "config.json").write_text(json.dumps(SMOLLM2_SHAPE))
    return str(folder)


@pytest.fixture(scope="module")
async def graphs(model_dir):
    engine = make_engine(model_dir, eager=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
async def eager(model_dir):
    engine = make_engine(model_dir, eager=True)
    yield engine
    engine.close()


def spec(layer: int, seed: int, scale: float = 1.0, positions: str = "all") -> SteeringSpec:
    vector = torch.randn(576, generator=torch.Generator().manual_seed(seed))
    return SteeringSpec({layer: LayerSteeringSpec(add=AddSpec(vector, scale=scale, positions=positions))})


async def token_ids(model, prompts, steering_spec=None):
    outputs = await model.generate(prompts, GREEDY, steering_spec=steering_spec, raw_output=True)
    return [list(output.outputs[0].token_ids) for output in outputs]


async def test_cuda_graphs_steer_change_and_restore(graphs):
    assert not graphs.enforce_eager
    baseline = await token_ids(graphs, PROMPTS)
    await graphs.set_layer_vector(3, spec(3, 0).layers[3].add.vector * 0.05)
    steered = await token_ids(graphs, PROMPTS)
    await graphs.set_layer_vector(3, spec(3, 1).layers[3].add.vector * 0.05)
    changed = await token_ids(graphs, PROMPTS)
    await graphs.clear_all_vectors()
    restored = await token_ids(graphs, PROMPTS)
    assert steered != baseline and changed != steered
    assert restored == baseline


async def test_per_request_specs_in_one_graphed_batch_equal_solo(graphs):
    specs = [
        SteeringSpec(),
        spec(3, 2, 0.05),
        spec(10, 3, 0.05),
        spec(20, 4, 0.05, "generated"),
        spec(3, 2, 0.05),
        SteeringSpec(),
    ]
    together = await token_ids(graphs, PROMPTS, specs)
    solo = [(await token_ids(graphs, [prompt], s))[0] for prompt, s in zip(PROMPTS, specs)]
    assert together == solo
    assert together[1] != together[0]


async def test_a_broken_stream_is_flagged_from_the_board(graphs, monkeypatch):
    """Under CUDA graphs the worker reads each steered step's inf/NaN marks on a
    helper thread as their copy lands and posts them on the board: the request
    steered past what the next norm can square is flagged at its layer, the
    others are not, and no worker call asks for them. An ablation scale the
    dtype holds breaks the stream (an add that large is refused up front)."""
    from workbench import wire

    link = graphs._link
    await link.ensure_ready()
    assert link._board is not None
    calls = []
    ask = link.rpc

    async def counted(method, *args):
        calls.append(method)
        return await ask(method, *args)

    monkeypatch.setattr(link, "rpc", counted)
    direction = torch.randn(576, generator=torch.Generator().manual_seed(5))
    broken = SteeringSpec({3: LayerSteeringSpec(ablation=AblationSpec(direction, scale=1e30))})
    specs = [SteeringSpec(), broken, spec(3, 6, 0.05)]
    replies = await graphs.generate(PROMPTS[:3], GREEDY, steering_spec=specs)
    assert [reply.nonfinite_layer for reply in replies] == [None, 3, None]
    assert wire.Rpc.TAKE_NONFINITE not in calls


async def test_graphed_captures_equal_eager_captures(graphs, eager):
    steering = [spec(5, 7, 0.05), SteeringSpec(), spec(12, 8, 0.05, "prompt")]
    results = []
    for engine in (graphs, eager):
        _, handles = await engine.generate(PROMPTS[:3], GREEDY, capture_layers=[5, 12, 29], steering_spec=steering)
        await engine.fetch_captures_batch(handles)
        results.append(handles)
    for graphed, plain in zip(*results):
        assert graphed.generated_token_ids == plain.generated_token_ids
        for layer in (5, 12, 29):
            a, b = graphed.hidden(layer).float(), plain.hidden(layer).float()
            assert a.shape == b.shape == (len(graphed.prompt_token_ids) + 23, 576)
            cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
            assert cosine > 0.99, (layer, cosine)


TP_SHAPE = {**SMOLLM2_SHAPE, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 4}  # fmt: skip
"""Head counts divisible by 2 (SmolLM2's 9 heads are not)."""


TP_ARCHITECTURES = ["llama", "qwen3_moe", "cohere", "gpt2", "olmo2"]
"""One per layer convention (OLMo 2 under vLLM's Transformers backend), and a mixture of
experts: Llama at TP_SHAPE, the others as the CPU parity test's tiny models."""


@pytest.fixture(scope="module", params=TP_ARCHITECTURES)
def tp_model_dir(request, tmp_path_factory):
    """Random but real weights on disk: vLLM's dummy weights are drawn per
    shard, so TP=1 and TP=2 engines would not hold the same model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import tiny_model

    folder = tmp_path_factory.mktemp(f"tp-{request.param}")
    if request.param != "llama":
        return str(tiny_model(request.param, folder, dtype=torch.bfloat16, tokenizer=False))
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in TP_SHAPE.items() if k not in ("architectures", "torch_dtype")})
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return str(folder)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
async def test_tensor_parallel_two_equals_one(tp_model_dir):
    steered, last = 1, json.loads((Path(tp_model_dir) / "config.json").read_text())
    last = last.get("num_hidden_layers", last.get("n_layer")) - 1
    results = []
    for tp in (1, 2):
        engine = make_engine(tp_model_dir, eager=False, tp=tp, load_format="auto")
        try:
            vector = torch.randn(engine.hidden_size, generator=torch.Generator().manual_seed(9))
            steer = SteeringSpec({steered: LayerSteeringSpec(add=AddSpec(vector, scale=2.0))})
            _, handles = await engine.generate(
                [PROMPTS[2], PROMPTS[2]], GREEDY, capture_layers=[steered, last], steering_spec=[steer, None]
            )
            await engine.fetch_captures_batch(handles)
            results.append(handles)
        finally:
            engine.close()
    rows = len(PROMPTS[2])  # prompt rows: the same tokens in every run
    for layer in (steered, last):
        one, two = ([handle.hidden(layer)[:rows].float() for handle in handles] for handles in results)
        for a, b in zip(one, two):  # TP=2 computes the same residual stream as TP=1
            assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item() > 0.99, layer
        # ... and steering moves it the same way.
        delta_one, delta_two = one[0] - one[1], two[0] - two[1]
        assert delta_one.norm() > 1.0
        assert torch.nn.functional.cosine_similarity(delta_one, delta_two, dim=-1).min().item() > 0.99, layer
    for handles in results:
        assert all(len(handle.captures[steered]) == 1 for handle in handles)  # recorded once, not per rank
