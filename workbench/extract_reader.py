"""Reading an extraction folder back (what ``model.extract`` wrote): lazily, shard by shard.

``ActivationReader(folder)`` reads the index and the shards' JSON (token
ids, offsets); the tensors stay on disk until asked for, and each shard is
opened with ``safetensors.safe_open`` the first time one of its rows is.
Only shards the index names are read, so a folder whose extraction was
interrupted reads as the prompts finished so far.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from workbench.capture import MessageBoundary
from workbench.errors import CaptureIndexError, ExtractError
from workbench.extract import FORMAT, INDEX_NAME, tensor_name

OPEN_SHARDS = 16
"""Shards kept open at once (each holds a file descriptor and a mapping)."""


@dataclass(frozen=True)
class ExtractedPrompt:
    """One prompt's block of rows: where it lies and what the rows are of.

    Row ``i`` of the block is the residual stream at token position
    ``first_position + i`` of ``prompt_token_ids + generated_token_ids``.
    """

    prompt_id: int
    shard: str
    offset: int
    rows: int
    first_position: int
    prompt_token_ids: tuple[int, ...]
    generated_token_ids: tuple[int, ...]
    message_boundaries: tuple[MessageBoundary, ...]
    nonfinite_layer: int | None

    @property
    def positions(self) -> range:
        """Token positions of the block's rows."""
        return range(self.first_position, self.first_position + self.rows)


class ActivationReader:
    """The rows of an extraction folder, by prompt or by layer.

    Example::

        reader = ActivationReader("acts/")
        reader.index                      # pandas DataFrame, one row per prompt
        reader.rows(0, layer=12)          # [rows, hidden] of prompt 0
        reader.layer(12)                  # every prompt's rows of layer 12, in prompt order
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / INDEX_NAME
        try:
            index = json.loads(path.read_text())
            if index.get("format") != FORMAT:
                raise ExtractError(f"{path} is not a workbench extraction index (format {index.get('format')!r})")
            self.settings: dict[str, Any] = index["settings"]
            self.prompt_count: int = len(index["prompt_keys"])
            shards = index["shards"]
            self._prompts: dict[int, ExtractedPrompt] = {}
            for shard in shards:
                records = json.loads((self.folder / f"{shard['name']}.json").read_text())["records"]
                for record in records:
                    self._prompts[record["prompt_id"]] = _prompt(shard["name"], record)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ExtractError(f"{self.folder} is not a readable extraction ({error})") from error
        self._shards: collections.OrderedDict[str, Any] = collections.OrderedDict()
        """Open shards, most recently used last (at most ``OPEN_SHARDS``)."""

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.settings["layers"])

    @property
    def positions(self) -> str:
        return str(self.settings["positions"])

    @property
    def hidden_size(self) -> int:
        return int(self.settings["hidden_size"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.settings["dtype"])

    @property
    def prompt_ids(self) -> list[int]:
        """The prompts extracted so far, in order."""
        return sorted(self._prompts)

    @property
    def is_complete(self) -> bool:
        return len(self._prompts) == self.prompt_count

    def __len__(self) -> int:
        return len(self._prompts)

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self._prompts

    def prompt(self, prompt_id: int) -> ExtractedPrompt:
        try:
            return self._prompts[prompt_id]
        except (KeyError, TypeError):
            raise CaptureIndexError(
                f"prompt {prompt_id!r} is not in this extraction ({len(self)} of {self.prompt_count} prompts extracted)"
            ) from None

    @property
    def index(self) -> Any:
        """A pandas DataFrame, one row per extracted prompt (by ``prompt_id``):
        shard, offset, rows, first_position, prompt_tokens, generated_tokens,
        messages, nonfinite_layer."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "prompt_id": p.prompt_id,
                    "shard": p.shard,
                    "offset": p.offset,
                    "rows": p.rows,
                    "first_position": p.first_position,
                    "prompt_tokens": len(p.prompt_token_ids),
                    "generated_tokens": len(p.generated_token_ids),
                    "messages": len(p.message_boundaries),
                    "nonfinite_layer": p.nonfinite_layer,
                }
                for p in (self._prompts[i] for i in self.prompt_ids)
            ],
            columns=[
                "prompt_id",
                "shard",
                "offset",
                "rows",
                "first_position",
                "prompt_tokens",
                "generated_tokens",
                "messages",
                "nonfinite_layer",
            ],
        ).set_index("prompt_id")

    def _check_layer(self, layer: int) -> str:
        if layer not in self.layers:
            raise CaptureIndexError(f"layer {layer!r} was not extracted (layers {list(self.layers)})")
        return tensor_name(layer)

    def _shard(self, name: str) -> Any:
        handle = self._shards.get(name)
        if handle is None:
            handle = self._shards[name] = safe_open(str(self.folder / f"{name}.safetensors"), framework="pt")
            while len(self._shards) > OPEN_SHARDS:
                self._shards.popitem(last=False)
        self._shards.move_to_end(name)
        return handle

    def rows(self, prompt_id: int, layer: int) -> Tensor:
        """The rows of one prompt at one layer: ``[rows, hidden]``."""
        key = self._check_layer(layer)
        prompt = self.prompt(prompt_id)
        return self._shard(prompt.shard).get_slice(key)[prompt.offset : prompt.offset + prompt.rows]

    def request(self, prompt_id: int) -> dict[int, Tensor]:
        """One prompt's rows at every extracted layer."""
        return {layer: self.rows(prompt_id, layer) for layer in self.layers}

    def layer(self, layer: int) -> Tensor:
        """Every extracted prompt's rows of ``layer``, in prompt order, as one ``[total rows, hidden]`` tensor."""
        key = self._check_layer(layer)
        by_shard: dict[str, Tensor] = {}
        pieces = []
        for prompt_id in self.prompt_ids:
            prompt = self._prompts[prompt_id]
            if prompt.shard not in by_shard:
                by_shard[prompt.shard] = self._shard(prompt.shard).get_tensor(key)
            pieces.append(by_shard[prompt.shard][prompt.offset : prompt.offset + prompt.rows])
        if not pieces:
            return torch.empty(0, self.hidden_size, dtype=self.dtype)
        return torch.cat(pieces)

    def close(self) -> None:
        """Let go of the open shards."""
        self._shards.clear()

    def __enter__(self) -> ActivationReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prompt(shard: str, record: dict[str, Any]) -> ExtractedPrompt:
    return ExtractedPrompt(
        prompt_id=int(record["prompt_id"]),
        shard=shard,
        offset=int(record["offset"]),
        rows=int(record["rows"]),
        first_position=int(record["first_position"]),
        prompt_token_ids=tuple(record["prompt_token_ids"]),
        generated_token_ids=tuple(record["generated_token_ids"]),
        message_boundaries=tuple(MessageBoundary(**boundary) for boundary in record["messages"]),
        nonfinite_layer=record["nonfinite_layer"],
    )
