"""The logit lens: residual-stream rows read out through the model's own final
norm and unembedding, in the workers, where those weights already are.

For rows captured after some layer, ``top_tokens`` applies the final norm
(the one vLLM's model applies after its last layer) and vLLM's own
``compute_logits`` (lm head, logit scaling and soft-capping, tensor-parallel
gather), then keeps the ``k`` most probable next tokens of each row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from workbench.errors import UnsupportedModelError

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
"""What models call the norm after their last layer, beside their layer list."""


def final_norm(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The norm applied after the last decoder layer: a sibling of ``layers``."""
    for owner in model.modules():
        if any(child is layers for child in owner.children()):
            for name in FINAL_NORM_NAMES:
                norm = getattr(owner, name, None)
                if isinstance(norm, nn.Module):
                    return norm
    raise UnsupportedModelError(
        f"{type(model).__name__} has no final norm named one of {FINAL_NORM_NAMES} beside its layers; "
        "the logit lens needs it"
    )


@torch.inference_mode()
def top_tokens(model: Any, norm: nn.Module, rows: Tensor, k: int) -> dict[str, list[list[Any]]] | None:
    """``{"ids", "probs"}``: the ``k`` most probable next tokens of each row
    (``[N, H]``), or None on the tensor-parallel ranks that hold no logits."""
    parameter = next(model.parameters())
    hidden = rows.to(device=parameter.device, dtype=parameter.dtype)
    normed = norm(hidden)
    if isinstance(normed, tuple):  # norms that also pass a residual through return a pair
        normed = normed[0]
    logits = model.compute_logits(normed)
    if logits is None:
        return None
    probs, ids = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return {"ids": ids.tolist(), "probs": probs.tolist()}
