"""Captured rows as one safetensors file: what ``GET /v1/captures/{id}`` returns.

A server capture holds one entry ("choice") per prompt of the request that
asked for it: a completion request with three prompts has choices 0, 1, 2
(the ``index`` of its ``choices``); a chat request has choice 0. The file
is plain safetensors, readable by any safetensors library:

- tensors ``choices.<i>.layers.<layer>``: ``[prompt + generated - 1, hidden]``
  in the model's dtype, the same rows as ``CaptureHandle.captures[layer][0]["hidden"]``
  (prompt tokens, then one row per decode step);
- metadata key ``workbench_capture``: JSON with ``format_version``,
  ``capture_id``, ``layers``, and per choice ``index``,
  ``prompt_token_ids``, ``generated_token_ids``, ``nonfinite_layer`` (the
  layer where steering broke the stream, or null), ``message_boundaries``
  (chat: ``role``, ``content``, ``start``, ``end`` per message) and, for a
  choice whose rows could not be kept, ``error`` (and no tensors).

``CaptureFile.from_bytes(data).handles()`` turns a file into fetched
``CaptureHandle``s (``get_message_activations`` and the rest work on them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from workbench.capture import CaptureHandle, MessageBoundary
from workbench.errors import CaptureError

FORMAT_VERSION = 1
METADATA_KEY = "workbench_capture"
MEDIA_TYPE = "application/vnd.workbench.capture+safetensors"
"""Content type of the file over HTTP."""


def _tensor_name(index: int, layer: int) -> str:
    return f"choices.{index}.layers.{layer}"


@dataclass
class CaptureChoice:
    """The rows of one prompt of a captured request."""

    index: int
    prompt_token_ids: tuple[int, ...]
    generated_token_ids: tuple[int, ...]
    rows: dict[int, Tensor] = field(default_factory=dict)
    """Layer -> ``[prompt + generated - 1, hidden]``."""
    message_boundaries: tuple[MessageBoundary, ...] = ()
    nonfinite_layer: int | None = None
    error: str | None = None
    """Why this choice has no rows (then ``rows`` is empty)."""

    def to_metadata(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "index": self.index,
            "prompt_token_ids": list(self.prompt_token_ids),
            "generated_token_ids": list(self.generated_token_ids),
            "nonfinite_layer": self.nonfinite_layer,
        }
        if self.message_boundaries:
            entry["message_boundaries"] = [
                {"role": b.role, "content": b.content, "start": b.start, "end": b.end} for b in self.message_boundaries
            ]
        if self.error is not None:
            entry["error"] = self.error
        return entry


@dataclass
class CaptureFile:
    """A capture of one request: its layers and one ``CaptureChoice`` per prompt."""

    capture_id: str
    layers: tuple[int, ...]
    choices: list[CaptureChoice]

    def to_bytes(self) -> bytes:
        tensors = {
            _tensor_name(choice.index, layer): rows.contiguous()
            for choice in self.choices
            for layer, rows in choice.rows.items()
        }
        metadata = {
            "format_version": FORMAT_VERSION,
            "capture_id": self.capture_id,
            "layers": list(self.layers),
            "choices": [choice.to_metadata() for choice in self.choices],
        }
        return save_tensors(tensors, metadata={METADATA_KEY: json.dumps(metadata)})

    @classmethod
    def from_bytes(cls, data: bytes) -> CaptureFile:
        """Read a file written by ``to_bytes``; raises ``CaptureError`` naming what is malformed."""
        try:
            header_size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_size])
            metadata = json.loads(header["__metadata__"][METADATA_KEY])
            tensors = load_tensors(data)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # safetensors raises its own ValueError kin
            raise CaptureError(f"not a workbench capture file: {exc}") from exc
        if metadata.get("format_version") != FORMAT_VERSION:
            raise CaptureError(f"unsupported capture file format_version {metadata.get('format_version')!r}")
        layers = tuple(int(layer) for layer in metadata["layers"])
        choices = []
        for entry in metadata["choices"]:
            index = int(entry["index"])
            boundaries = tuple(
                MessageBoundary(b["role"], b["content"], int(b["start"]), int(b["end"]))
                for b in entry.get("message_boundaries", ())
            )
            rows = {
                layer: tensors[_tensor_name(index, layer)] for layer in layers if _tensor_name(index, layer) in tensors
            }
            choices.append(
                CaptureChoice(
                    index=index,
                    prompt_token_ids=tuple(entry["prompt_token_ids"]),
                    generated_token_ids=tuple(entry["generated_token_ids"]),
                    rows=rows,
                    message_boundaries=boundaries,
                    nonfinite_layer=entry.get("nonfinite_layer"),
                    error=entry.get("error"),
                )
            )
        return cls(metadata["capture_id"], layers, choices)

    def handles(self) -> list[CaptureHandle]:
        """One fetched ``CaptureHandle`` per choice; ``CaptureError`` if a choice has no rows."""
        handles = []
        for choice in self.choices:
            if choice.error is not None:
                raise CaptureError(f"capture {self.capture_id} choice {choice.index}: {choice.error}")
            handle = CaptureHandle(
                request_id=f"{self.capture_id}-{choice.index}",
                capture_id=self.capture_id,
                layer_indices=self.layers,
                prompt_token_ids=choice.prompt_token_ids,
                generated_token_ids=choice.generated_token_ids,
                message_boundaries=choice.message_boundaries,
            )
            handle._set_data(choice.rows)
            handles.append(handle)
        return handles
