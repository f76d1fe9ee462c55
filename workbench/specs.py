"""Steering specs: frozen, validated values describing what to do at each layer.

A ``SteeringSpec`` maps decoder-layer indices to a ``LayerSteeringSpec``, which
holds up to one of each op (``AddSpec``, ``ProjectionCapSpec``,
``AblationSpec``). Specs are validated on construction (finite values,
non-zero directions, ``min <= max``), hold private float32 CPU copies of their
vectors, and round-trip to JSON-able dicts and to safetensors files.
Checks that need the model (hidden size, layer range) are in
``SteeringSpec.validate_for``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from workbench.errors import DtypeRangeError, HiddenSizeError, LayerIndexError, SpecError
from workbench.files import atomic_path
from workbench.ops import MAX_MESSAGE, NORM_LIMIT, OP_NAMES, ROLES, TARGET_CODES

FORMAT_VERSION = 1

_METADATA_KEY = "workbench_steering_spec"
"""Key of a spec file's safetensors metadata holding its ops as JSON."""

POSITIONS = tuple(TARGET_CODES)
"""Which tokens an op acts on: every token, the prompt's, the generated ones,
or (in chat) the tokens of one role's messages (generated tokens are the
assistant's). A message index (an int) targets that message's tokens."""

Positions = str | int

VECTOR_FORMATS = ("list", "base64")
"""How ``to_dict`` writes vectors: JSON lists of floats, or base64 of their
little-endian float32 bytes (a quarter of the size, and exact)."""


def _tensor_name(layer: int | str, op: str) -> str:
    return f"layers.{layer}.{op}.vector"


def as_vector(value: Any, name: str) -> Tensor:
    """A private float32 CPU copy of a 1-D, finite, floating-point vector."""
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SpecError(f"{name} must be a 1-D float tensor, got {type(value).__name__}") from exc
    if value.dtype.is_complex or not value.dtype.is_floating_point:
        raise SpecError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.is_meta:
        raise SpecError(f"{name} is on the meta device and has no values")
    if value.ndim != 1 or value.numel() == 0:
        raise SpecError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(value.shape)}")
    vector = value.detach().to(device="cpu", dtype=torch.float32).clone()
    if not torch.isfinite(vector).all():
        bad = int((~torch.isfinite(vector)).nonzero()[0])
        raise SpecError(f"{name} has a non-finite value {vector[bad].item()} at index {bad}")
    return vector


