"""A folder of named steering vectors: ``<name>.safetensors`` holds the tensor,
``<name>.json`` its metadata (model, layer, method, date, ...). Both are
written atomically and read without executing code.

Example::

    library = VectorLibrary("vectors/")
    library.save("joy", contrast_vector)          # a ContrastVector or a plain tensor + metadata
    vector, metadata = library.load("joy")
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from workbench.contrast import ContrastVector
from workbench.errors import SpecError
from workbench.files import atomic_path, atomic_write_text
from workbench.specs import as_vector

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(name: Any, kind: str = "vector") -> str:
    """``name`` if it can name a file in a folder of vectors or specs (never a path), else ``SpecError``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith((".json", ".safetensors")):
        raise SpecError(f"{kind} name {name!r} must be letters, digits, '_', '-' or '.', not a path")
    return name


class VectorLibrary:
    """Named vectors with metadata in one folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _paths(self, name: str) -> tuple[Path, Path]:
        check_name(name, "vector")
        return self.root / f"{name}.safetensors", self.root / f"{name}.json"

    def save(self, name: str, vector: Tensor | ContrastVector, **metadata: Any) -> Path:
        """Store ``vector`` under ``name`` (replacing an older one); returns the tensor file."""
        tensor_path, meta_path = self._paths(name)
        if isinstance(vector, ContrastVector):
            metadata = {**vector.metadata(), **metadata}
            vector = vector.vector
        tensor = as_vector(vector, f"vector {name!r}")
        record = {
            "name": name,
            "hidden_size": tensor.numel(),
            "saved": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        record.update(metadata)
        try:
            text = json.dumps(record, indent=2, sort_keys=True)
        except TypeError as exc:
            raise SpecError(f"metadata of {name!r} is not JSON-able: {exc}") from exc
        with atomic_path(tensor_path) as tmp:
            save_file({"vector": tensor}, tmp)
        atomic_write_text(meta_path, text + "\n")
        return tensor_path

    def load(self, name: str) -> tuple[Tensor, dict[str, Any]]:
        """``(vector, metadata)`` of ``name``."""
        tensor_path, meta_path = self._paths(name)
        try:
            tensor = load_file(tensor_path)["vector"]
            metadata = json.loads(meta_path.read_text())
        except FileNotFoundError as exc:
            raise SpecError(f"no vector named {name!r} in {self.root}") from exc
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
            raise SpecError(f"vector {name!r} in {self.root} is unreadable: {exc}") from exc
        return as_vector(tensor, f"vector {name!r}"), metadata

    def names(self) -> list[str]:
        """Names of the stored vectors, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(path.stem for path in self.root.glob("*.safetensors") if path.with_suffix(".json").exists())

    def delete(self, name: str) -> None:
        for path in self._paths(name):
            path.unlink(missing_ok=True)
