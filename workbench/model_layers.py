"""Finding a model's decoder layers, for vLLM and Hugging Face models alike.

Models keep their blocks under many names (``model.layers``, ``transformer.h``,
``model.decoder.layers``, ``gpt_neox.layers``, ...), so the layers are found
by structure: the outermost ``ModuleList`` holding as many modules as the
model has layers. A dotted attribute path overrides the search.
"""

from __future__ import annotations

from torch import nn

from workbench.errors import UnsupportedModelError


def decoder_layer_list(model: nn.Module, layer_count: int, path: str | None = None) -> nn.ModuleList:
    """The ``ModuleList`` of ``model``'s ``layer_count`` decoder layers (at ``path``, if given)."""
    if path is not None:
        module: object = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if not isinstance(module, nn.ModuleList) or len(module) != layer_count:
            raise UnsupportedModelError(
                f"{type(model).__name__}.{path} is not a ModuleList of the model's {layer_count} layers"
            )
        return module
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == layer_count
    ]
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no ModuleList of its {layer_count} decoder layers; "
            "name them with VLLMSteeringConfig(layers_path=...) (e.g. 'model.layers')"
        )
    return min(found, key=lambda item: item[0].count("."))[1]


def layer_count_of(config: object) -> int:
    """The number of decoder layers in a Hugging Face config (its text config for multimodal models)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)
