"""Which convention a decoder layer class gets (no engine): claimed by name,
or by module and name for a class whose name says nothing of its model."""

from __future__ import annotations

import types

import pytest
from torch import nn

from workbench import UnsupportedModelError
from workbench.runtime.layer_conventions import HF_LAYER, PAIR_SUM, SINGLE, convention_of


def layer_class(name: str, module: str) -> nn.Module:
    return types.new_class(name, (nn.Module,), exec_body=lambda ns: ns.update(__module__=module))()


def test_a_layer_is_claimed_by_its_class_name():
    assert convention_of(layer_class("LlamaDecoderLayer", "vllm.model_executor.models.llama"), False) is PAIR_SUM
    assert convention_of(layer_class("GPT2Block", "vllm.model_executor.models.gpt2"), False) is SINGLE


def test_a_generic_class_name_is_claimed_only_in_its_models_module():
    gpt_oss = layer_class("TransformerBlock", "vllm.model_executor.models.gpt_oss")
    assert convention_of(gpt_oss, False) is PAIR_SUM
    with pytest.raises(UnsupportedModelError, match=r"other_model\.TransformerBlock"):
        convention_of(layer_class("TransformerBlock", "vllm.model_executor.models.other_model"), False)


def test_any_layer_under_the_transformers_backend_is_a_hugging_face_layer():
    assert convention_of(layer_class("SomeDecoderLayer", "transformers.models.some"), True) is HF_LAYER
