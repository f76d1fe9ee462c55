"""The server's captures: ids handed to clients, their rows until fetched, expiry and a memory limit.

A request with ``capture_layers`` gets a capture id before it starts (the
reply carries it); each of its prompts adds a choice whose rows the workers
record while it runs (``EngineLink`` captures). Once the HTTP request is
over, ``take`` turns the rows into a ``CaptureFile`` and frees them (a
second fetch finds nothing); ``discard`` frees them unread. Captures nobody
fetches expire ``ttl_s`` after their request ended. The rows held (running
and unfetched) count against ``memory_limit``: a new capture is refused with
``CaptureLimitError`` while the limit is reached, and a prompt whose rows
would pass it runs without them (its choice reports why), so unfetched
captures never exhaust the host's shared memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workbench import wire
from workbench.capture_file import CaptureChoice, CaptureFile
from workbench.chat import format_conversation, validate_conversation
from workbench.engine_link import EngineLink
from workbench.errors import CaptureLimitError, CapturePendingError, ChatError, HandleReleasedError

logger = logging.getLogger(__name__)

CAPTURE_ID_PREFIX = "cap-"


@dataclass(frozen=True)
class ChatSource:
    """The conversation of a chat request, for message boundaries at fetch."""

    messages: list[dict[str, Any]]
    options: dict[str, Any]


@dataclass
class _Choice:
    index: int
    request: wire.CaptureRequest | None
    """The workers' capture (None when the memory limit refused it)."""
    reserved: int
    """Bytes counted against the limit: the request's capacity while it runs, its rows once finished."""
    refused: str | None = None
    finished: bool = False
    prompt_token_ids: tuple[int, ...] = ()
    generated_token_ids: tuple[int, ...] = ()
    nonfinite_layer: int | None = None


@dataclass
class _Capture:
    capture_id: str
    layers: tuple[int, ...]
    chat: ChatSource | None
    choices: dict[int, _Choice] = field(default_factory=dict)
    open: bool = True
    """Its HTTP request is still being answered (choices may still be added or running)."""
    ended_at: float = 0.0


