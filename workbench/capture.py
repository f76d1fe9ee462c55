"""Captured activations as the caller sees them.

``CaptureHandle`` is what ``generate``/``chat`` return per capturing request:
the request's identity and token ids, and after ``await handle.fetch()`` (or
``VLLMSteerModel.fetch_captures_batch`` for many) its tensors. A handle
releases its data when closed or garbage-collected, fetched or not. (The
worker side, which records the rows, is ``workbench.runtime.capture_store``.)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from workbench.errors import CaptureError, CaptureIndexError, CaptureNotFetchedError, HandleReleasedError


class _Fetcher(Protocol):
    def fetch_captures_batch(self, handles: Sequence[CaptureHandle]) -> Coroutine[Any, Any, None]: ...


@dataclass(frozen=True)
class MessageBoundary:
    """Where one chat message sits in the formatted prompt (token rows ``[start, end)``)."""

    role: str
    content: str
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def start_token(self) -> int:
        """``start`` under the design project's name."""
        return self.start

    @property
    def end_token(self) -> int:
        """``end`` under the design project's name."""
        return self.end


@dataclass(eq=False)
class CaptureHandle:
    """One request's capture. ``captures[layer][0]["hidden"]`` is a CPU tensor of
    shape ``[prompt_tokens + generated_tokens - 1, hidden_size]`` (prefill rows,
    then one row per decode step; the last sampled token is never run through
    the model). The list has one entry because tensor-parallel ranks hold the
    same residual stream; only rank 0 records it.
    """

    request_id: str
    capture_id: str
    layer_indices: tuple[int, ...]
    prompt_token_ids: tuple[int, ...]
    generated_token_ids: tuple[int, ...] = ()
    message_boundaries: tuple[MessageBoundary, ...] = ()
    _data: dict[int, list[dict[str, Tensor]]] | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)
    _finalizer: weakref.finalize | None = field(default=None, repr=False)
    _model: Callable[[], _Fetcher | None] = field(default=lambda: None, repr=False)

    def _attach(self, model: _Fetcher, release: Callable[[str], None]) -> None:
        """Fetch through ``model`` (held weakly), and free the worker-side rows
        with ``release`` if this handle is dropped unfetched."""
        self._model = weakref.ref(model)
        self._finalizer = weakref.finalize(self, release, self.capture_id)

    @property
    def expected_rows(self) -> int:
        return len(self.prompt_token_ids) + max(len(self.generated_token_ids) - 1, 0)

    @property
    def is_fetched(self) -> bool:
        return self._data is not None

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def fetch(self) -> dict[int, list[dict[str, Tensor]]]:
        """Fetch this capture's rows (once; later calls return the same ``captures``)."""
        if self._data is None:
            if self._closed:
                raise HandleReleasedError(f"capture handle {self.capture_id} was closed")
            model = self._model()
            if model is None:
                raise HandleReleasedError(f"the model of capture handle {self.capture_id} is gone")
            await model.fetch_captures_batch([self])
        return self.captures

    def _set_data(self, data: dict[int, Tensor]) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()  # worker rows are gone once fetched
        missing = set(self.layer_indices) - set(data)
        if missing:
            raise CaptureError(f"capture {self.capture_id} came back without layers {sorted(missing)}")
        for layer, hidden in data.items():
            if hidden.shape[0] != self.expected_rows:
                raise CaptureError(
                    f"capture {self.capture_id} layer {layer} has {hidden.shape[0]} rows, "
                    f"expected {self.expected_rows} (prompt {len(self.prompt_token_ids)} + "
                    f"generated {len(self.generated_token_ids)} - 1)"
                )
        self._data = {layer: [{"hidden": hidden}] for layer, hidden in data.items()}

    @property
    def captures(self) -> dict[int, list[dict[str, Tensor]]]:
        """``{layer: [{"hidden": tensor}]}``; raises until fetched and after ``close()``."""
        if self._closed:
            raise HandleReleasedError(f"capture handle {self.capture_id} was closed")
        if self._data is None:
            raise CaptureNotFetchedError(
                f"Captures not fetched yet (capture {self.capture_id}); "
                "call `await handle.fetch()` or `await model.fetch_captures_batch(handles)` first"
            )
        return self._data

    def hidden(self, layer: int) -> Tensor:
        """Shortcut for ``captures[layer][0]["hidden"]`` with a clear error for a layer not captured."""
        if layer not in self.layer_indices:
            raise CaptureIndexError(f"layer_idx {layer!r} is not in captured layers {list(self.layer_indices)}")
        return self.captures[layer][0]["hidden"]

    def get_message_activations(self, message_idx: int, layer_idx: int, include_generated: bool = False) -> Tensor:
        """Rows of one chat message (see ``workbench.chat`` for how template
        tokens are assigned); with ``include_generated`` the last message's
        slice runs on through the generated tokens."""
        if not self.message_boundaries:
            raise CaptureError("this capture has no message boundaries; they come with model.chat()")
        count = len(self.message_boundaries)
        if isinstance(message_idx, bool) or not isinstance(message_idx, int) or not -count <= message_idx < count:
            raise CaptureIndexError(f"message_idx {message_idx!r} is out of range for {count} messages")
        index = message_idx % count
        boundary = self.message_boundaries[index]
        hidden = self.hidden(layer_idx)
        if not include_generated:
            return hidden[boundary.start : boundary.end]
        if index != count - 1:
            raise CaptureError(
                f"include_generated=True only applies to the last message ({count - 1}), not {message_idx}"
            )
        return hidden[boundary.start :]

    def close(self) -> None:
        """Free this capture's memory here and in the workers (safe to call again)."""
        self._data = None
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    async def __aenter__(self) -> CaptureHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
