"""Finding a model's decoder layers, for vLLM and Hugging Face models alike."""

from __future__ import annotations

from torch import nn

from workbench.errors import UnsupportedModelError


def decoder_layer_list(model: nn.Module) -> nn.ModuleList:
    """The outermost ``ModuleList`` named ``layers`` (``model.model.layers`` in
    Llama, Qwen, Mistral and Gemma implementations of both libraries)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "layers" and isinstance(module, nn.ModuleList)
    ]
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no ModuleList named 'layers'; workbench supports "
            "decoder-only models that keep their blocks in one"
        )
    return min(found, key=lambda item: item[0].count("."))[1]
