"""How each kind of decoder layer hands on the residual stream, and how a
steered stream is handed back so that the next layer sees exactly it.

vLLM's decoder layers follow one of a few conventions. A layer is wrapped
only when a convention claims its class, and the model is refused at
start-up otherwise (``UnsupportedModelError``): a layer whose output were
misread would be steered and captured silently wrong.

- ``PAIR_SUM``: ``(hidden_states, residual)`` whose sum is the stream (Llama
  and most pre-norm models: the next layer's fused add-norm forms the sum).
  Handed back as ``(steered, zeros)``, so the next layer sums to ``steered``.
  The zeros are fresh at every call: the fused add-norm writes into its inputs.
- ``STREAM_FIRST``: ``(stream, aux)``; the caller uses ``aux`` at most as the
  next layer's residual argument, which such layers ignore (Cohere passes the
  layer's input, StableLM and EXAONE 4 their mid-layer stream, Gemma 4
  None). Handed back as ``(steered, aux)``.
- ``SINGLE``: the stream as one tensor (Granite, GPT-2, GPT-J, Falcon, ...).
- ``HF_LAYER``: a Hugging Face layer under vLLM's Transformers backend, for
  models vLLM has no native implementation of (OLMo2, GPT-NeoX, ...): the
  stream is ``[1, T, H]``, alone or first in a tuple.

The claims list the vLLM layer classes whose convention the parity tests
check against Hugging Face; a layer's arguments always pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from workbench.errors import UnsupportedModelError


@dataclass(frozen=True)
class LayerConvention:
    """Reads a layer's output as the steering operator's input, and builds the output back."""

    name: str
    summary: str
    split: Callable[[Any], tuple[Tensor, Tensor | None]]
    """Layer output -> ``(out, residual)``: the stream is ``out + residual`` (``out`` alone when None), ``[T, H]``."""
    join: Callable[[Any, Tensor], Any]
    """(layer output, steered ``[T, H]`` stream) -> what the layer hands on."""


PAIR_SUM = LayerConvention(
    "pair-sum",
    "returns (hidden_states, residual) whose sum is the stream",
    split=lambda output: (output[0], output[1]),
    join=lambda output, steered: (steered, torch.zeros_like(steered)),
)
STREAM_FIRST = LayerConvention(
    "stream-first",
    "returns (stream, aux) where aux is no part of the stream",
    split=lambda output: (output[0], None),
    join=lambda output, steered: (steered, *output[1:]),
)
SINGLE = LayerConvention(
    "single",
    "returns the stream as one tensor",
    split=lambda output: (output, None),
    join=lambda output, steered: steered,
)


def _hf_stream(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _hf_join(output: Any, steered: Tensor) -> Any:
    stream = steered.unsqueeze(0)  # the backend runs the batch as one sequence: [1, T, H]
    return (stream, *output[1:]) if isinstance(output, tuple) else stream


HF_LAYER = LayerConvention(
    "hf-layer",
    "a Hugging Face layer under vLLM's Transformers backend: the stream is [1, T, H], alone or first",
    split=lambda output: (_hf_stream(output)[0], None),
    join=_hf_join,
)

CONVENTIONS = (PAIR_SUM, STREAM_FIRST, SINGLE, HF_LAYER)

CLAIMS: dict[str, LayerConvention] = {
    **dict.fromkeys(
        (
            "LlamaDecoderLayer",  # Llama, Phi-3 (vLLM runs Phi3ForCausalLM as Llama)
            "MistralDecoderLayer",
            "Qwen2DecoderLayer",
            "Qwen3DecoderLayer",
            "Qwen2MoeDecoderLayer",
            "Qwen3MoeDecoderLayer",
            "MixtralDecoderLayer",
            "GemmaDecoderLayer",
            "Gemma2DecoderLayer",
            "Gemma3DecoderLayer",
            "OlmoeDecoderLayer",
            "Glm4DecoderLayer",
            "Llama4DecoderLayer",
            "gpt_oss.TransformerBlock",
        ),
        PAIR_SUM,
    ),
    **dict.fromkeys(
        (
            "CohereDecoderLayer",  # Cohere, Cohere2
            "StablelmDecoderLayer",
            "Exaone4DecoderLayer",
            "Gemma4DecoderLayer",  # returns (stream, None)
        ),
        STREAM_FIRST,
    ),
    **dict.fromkeys(
        (
            "GraniteDecoderLayer",
            "GraniteMoeDecoderLayer",
            "GPT2Block",
            "GPTJBlock",
            # vLLM 0.26's native GPT-NeoX, Phi and OLMo 3 (0.32 runs them through the Transformers backend)
            "GPTNeoXLayer",
            "PhiLayer",
            "Olmo3DecoderLayer",
            "FalconDecoderLayer",
            "BloomBlock",
            "OPTDecoderLayer",
        ),
        SINGLE,
    ),
}
"""vLLM layer class name -> its convention (checked against Hugging Face by the parity tests).
A class whose name says nothing of its model is claimed with its module's name (``gpt_oss.TransformerBlock``)."""


def convention_of(layer: nn.Module, hf_backend: bool) -> LayerConvention:
    """The convention of ``layer`` (a layer of vLLM's Transformers backend when ``hf_backend``)."""
    if hf_backend:
        return HF_LAYER
    name = type(layer).__name__
    convention = CLAIMS.get(name) or CLAIMS.get(f"{type(layer).__module__.rsplit('.', 1)[-1]}.{name}")
    if convention is None:
        kinds = "; ".join(f"{c.name}: {c.summary}" for c in CONVENTIONS)
        raise UnsupportedModelError(
            f"workbench cannot steer {type(layer).__module__}.{type(layer).__name__} exactly: no layer "
            f"convention claims it (known conventions: {kinds}; claimed classes: {', '.join(sorted(CLAIMS))})"
        )
    return convention
