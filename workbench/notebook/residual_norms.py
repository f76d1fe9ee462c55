"""Each layer's typical residual norm, the unit that makes a steering scale readable.

"Add 8" means little until one knows that the residual stream at that layer
has a norm of about 5 (a large push) or of 500 (barely anything). The typical
norm of a layer is the median token norm there, measured once per model on a
few short conversations without steering (the first, attention-sink token
left out), and cached on disk; ``typical_norms(model, refresh=True)``
measures again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from workbench.files import atomic_write_text
from workbench.specs import SteeringSpec, check_layer_index

if TYPE_CHECKING:
    from workbench.client import VLLMSteerModel

logger = logging.getLogger(__name__)

DEFAULT_CONVERSATIONS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("system", "You are a helpful assistant."), ("user", "Tell me a fact about cats.")),
    (("user", "What is the capital of France, and why is it famous?"),),
    (("system", "You answer briefly."), ("user", "Explain how a bicycle stays upright.")),
    (("user", "Write one sentence about the sea."),),
)
"""What the norms are measured on (role, content), formatted with the model's chat template."""


@dataclass(frozen=True)
class TypicalNorms:
    """Median token norm of the residual stream after each layer, for one model."""

    model: str
    dtype: str
    medians: tuple[float, ...]
    """Per layer, in layer order."""
    tokens: int
    """Tokens per layer the medians were taken over."""
    measured: str
    """When (ISO 8601, UTC)."""

    def at(self, layer: int) -> float:
        return self.medians[check_layer_index(layer, len(self.medians))]


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/workbench/residual-norms`` (default ``~/.cache/...``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "workbench" / "residual-norms"


def cache_path(model_name: str, dtype: str, folder: Path | None = None) -> Path:
    """One file per model path, dtype and measurement prompts."""
    key = json.dumps([model_name, dtype, DEFAULT_CONVERSATIONS])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (folder or cache_dir()) / f"{Path(model_name).name or 'model'}-{digest}.json"


async def measure_typical_norms(model: VLLMSteerModel) -> TypicalNorms:
    """Run the default conversations unsteered (one token each) and take, per
    layer, the median norm over their prompt tokens."""
    conversations = [[{"role": role, "content": text} for role, text in c] for c in DEFAULT_CONVERSATIONS]
    layers = list(range(model.layer_count))
    _, handles = await model.chat(
        conversations, capture_layers=layers, steering_spec=SteeringSpec(), temperature=0.0, max_tokens=1
    )
    await model.fetch_captures_batch(handles)
    medians = []
    for layer in layers:
        norms = torch.cat([torch.linalg.vector_norm(h.hidden(layer)[1:].float(), dim=-1) for h in handles])
        medians.append(float(norms.median()))
    tokens = sum(h.hidden(0).shape[0] - 1 for h in handles)
    for handle in handles:
        handle.close()
    return TypicalNorms(
        model=model.model_name,
        dtype=str(model.dtype).removeprefix("torch."),
        medians=tuple(medians),
        tokens=tokens,
        measured=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def _read(path: Path, layer_count: int) -> TypicalNorms | None:
    try:
        data = json.loads(path.read_text())
        norms = TypicalNorms(**{**data, "medians": tuple(float(m) for m in data["medians"])})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as error:
        logger.warning("ignoring the unreadable residual-norm cache %s: %s", path, error)
        return None
    return norms if len(norms.medians) == layer_count else None


async def typical_norms(model: VLLMSteerModel, refresh: bool = False, folder: Path | None = None) -> TypicalNorms:
    """The model's typical norms: from the cache, or measured (and cached) when
    missing or when ``refresh`` is set."""
    path = cache_path(model.model_name, str(model.dtype).removeprefix("torch."), folder)
    if not refresh and (cached := _read(path, model.layer_count)) is not None:
        return cached
    norms = await measure_typical_norms(model)
    atomic_write_text(path, json.dumps(asdict(norms), indent=1) + "\n")
    return norms