def encode_vector(vector: Tensor) -> str:
    """Base64 of a vector's little-endian float32 bytes (``decode_vector`` inverts it)."""
    return base64.b64encode(vector.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode("ascii")


def decode_vector(text: str, name: str) -> Tensor:
    """The float32 vector whose little-endian bytes ``text`` holds in base64."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SpecError(f"{name} is a string but not valid base64: {exc}") from exc
    if not raw or len(raw) % 4:
        raise SpecError(f"{name} decodes to {len(raw)} bytes; base64 vectors hold float32 values (4 bytes each)")
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()


def as_direction(value: Any, name: str) -> Tensor:
    """``as_vector`` normalised to unit length; a zero vector has no direction.

    A vector already of unit length (to float32 precision) is kept as is, so
    saving and reloading a spec gives back identical directions.
    """
    vector = as_vector(value, name)
    norm = torch.linalg.vector_norm(vector.double())
    if norm == 0 or not torch.isfinite(norm):
        raise SpecError(f"{name} has norm {norm.item()}; a direction must be non-zero")
    if abs(norm.item() - 1.0) < 1e-6:
        return vector
    return (vector.double() / norm).float()


def _finite(value: Any, name: str) -> float:
    if isinstance(value, (bool, str, bytes)):  # float() takes these; as a scale they are mistakes
        raise SpecError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise SpecError(f"{name} must be finite, got {number}")
    return number


def _positions(value: Any, name: str) -> Positions:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_MESSAGE:
            raise SpecError(f"{name}: message index {value} is outside 0..{MAX_MESSAGE}")
        return value
    if value not in POSITIONS:
        raise SpecError(f"{name} must be one of {POSITIONS} or a message index, got {value!r}")
    return value


def needs_messages(positions: Positions) -> bool:
    """Whether ``positions`` names chat roles or messages (and so needs a chat's message boundaries)."""
    return isinstance(positions, int) or positions in ROLES


def check_layer_index(index: Any, layer_count: int) -> int:
    """``index`` if it names one of ``layer_count`` layers, else ``LayerIndexError``."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise LayerIndexError(f"layer index must be an int, got {index!r}")
    if not 0 <= index < layer_count:
        raise LayerIndexError(
            f"layer {index} is out of range for a model with {layer_count} layers (valid: 0..{layer_count - 1})"
        )
    return index


def _same_vector(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


@dataclass(frozen=True, eq=False)
class AddSpec:
    """Add ``vector * scale`` to the residual stream (at ``positions``)."""

    vector: Tensor
    scale: float = 1.0
    positions: Positions = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", as_vector(self.vector, "AddSpec.vector"))
        object.__setattr__(self, "scale", _finite(self.scale, "AddSpec.scale"))
        _positions(self.positions, "AddSpec.positions")
        if not torch.isfinite(self.effect).all():
            raise DtypeRangeError(f"AddSpec: vector x scale ({self.scale:g}) overflows float32")

    @property
    def effect(self) -> Tensor:
        """The vector actually added."""
        return self.vector * self.scale

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, AddSpec)
            and (self.scale, self.positions) == (other.scale, other.positions)
            and _same_vector(self.vector, other.vector)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable tensor inside


@dataclass(frozen=True, eq=False)
class ProjectionCapSpec:
    """Clamp the projection on ``vector`` (normalised) to ``[min, max]``; ``None`` leaves a side open."""

    vector: Tensor
    min: float | None = None
    max: float | None = None
    positions: Positions = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", as_direction(self.vector, "ProjectionCapSpec.vector"))
        _positions(self.positions, "ProjectionCapSpec.positions")
        low = None if self.min is None else _finite(self.min, "ProjectionCapSpec.min")
        high = None if self.max is None else _finite(self.max, "ProjectionCapSpec.max")
        if low is None and high is None:
            raise SpecError("ProjectionCapSpec needs min, max or both; got neither")
        if low is not None and high is not None and low > high:
            raise SpecError(f"ProjectionCapSpec.min ({low}) is greater than max ({high})")
        object.__setattr__(self, "min", low)
        object.__setattr__(self, "max", high)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ProjectionCapSpec)
            and (self.min, self.max, self.positions) == (other.min, other.max, other.positions)
            and _same_vector(self.vector, other.vector)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class AblationSpec:
    """Scale the component along ``vector`` (normalised) by ``scale``: 0 removes it, 1 keeps it."""

    vector: Tensor
    scale: float = 0.0
    positions: Positions = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", as_direction(self.vector, "AblationSpec.vector"))
        object.__setattr__(self, "scale", _finite(self.scale, "AblationSpec.scale"))
        _positions(self.positions, "AblationSpec.positions")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, AblationSpec)
            and (self.scale, self.positions) == (other.scale, other.positions)
            and _same_vector(self.vector, other.vector)
        )

    __hash__ = None  # type: ignore[assignment]


_OPS: dict[str, type] = dict(zip(OP_NAMES, (AddSpec, ProjectionCapSpec, AblationSpec)))


@dataclass(frozen=True)
class LayerSteeringSpec:
    """The ops of one layer, applied in the order add, projection cap, ablation."""

    add: AddSpec | None = None
    projection_cap: ProjectionCapSpec | None = None
    ablation: AblationSpec | None = None

    def __post_init__(self) -> None:
        for name, kind in _OPS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise SpecError(f"LayerSteeringSpec.{name} must be a {kind.__name__}, got {type(value).__name__}")

    def is_empty(self) -> bool:
        return self.add is None and self.projection_cap is None and self.ablation is None

    def ops(self) -> Iterator[tuple[str, AddSpec | ProjectionCapSpec | AblationSpec]]:
        """The ops that are set, as ``(name, spec)`` pairs."""
        for name in _OPS:
            value = getattr(self, name)
            if value is not None:
                yield name, value


def _check_range(index: int, layer: LayerSteeringSpec, dtype: torch.dtype) -> None:
    """``DtypeRangeError`` for a value of ``layer``'s ops that the model's
    residual stream cannot hold: a value beyond ``dtype``'s maximum, or a
    vector or bound beyond ``ops.NORM_LIMIT``, the norm at which the next
    layer's norm overflows (the reply would come back empty)."""
    name = str(dtype).removeprefix("torch.")
    largest = torch.finfo(dtype).max
    values: list[tuple[str, float, float]] = []
    """(what, its magnitude, the largest it may be)."""
    if layer.add is not None:
        effect = layer.add.effect
        at = int(effect.abs().argmax())
        values.append((f"the added vector (vector x scale) at index {at}", abs(effect[at].item()), largest))
        values.append(("the added vector's norm", float(torch.linalg.vector_norm(effect.double())), NORM_LIMIT))
    if layer.projection_cap is not None:
        cap = layer.projection_cap
        for side, bound in (("min", cap.min), ("max", cap.max)):
            if bound is not None:
                values.append((f"the cap's {side}", abs(bound), min(largest, NORM_LIMIT)))
    if layer.ablation is not None:
        values.append(("the ablation scale", abs(layer.ablation.scale), largest))
    for what, value, limit in values:
        if value > limit:
            raise DtypeRangeError(
                f"layer {index}: {what} is {value:.3g}, beyond what the model's {name} residual stream holds "
                f"(at most {limit:.3g}: {name}'s largest value is {largest:.3g}, and the next layer's norm "
                f"overflows on rows of norm above {NORM_LIMIT:.3g}, so the reply would come back empty)"
            )


@dataclass(frozen=True)
class SteeringSpec:
    """Steering of a whole model: layer index -> ``LayerSteeringSpec``.

    Layers whose spec is empty are dropped, so two specs that steer the same
    way compare equal. Example::

        spec = SteeringSpec(layers={4: LayerSteeringSpec(add=AddSpec(vec, scale=8.0))})
    """

    layers: Mapping[int, LayerSteeringSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cleaned: dict[int, LayerSteeringSpec] = {}
        for index, layer in dict(self.layers).items():
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise LayerIndexError(f"layer index must be a non-negative int, got {index!r}")
            if not isinstance(layer, LayerSteeringSpec):
                raise SpecError(f"layer {index} must map to a LayerSteeringSpec, got {type(layer).__name__}")
            if not layer.is_empty():
                cleaned[index] = layer
        sizes = {vec.numel() for layer in cleaned.values() for _, op in layer.ops() for vec in [op.vector]}
        if len(sizes) > 1:
            raise HiddenSizeError(f"vectors in one SteeringSpec have different sizes: {sorted(sizes)}")
        object.__setattr__(self, "layers", MappingProxyType(dict(sorted(cleaned.items()))))

    def is_empty(self) -> bool:
        return not self.layers

    @property
    def needs_messages(self) -> bool:
        """Whether some op targets chat roles or messages (``needs_messages``)."""
        return any(needs_messages(op.positions) for layer in self.layers.values() for _, op in layer.ops())

    @property
    def hidden_size(self) -> int | None:
        """Size of the vectors, or ``None`` for an empty spec."""
        for layer in self.layers.values():
            for _, op in layer.ops():
                return op.vector.numel()
        return None

    def validate_for(self, hidden_size: int, layer_count: int, dtype: torch.dtype | None = None) -> None:
        """Raise if this spec cannot run on a model of this shape (and, given
        the model's ``dtype``, if a value would not fit its residual stream)."""
        for index in self.layers:
            check_layer_index(index, layer_count)
        size = self.hidden_size
        if size is not None and size != hidden_size:
            raise HiddenSizeError(f"spec vectors have size {size}, the model's hidden size is {hidden_size}")
        if dtype is not None:
            for index, layer in self.layers.items():
                _check_range(index, layer, dtype)

    def with_layer(self, index: int, **ops: Any) -> SteeringSpec:
        """A copy with some ops of one layer replaced (``None`` clears an op)."""
        current = self.layers.get(index, LayerSteeringSpec())
        layers = dict(self.layers)
        layers[index] = replace(current, **ops)
        return SteeringSpec(layers=layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SteeringSpec) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    @cached_property
    def fingerprint(self) -> str:
        """A content hash: equal specs share it; used to share engine slots and prefix-cache salts."""
        scalars, tensors = self.to_parts()
        digest = hashlib.sha256(json.dumps(scalars, sort_keys=True).encode())
        for name, tensor in tensors.items():
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    # -- serialisation ---------------------------------------------------

    def to_parts(self) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, Tensor]]:
        """The spec as its scalars (layer -> op -> parameters, JSON-able) and
        its vectors by tensor name (``layers.<i>.<op>.vector``), the form of
        spec files and of the workers' wire; ``from_parts`` inverts it."""
        scalars: dict[str, dict[str, dict[str, Any]]] = {}
        tensors: dict[str, Tensor] = {}
        for index, layer in self.layers.items():
            ops = scalars[str(index)] = {}
            for name, op in layer.ops():
                ops[name] = {key: value for key, value in vars(op).items() if key != "vector"}
                tensors[_tensor_name(index, name)] = op.vector
        return scalars, tensors

    @classmethod
    def from_parts(
        cls, layers: Mapping[str, Any], tensors: Mapping[str, Tensor], where: str = "steering spec"
    ) -> SteeringSpec:
        """Inverse of ``to_parts``; ``where`` names the source in error messages."""
        if not isinstance(layers, Mapping):
            raise SpecError(f"{where} needs a 'layers' mapping")
        data: dict[str, dict[str, Any]] = {}
        for key, ops in layers.items():
            if not isinstance(ops, Mapping):
                raise SpecError(f"{where}: layer {key!r} must map op names to parameters")
            data[key] = {}
            for name, params in ops.items():
                tensor_name = _tensor_name(key, name)
                if not isinstance(params, Mapping) or tensor_name not in tensors:
                    raise SpecError(f"{where} is missing tensor {tensor_name!r}")
                data[key][name] = {**params, "vector": tensors[tensor_name]}
        return cls.from_dict({"layers": data})

    def to_dict(self, vector_format: str = "list") -> dict[str, Any]:
        """A JSON-able dict; vectors as lists of floats, or with
        ``vector_format="base64"`` as base64 strings of their float32 bytes."""
        if vector_format not in VECTOR_FORMATS:
            raise SpecError(f"vector_format must be one of {VECTOR_FORMATS}, got {vector_format!r}")
        layers, tensors = self.to_parts()
        for index, ops in layers.items():
            for name, params in ops.items():
                vector = tensors[_tensor_name(index, name)]
                params["vector"] = vector.tolist() if vector_format == "list" else encode_vector(vector)
        return {"format_version": FORMAT_VERSION, "layers": layers}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SteeringSpec:
        """Inverse of ``to_dict``; raises ``SpecError`` naming what is malformed.

        A vector may be a list of numbers, a tensor, or a base64 string of
        little-endian float32 bytes (what ``to_dict(vector_format="base64")`` writes).
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), Mapping):
            raise SpecError("a steering spec dict needs a 'layers' mapping")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SpecError(f"unsupported steering spec format_version {version!r}")
        layers: dict[int, LayerSteeringSpec] = {}
        for key, ops in data["layers"].items():
            try:
                index = int(key)
            except (TypeError, ValueError) as exc:
                raise LayerIndexError(f"layer key {key!r} is not an integer") from exc
            if not isinstance(ops, Mapping):
                raise SpecError(f"layer {key!r} must map op names to parameters")
            unknown = set(ops) - set(_OPS)
            if unknown:
                raise SpecError(f"layer {key!r} has unknown ops {sorted(unknown)}; known: {list(_OPS)}")
            built = {}
            for name, params in ops.items():
                if not isinstance(params, Mapping) or "vector" not in params:
                    raise SpecError(f"layer {key!r} op {name!r} needs a 'vector'")
                where = f"layer {key!r} op {name!r}"
                if isinstance(params["vector"], str):
                    params = {**params, "vector": decode_vector(params["vector"], f"{where} vector")}
                try:
                    built[name] = _OPS[name](**params)
                except TypeError as exc:
                    raise SpecError(f"{where}: {exc}") from exc
                except SpecError as exc:  # name the layer too: a dict often comes from a request or a file
                    raise type(exc)(f"{where}: {exc}") from exc
            layers[index] = LayerSteeringSpec(**built)
        return cls(layers=layers)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a safetensors file (vectors as tensors, ops in its JSON metadata), atomically."""
        from safetensors.torch import save_file

        layers, tensors = self.to_parts()
        metadata = {_METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, "layers": layers})}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SteeringSpec:
        """Read a file written by ``save``; never executes code from the file."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = (f.metadata() or {}).get(_METADATA_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise SpecError(f"{path} is not a readable steering spec file: {exc}") from exc
        if meta is None:
            raise SpecError(f"{path} has no {_METADATA_KEY!r} metadata")
        try:
            data = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path} has malformed spec metadata: {exc}") from exc
        if not isinstance(data, dict):
            raise SpecError(f"{path} spec metadata needs a 'layers' mapping")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SpecError(f"{path}: unsupported steering spec format_version {version!r}")
        return cls.from_parts(data.get("layers"), tensors, where=str(path))

    def __repr__(self) -> str:
        if not self.layers:
            return "SteeringSpec(empty)"
        parts = []
        for index, layer in self.layers.items():
            ops = []
            for name, op in layer.ops():
                params = ", ".join(
                    f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in vars(op).items()
                    if k != "vector" and v is not None and v != "all"
                )
                ops.append(f"{name}({params})")
            parts.append(f"{index}: " + " + ".join(ops))
        return "SteeringSpec({" + "; ".join(parts) + "})"
