"""The steering and capture fields of a request body, checked against the model.

``/v1/completions`` and ``/v1/chat/completions`` take two fields beside
vLLM's own:

- ``steering``: a spec dict as ``SteeringSpec.to_dict()`` writes it (vectors
  as lists of floats or base64 float32), or a reference to a name the server
  knows (``SpecStore``): ``{"name": "joy", "scale": 4.0}``, or just
  ``"joy"``. A named spec runs as saved, ``scale`` replacing the scale of
  each of its add ops. A named library vector runs as an add at ``layer``
  (default: the layer in its metadata) with ``scale`` (default 1.0) at
  ``positions`` (default ``"all"``). ``null`` or ``{}`` is no steering.
- ``capture_layers``: layer indices to capture (an int for one layer).

Each parser raises a typed ``WorkbenchError`` naming the bad value, before
the request reaches vLLM; the server answers it with HTTP 400.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from workbench.errors import CaptureError, LayerIndexError, SpecError
from workbench.remote import ROLE_TARGETING_NOT_SERVED
from workbench.serve.request_body import decode_field
from workbench.serve.spec_store import SPEC, SpecStore
from workbench.specs import AddSpec, LayerSteeringSpec, SteeringSpec, check_layer_index

STEERING_FIELD = "steering"
CAPTURE_FIELD = "capture_layers"
FIELDS = (STEERING_FIELD, CAPTURE_FIELD)

NAMED_KEYS = ("name", "scale", "layer", "positions")


@dataclass(frozen=True)
class ModelShape:
    """What specs and layers are checked against."""

    hidden_size: int
    layer_count: int
    dtype: torch.dtype


def parse_steering(value: Any, model: ModelShape, store: SpecStore) -> SteeringSpec:
    """The spec a request's ``steering`` field asks for (empty for ``null`` / ``{}``)."""
    if value is None or (isinstance(value, Mapping) and not value):
        return SteeringSpec()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise SpecError(f"steering must be a spec dict, a name, or {{'name': ..., 'scale': ...}}; got {value!r:.80}")
    if "name" in value:
        spec = _named(value, store)
    elif "layers" in value:
        spec = SteeringSpec.from_dict(value)
    else:
        raise SpecError(
            f"steering needs 'layers' (a spec dict) or 'name' (a stored spec or vector); got keys {sorted(value)}"
        )
    spec.validate_for(model.hidden_size, model.layer_count, model.dtype)
    if spec.needs_messages:
        raise SpecError(ROLE_TARGETING_NOT_SERVED)
    return spec


class RecentSpecs:
    """Steering fields parsed lately, remembered by their JSON text as sent:
    ``parse_steering`` with the ``size`` most recently used kept (their texts
    ``text_bytes`` at most in total).

    An evaluation sends the same steering with every prompt. Decoding and
    checking a spec with a vector on each of 32 layers of 4096 took ~5 ms of
    the server's event loop per request (the loop that also streams every
    reply), and checking a named one ~0.7 ms (~2.5 ms with a scale). A
    repeated text is looked up instead (~0.2 ms for 700 kB: hashing and
    comparing it); a name is remembered by its text and by the version of
    the file it names, so a spec replaced over HTTP is read anew. The same
    spec written differently (spacing, key order) is parsed once per text.
    """

    def __init__(self, size: int = 64, text_bytes: int = 64 << 20) -> None:
        self.size = size
        self.text_bytes = text_bytes
        self._specs: collections.OrderedDict[bytes, tuple[SteeringSpec, str | None, Hashable]] = (
            collections.OrderedDict()
        )
        """text -> (its spec, the name it refers to or None, that name's version when parsed)"""
        self._held = 0

    def parse(self, text: bytes, model: ModelShape, store: SpecStore) -> SteeringSpec:
        """The spec of a ``steering`` field's JSON text."""
        hit = self._specs.get(text)
        if hit is not None and (hit[1] is None or store.version(hit[1]) == hit[2]):
            self._specs.move_to_end(text)
            return hit[0]
        value = decode_field(text, STEERING_FIELD)
        name = _referenced_name(value)
        version = None if name is None else store.version(name)
        spec = parse_steering(value, model, store)
        if hit is None:
            self._held += len(text)
        self._specs[text] = (spec, name, version)
        self._specs.move_to_end(text)
        while len(self._specs) > self.size or self._held > self.text_bytes:
            oldest, _ = self._specs.popitem(last=False)
            self._held -= len(oldest)
        return spec


def _referenced_name(value: Any) -> str | None:
    """The stored name a ``steering`` value refers to: a name, or a reference's ``name``."""
    if isinstance(value, Mapping):
        value = value.get("name")
    return value if isinstance(value, str) else None


def _named(reference: Mapping[str, Any], store: SpecStore) -> SteeringSpec:
    unknown = sorted(set(reference) - set(NAMED_KEYS))
    if unknown:
        raise SpecError(f"steering by name takes {list(NAMED_KEYS)}; unknown keys {unknown}")
    name, scale = reference["name"], reference.get("scale")
    entry = store.find(name)
    if entry.kind == SPEC:
        fixed = [key for key in ("layer", "positions") if reference.get(key) is not None]
        if fixed:
            raise SpecError(f"spec {name!r} fixes its own layers and positions; {fixed} apply to library vectors")
        spec = store.load_spec(entry)
        return spec if scale is None else _with_add_scale(spec, scale, name)
    vector, metadata = store.load_vector(entry)
    layer = reference.get("layer", metadata.get("layer"))
    if layer is None:
        raise LayerIndexError(f"vector {name!r} has no layer in its metadata; give 'layer' with its name")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise LayerIndexError(f"steering layer must be a non-negative int, got {layer!r}")
    add = AddSpec(vector, scale=1.0 if scale is None else scale, positions=reference.get("positions") or "all")
    return SteeringSpec({layer: LayerSteeringSpec(add=add)})


def _with_add_scale(spec: SteeringSpec, scale: Any, name: str) -> SteeringSpec:
    """``spec`` with every add op's scale replaced by ``scale``."""
    layers = {
        index: replace(layer, add=AddSpec(layer.add.vector, scale=scale, positions=layer.add.positions))
        for index, layer in spec.layers.items()
        if layer.add is not None
    }
    if not layers:
        raise SpecError(f"spec {name!r} has no add op for 'scale' to set (its ops keep their own parameters)")
    return SteeringSpec({**spec.layers, **layers})


def parse_capture_layers(value: Any, model: ModelShape) -> tuple[int, ...]:
    """The sorted layers a request's ``capture_layers`` field names (none for ``null``)."""
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise CaptureError(f"capture_layers must be a list of layer indices, got {value!r:.80}")
    if not value:
        raise CaptureError("capture_layers is empty; leave it out to capture nothing")
    return tuple(sorted({check_layer_index(layer, model.layer_count) for layer in value}))
