"""Named steering from the folders a server was started with (``--steering-dir``).

The folders hold files as the workbench writes them:

- spec files (``SteeringSpec.save``): ``<name>.safetensors``, a whole spec;
- library vectors (``VectorLibrary.save``): ``<name>.safetensors`` beside
  ``<name>.json``, one vector and its metadata (the layer it was extracted at, ...).

A name is looked up in the folders in order (the first one holding it
wins). Specs can be written and deleted over HTTP, in the first folder;
vectors are read-only there (the workbench's vector library writes them).
Files are read when a request names them and kept while their size and
modification time stay the same, so files written beside a running server
are picked up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from workbench.errors import SpecError, SpecNotFoundError
from workbench.specs import SteeringSpec, encode_vector
from workbench.vector_library import VectorLibrary, check_name

SPEC = "spec"
VECTOR = "vector"


@dataclass(frozen=True)
class StoredEntry:
    """One name in the store: a spec file or a library vector."""

    name: str
    kind: str
    """``"spec"`` or ``"vector"``."""
    path: Path
    writable: bool
    """In the first folder (PUT and DELETE act there)."""


class SpecStore:
    """Specs and vectors by name, from ``folders`` (the first is where specs are written)."""

    def __init__(self, folders: Sequence[str | os.PathLike[str]]) -> None:
        self.folders = [Path(folder) for folder in folders]
        self._cache: dict[Path, tuple[tuple[int, int, int], Any]] = {}

    def _entry(self, folder: Path, name: str) -> StoredEntry | None:
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        kind = VECTOR if path.with_suffix(".json").is_file() else SPEC
        return StoredEntry(name, kind, path, writable=folder == self.folders[0])

    def entries(self) -> list[StoredEntry]:
        """Every name, sorted; a name in an earlier folder hides the same name in a later one."""
        found: dict[str, StoredEntry] = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.safetensors")):
                entry = self._entry(folder, path.stem)
                if entry is not None and path.stem not in found:
                    found[path.stem] = entry
        return [found[name] for name in sorted(found)]

    def find(self, name: Any) -> StoredEntry:
        check_name(name, "steering")
        for folder in self.folders:
            entry = self._entry(folder, name)
            if entry is not None:
                return entry
        known = [entry.name for entry in self.entries()]
        where = ", ".join(str(folder) for folder in self.folders) or "no --steering-dir given"
        raise SpecNotFoundError(
            f"no spec or vector named {name!r} ({where}); known: {known[:20]}" + (" ..." if len(known) > 20 else "")
        )

    def version(self, name: Any) -> tuple[Path, tuple[int, int, int]]:
        """Which file ``name`` is now, and its version: changed when the name
        is written, deleted or shadowed."""
        path = self.find(name).path
        return path, _stamp(path)

    def _cached(self, path: Path, load: Any) -> Any:
        key = _stamp(path)
        hit = self._cache.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = load()
        self._cache[path] = (key, value)
        return value

    def load_spec(self, entry: StoredEntry) -> SteeringSpec:
        return self._cached(entry.path, lambda: SteeringSpec.load(entry.path))

    def load_vector(self, entry: StoredEntry) -> tuple[Tensor, dict[str, Any]]:
        return self._cached(entry.path, lambda: VectorLibrary(entry.path.parent).load(entry.name))

    def put(self, name: Any, spec: SteeringSpec) -> bool:
        """Write ``spec`` under ``name`` in the first folder, atomically; True if the name is new there."""
        if not self.folders:
            raise SpecError("this server has no --steering-dir to write specs into")
        check_name(name, "spec")
        folder = self.folders[0]
        existing = self._entry(folder, name)
        if existing is not None and existing.kind == VECTOR:
            raise SpecError(f"{name!r} names a library vector in {folder}; choose another name for the spec")
        folder.mkdir(parents=True, exist_ok=True)
        spec.save(folder / f"{name}.safetensors")
        return existing is None

    def delete(self, name: Any) -> None:
        """Delete the spec file ``name`` from the first folder."""
        entry = self.find(name)
        if entry.kind != SPEC or not entry.writable:
            raise SpecError(
                f"{name!r} is a {entry.kind} in {entry.path.parent}; only spec files in "
                f"{self.folders[0]} can be deleted over HTTP"
            )
        entry.path.unlink(missing_ok=True)
        self._cache.pop(entry.path, None)

    def describe(self, entry: StoredEntry, with_vectors: bool = False) -> dict[str, Any]:
        """A JSON-able summary (``with_vectors``: the spec dict or vector too, vectors in base64)."""
        summary: dict[str, Any] = {"name": entry.name, "kind": entry.kind, "writable": entry.writable}
        try:
            if entry.kind == SPEC:
                spec = self.load_spec(entry)
                summary["layers"] = {
                    str(index): [name for name, _ in layer.ops()] for index, layer in spec.layers.items()
                }
                summary["hidden_size"] = spec.hidden_size
                if with_vectors:
                    summary["spec"] = spec.to_dict(vector_format="base64")
            else:
                vector, metadata = self.load_vector(entry)
                summary["hidden_size"] = vector.numel()
                summary["metadata"] = metadata
                if with_vectors:
                    summary["vector"] = encode_vector(vector)
        except SpecError as exc:
            summary["error"] = str(exc)
        return summary


def _stamp(path: Path) -> tuple[int, int, int]:
    """A file's version: a write (a new file renamed into place) changes its inode
    even within the file system's timestamp granularity."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size
