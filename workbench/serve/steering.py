"""Per-request steering inside vLLM's server: from a request's ticket to its engine requests.

The middleware checks a request's ``steering`` and ``capture_layers``,
opens a ``Ticket`` for them and puts its id in ``vllm_xargs`` (which vLLM
copies into ``SamplingParams.extra_args``). vLLM's serving code then calls
the engine's ``generate`` once per prompt; ``ServerSteering.generate``
(wrapped around it) finds the ticket and runs each of those requests
through ``EngineLink.stream``, exactly as ``VLLMSteerModel`` runs its own:
a slot for the spec, ``wire.RequestPayload`` in ``extra_args``, the
prefix-cache salt, and a capture per prompt. Requests without a ticket go
to vLLM untouched, so unsteered traffic is plain vLLM's.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from workbench import wire
from workbench.engine_link import EngineLink, SteeredRun
from workbench.errors import WorkbenchError
from workbench.serve.captures import CaptureRegistry, ChatSource
from workbench.specs import SteeringSpec

TICKET_KEY = "workbench_request"
"""Key in ``vllm_xargs`` / ``extra_args`` naming a request's ticket."""


@dataclass
class Ticket:
    """One HTTP request's steering, shared by the engine requests it makes."""

    id: str
    spec: SteeringSpec
    capture_id: str | None
    calls: int = 0
    """Engine requests started so far (the next one's prompt index)."""
    nonfinite: dict[int, int | None] = field(default_factory=dict)
    """Prompt index -> where steering broke its stream (None: it stayed sound), once finished."""

    @property
    def steered(self) -> bool:
        return not self.spec.is_empty()


class ServerSteering:
    """The tickets of the requests in flight and the engine requests they run."""

    def __init__(self, link: EngineLink, captures: CaptureRegistry) -> None:
        self.link = link
        self.captures = captures
        self._tickets: dict[str, Ticket] = {}

    def open_ticket(
        self,
        spec: SteeringSpec,
        capture_layers: tuple[int, ...],
        chat: ChatSource | None = None,
        min_rows: int = 1,
    ) -> Ticket:
        """A ticket for a request about to start (``CaptureLimitError`` when its
        capture of at least ``min_rows`` rows per layer cannot fit)."""
        capture_id = self.captures.open(capture_layers, chat, min_rows) if capture_layers else None
        ticket = Ticket(f"wbt-{uuid.uuid4().hex}", spec, capture_id)
        self._tickets[ticket.id] = ticket
        return ticket

    def close_ticket(self, ticket: Ticket) -> None:
        """The HTTP request is answered: its capture can be fetched (once; later calls do nothing)."""
        if self._tickets.pop(ticket.id, None) is not None and ticket.capture_id is not None:
            self.captures.end(ticket.capture_id)

    def generate(
        self,
        original: Callable[..., AsyncIterator[Any]],
        prompt: Any,
        sampling_params: Any,
        request_id: str,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """The engine's ``generate``: a ticketed request runs steered, any other as vLLM runs it.

        Our keys are taken out of ``extra_args`` first: the payload key only
        ever comes from ``EngineLink`` (a client's ``vllm_xargs`` cannot set
        it), and the ticket key is the middleware's.
        """
        extra_args = getattr(sampling_params, "extra_args", None)
        ticket = None
        if extra_args and (TICKET_KEY in extra_args or wire.EXTRA_ARGS_KEY in extra_args):
            extra_args = dict(extra_args)
            ticket = self._tickets.get(extra_args.pop(TICKET_KEY, None))
            extra_args.pop(wire.EXTRA_ARGS_KEY, None)
            sampling_params.extra_args = extra_args or None
        if ticket is None:
            return original(prompt, sampling_params, request_id, **kwargs)
        index = ticket.calls
        ticket.calls += 1
        return self._steered(ticket, index, original, prompt, sampling_params, request_id, kwargs)

    async def _steered(
        self,
        ticket: Ticket,
        index: int,
        original: Callable[..., AsyncIterator[Any]],
        prompt: Any,
        params: Any,
        request_id: str,
        kwargs: dict[str, Any],
    ) -> AsyncIterator[Any]:
        if not isinstance(prompt, dict):
            raise WorkbenchError(f"steering needs a rendered prompt (a dict), got {type(prompt).__name__}")
        capture = None
        if ticket.capture_id is not None:
            ids = prompt.get("prompt_token_ids")
            capture = self.captures.add_choice(ticket.capture_id, index, len(ids) if ids else None, params.max_tokens)
        run = SteeredRun(request_id=request_id, spec=ticket.spec, capture=capture)
        async for output in self.link.stream(prompt, params, run, original, **kwargs):
            if output.finished:
                ticket.nonfinite[index] = run.nonfinite_layer
                if ticket.capture_id is not None:
                    self.captures.finish_choice(ticket.capture_id, index, output, run.nonfinite_layer)
            yield output