class CaptureRegistry:
    """Captures by id, from their request's start until fetched, deleted or expired."""

    def __init__(
        self,
        link: EngineLink,
        *,
        ttl_s: float,
        memory_limit: int,
        tokenizer: Callable[[], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._link = link
        self.ttl_s = ttl_s
        self.memory_limit = memory_limit
        self._tokenizer = tokenizer
        self._clock = clock
        self._row_bytes = link.hidden_size * link.dtype.itemsize
        self._captures: dict[str, _Capture] = {}
        self._expiry: asyncio.Task[None] | None = None

    @property
    def held_bytes(self) -> int:
        """Rows held for running and unfetched captures (upper bounds while their requests run)."""
        return sum(choice.reserved for capture in self._captures.values() for choice in capture.choices.values())

    def stats(self) -> dict[str, int]:
        return {"captures": len(self._captures), "held_bytes": self.held_bytes, "memory_limit": self.memory_limit}

    def listing(self) -> list[dict[str, Any]]:
        """The captures held: id, layers, prompts, whether their request still runs, bytes, seconds left."""
        now = self._clock()
        return [
            {
                "id": capture.capture_id,
                "layers": list(capture.layers),
                "prompts": len(capture.choices),
                "running": capture.open,
                "bytes": sum(choice.reserved for choice in capture.choices.values()),
                "expires_in_s": None if capture.open else max(self.ttl_s - (now - capture.ended_at), 0.0),
            }
            for capture in self._captures.values()
        ]

    # -- a request's life ------------------------------------------------------

    def open(self, layers: Sequence[int], chat: ChatSource | None = None, min_rows: int = 1) -> str:
        """A new capture id for a request about to start that will record at least
        ``min_rows`` rows (its ``max_tokens``, say) per layer; refused if those cannot fit."""
        held = self.held_bytes
        if held + min_rows * len(layers) * self._row_bytes > self.memory_limit:
            raise CaptureLimitError(
                f"the server holds {held / 2**30:.2f} GiB of unfetched or running captures, its limit "
                f"(--capture-memory-gib) is {self.memory_limit / 2**30:.2f} GiB: fetch or delete captures "
                f"(or wait up to {self.ttl_s:g} s for unfetched ones to expire) and ask again"
            )
        capture_id = f"{CAPTURE_ID_PREFIX}{uuid.uuid4().hex}"
        self._captures[capture_id] = _Capture(capture_id, tuple(layers), chat)
        return capture_id

    def add_choice(
        self, capture_id: str, index: int, prompt_tokens: int | None, max_tokens: int | None
    ) -> wire.CaptureRequest | None:
        """The workers' capture for prompt ``index`` of ``capture_id``, or None if its rows would pass the limit."""
        capture = self._captures[capture_id]
        request = self._link.capture_request(capture.layers, prompt_tokens, max_tokens)
        needed = request.capacity * len(capture.layers) * self._row_bytes
        held = self.held_bytes
        if held + needed > self.memory_limit:
            refused = (
                f"not recorded: its rows (up to {needed / 2**20:.1f} MiB) would pass the server's capture memory "
                f"limit ({self.memory_limit / 2**30:.2f} GiB, {held / 2**30:.2f} GiB held)"
            )
            capture.choices[index] = _Choice(index, None, 0, refused=refused)
            logger.warning("capture %s prompt %d %s", capture_id, index, refused)
            return None
        capture.choices[index] = _Choice(index, request, needed)
        return request

    def finish_choice(self, capture_id: str, index: int, final: Any, nonfinite_layer: int | None) -> None:
        """Record a finished prompt's token ids (``final`` is vLLM's last ``RequestOutput``)."""
        choice = self._captures[capture_id].choices[index]
        choice.finished = True
        choice.prompt_token_ids = tuple(final.prompt_token_ids)
        choice.generated_token_ids = tuple(final.outputs[0].token_ids)
        choice.nonfinite_layer = nonfinite_layer
        if choice.request is not None:
            rows = len(choice.prompt_token_ids) + max(len(choice.generated_token_ids) - 1, 0)
            choice.reserved = rows * len(self._captures[capture_id].layers) * self._row_bytes

    def end(self, capture_id: str) -> None:
        """The HTTP request is over: the capture can be fetched, and expires in ``ttl_s``.
        Prompts that never finished (an error, a client gone) are dropped; their rows were released."""
        capture = self._captures.get(capture_id)
        if capture is None:
            return
        capture.open = False
        capture.ended_at = self._clock()
        capture.choices = {index: choice for index, choice in capture.choices.items() if choice.finished}
        if not capture.choices:
            del self._captures[capture_id]
        self._start_expiry()

    # -- fetching ----------------------------------------------------------------

    def _get(self, capture_id: str) -> _Capture:
        capture = self._captures.get(capture_id)
        if capture is None:
            raise HandleReleasedError(
                f"capture {capture_id!r} is unknown: never made, already fetched or deleted, "
                f"or expired ({self.ttl_s:g} s after its request ended)"
            )
        if capture.open:
            raise CapturePendingError(f"capture {capture_id!r} is still being recorded: its request is running")
        return capture

    async def take(self, capture_id: str) -> CaptureFile:
        """The capture's rows as a file; the capture is gone afterwards."""
        capture = self._get(capture_id)
        del self._captures[capture_id]
        choices = sorted(capture.choices.values(), key=lambda choice: choice.index)
        requests = [choice.request.capture_id for choice in choices if choice.request is not None]
        try:
            fetched = await self._link.fetch_rows(requests) if requests else None
        except BaseException:
            self._release(capture)
            raise
        return CaptureFile(
            capture_id, capture.layers, [self._file_choice(capture, choice, fetched) for choice in choices]
        )

    def _file_choice(self, capture: _Capture, choice: _Choice, fetched: Any) -> CaptureChoice:
        entry = CaptureChoice(
            index=choice.index,
            prompt_token_ids=choice.prompt_token_ids,
            generated_token_ids=choice.generated_token_ids,
            nonfinite_layer=choice.nonfinite_layer,
            error=choice.refused,
        )
        if choice.request is None:
            return entry
        engine_id = choice.request.capture_id
        rows = fetched.rows.get(engine_id, {})
        expected = len(choice.prompt_token_ids) + max(len(choice.generated_token_ids) - 1, 0)
        missing = sorted(set(capture.layers) - set(rows))
        if engine_id in fetched.errors or missing:
            entry.error = fetched.errors.get(engine_id) or f"the workers returned no rows for layers {missing}"
            return entry
        short = {layer: len(r) for layer, r in rows.items() if len(r) < expected}
        if short:
            entry.error = f"rows missing: expected {expected} per layer, got {short}"
            return entry
        entry.rows = {layer: r[:expected] for layer, r in rows.items()}
        if capture.chat is not None:
            entry.message_boundaries = self._boundaries(capture.chat, choice.prompt_token_ids)
        return entry

    def _boundaries(self, chat: ChatSource, prompt_token_ids: tuple[int, ...]) -> tuple[Any, ...]:
        """Message boundaries of a chat prompt, as ``workbench.chat`` places them, if its
        formatting gives exactly the tokens vLLM ran (a server chat template, tools or
        non-text content render otherwise; then there are none)."""
        try:
            conversation = validate_conversation(chat.messages)
            formatted = format_conversation(self._tokenizer(), conversation, chat.options, with_boundaries=True)
        except (ChatError, TypeError, ValueError) as exc:
            logger.info("no message boundaries for a chat capture: %s", exc)
            return ()
        if tuple(formatted.token_ids) != prompt_token_ids:
            logger.info("no message boundaries for a chat capture: the server rendered the prompt differently")
            return ()
        return formatted.boundaries

    def discard(self, capture_id: str) -> None:
        """Free a capture unread."""
        capture = self._get(capture_id)
        del self._captures[capture_id]
        self._release(capture)

    def _release(self, capture: _Capture) -> None:
        for choice in capture.choices.values():
            if choice.request is not None:
                self._link.release_soon(choice.request.capture_id)

    # -- expiry --------------------------------------------------------------------

    def _start_expiry(self) -> None:
        if self._expiry is None or self._expiry.done():
            self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())

    async def _expire_loop(self) -> None:
        while self._captures:
            await asyncio.sleep(min(max(self.ttl_s / 4, 0.05), 5.0))
            self.expire()

    def expire(self) -> list[str]:
        """Free the captures whose request ended more than ``ttl_s`` ago; returns their ids."""
        now = self._clock()
        expired = [
            capture for capture in self._captures.values() if not capture.open and now - capture.ended_at >= self.ttl_s
        ]
        for capture in expired:
            del self._captures[capture.capture_id]
            self._release(capture)
            logger.info("capture %s expired unfetched", capture.capture_id)
        return [capture.capture_id for capture in expired]

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()


def chat_source(body: Mapping[str, Any]) -> ChatSource | None:
    """The conversation of a chat request body, when every message is plain text
    (boundaries are placed only for such conversations)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in messages
    ):
        return None
    options = dict(body.get("chat_template_kwargs") or {})
    for key in ("add_generation_prompt", "continue_final_message", "chat_template"):
        if body.get(key) is not None:
            options[key] = body[key]
    options.setdefault("add_generation_prompt", not options.get("continue_final_message", False))
    return ChatSource([dict(m) for m in messages], options)
