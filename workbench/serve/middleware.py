"""The ASGI middleware between vLLM's authentication and its routes: request fields in, capture ids out.

For ``POST /v1/completions`` and ``/v1/chat/completions`` with a
``steering`` or ``capture_layers`` field it:

1. checks them against the model (``request_fields``); a bad value is
   answered with HTTP 400 naming it, before vLLM sees the request;
2. opens a ticket (``ServerSteering``) and hands vLLM the body without our
   fields, the ticket's id added to ``vllm_xargs``;
3. adds to the reply: the header ``x-workbench-capture-id`` and a top-level
   ``capture_id`` when capturing, and ``nonfinite_layer`` on each finished
   choice of a steered request (the layer where steering broke its residual
   stream, or null); streamed replies get them in every event;
4. closes the ticket as the reply's last bytes go out, which makes its capture fetchable.

Requests without our fields pass through unchanged (the body vLLM reads is
the one the client sent). Our fields on any other route are refused with
400, so they are never silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from workbench.errors import CaptureError, CaptureLimitError, SpecError, WorkbenchError
from workbench.serve.captures import chat_source
from workbench.serve.replies import error_bytes
from workbench.serve.request_body import RequestBody, decode_field
from workbench.serve.request_fields import (
    CAPTURE_FIELD,
    FIELDS,
    STEERING_FIELD,
    ModelShape,
    RecentSpecs,
    parse_capture_layers,
)
from workbench.serve.spec_store import SpecStore
from workbench.serve.steering import TICKET_KEY, ServerSteering, Ticket
from workbench.specs import SteeringSpec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

STEERABLE = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
CAPTURE_HEADER = b"x-workbench-capture-id"


class SteeringMiddleware:
    """See the module docstring."""

    def __init__(self, app: Any, steering: ServerSteering, model: ModelShape, store: SpecStore) -> None:
        self.app = app
        self.steering = steering
        self.model = model
        self.store = store
        self.specs = RecentSpecs()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        # Most requests carry neither field: skip splitting them (vLLM decodes them anyway).
        request = RequestBody.parse(body) if any(f'"{key}"'.encode() in body for key in FIELDS) else None
        if request is None or not any(key in request for key in FIELDS):
            await self.app(scope, _replay(body, receive), send)
            return
        kind = STEERABLE.get(_route_path(scope))
        if kind is None:
            given = [key for key in FIELDS if key in request]
            error = SpecError(f"{given} apply to POST {' and '.join(STEERABLE)} only, not {_route_path(scope)}")
            await _reply_error(send, 400, error, given[0])
            return
        steering = request.pop_text(STEERING_FIELD)
        try:
            spec = SteeringSpec() if steering is None else self.specs.parse(steering, self.model, self.store)
        except WorkbenchError as error:
            await _reply_error(send, 400, error, STEERING_FIELD)
            return
        capture = request.pop_text(CAPTURE_FIELD)
        try:
            layers = parse_capture_layers(None if capture is None else decode_field(capture, CAPTURE_FIELD), self.model)
        except WorkbenchError as error:
            await _reply_error(send, 400, error, CAPTURE_FIELD)
            return
        try:  # the fields read here are decoded now: a value that is not JSON is a 400 too
            _check_compatible(request, layers)
            chat = chat_source(request) if kind == "chat" and layers else None
            max_tokens = request.get("max_tokens") or request.get("max_completion_tokens")
            per_prompt = (request.get("n") or 1) if kind == "completion" else None
            xargs = request.get("vllm_xargs") or {}
        except WorkbenchError as error:
            await _reply_error(send, 400, error, CAPTURE_FIELD if isinstance(error, CaptureError) else STEERING_FIELD)
            return
        if spec.is_empty() and not layers:
            body = request.encode()
            await self.app(_with_length(scope, len(body)), _replay(body, receive), send)
            return
        try:
            ticket = self.steering.open_ticket(spec, layers, chat, max_tokens if isinstance(max_tokens, int) else 1)
        except CaptureLimitError as error:
            await _reply_error(send, 429, error, CAPTURE_FIELD)
            return
        try:
            request.set("vllm_xargs", {**xargs, TICKET_KEY: ticket.id})
            body = request.encode()
            reply = _ReplyAnnotator(send, ticket, per_prompt, lambda: self.steering.close_ticket(ticket))
            await self.app(_with_length(scope, len(body)), _replay(body, receive), reply.send)
        finally:
            self.steering.close_ticket(ticket)


def _check_compatible(request: RequestBody, layers: tuple[int, ...]) -> None:
    """Refuse what steering or capture cannot run with, naming it."""
    if request.get("use_beam_search"):
        raise SpecError("steering and capture_layers do not run with use_beam_search")
    xargs = request.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise SpecError(f"vllm_xargs must be an object to carry steering, got {xargs!r:.80}")
    if layers:
        n, best_of = request.get("n") or 1, request.get("best_of") or 1
        if n != 1 or best_of != 1:
            raise CaptureError(f"capture needs n == 1 (one completion per prompt), got n={n}, best_of={best_of}")


class _ReplyAnnotator:
    """Adds the capture id and the inf/NaN flags to a reply as it goes out."""

    def __init__(self, send: Send, ticket: Ticket, n: int | None, complete: Callable[[], None]) -> None:
        self._send = send
        self._ticket = ticket
        self._complete = complete
        """Called before the reply's last message goes out: its requests are over by then, and a
        client that fetches the capture as soon as it has the reply must find it finished."""
        self._per_prompt = n
        """Choices per prompt (completions: choice ``index // n`` is its prompt); None for chat (one prompt)."""
        self._mode = "pass"
        self._start: Message | None = None
        self._buffer: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._complete()
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if self._ticket.capture_id is not None and message["status"] == 200:
                headers.append((CAPTURE_HEADER, self._ticket.capture_id.encode()))
            content_type = _header(headers, b"content-type")
            if message["status"] == 200 and content_type.startswith(b"application/json"):
                self._mode, self._start = "json", {**message, "headers": headers}
                return  # sent with the body, once its length is known
            if message["status"] == 200 and content_type.startswith(b"text/event-stream"):
                self._mode = "events"
            await self._send({**message, "headers": headers})
        elif message["type"] == "http.response.body" and self._mode == "json":
            self._buffer.append(message.get("body", b""))
            if not message.get("more_body", False):
                body = self._annotated_json(b"".join(self._buffer))
                assert self._start is not None
                headers = [(k, v) for k, v in self._start["headers"] if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await self._send({**self._start, "headers": headers})
                await self._send({"type": "http.response.body", "body": body})
        elif message["type"] == "http.response.body" and self._mode == "events":
            await self._send({**message, "body": self._annotated_events(message.get("body", b""))})
        else:
            await self._send(message)

    def _annotate(self, reply: Any) -> None:
        if not isinstance(reply, dict):
            return
        ticket = self._ticket
        if ticket.capture_id is not None:
            reply["capture_id"] = ticket.capture_id
        if ticket.steered:
            for choice in reply.get("choices") or ():
                if isinstance(choice, dict) and choice.get("finish_reason") is not None:
                    prompt = choice.get("index", 0) // self._per_prompt if self._per_prompt else 0
                    choice["nonfinite_layer"] = ticket.nonfinite.get(prompt)

    def _annotated_json(self, body: bytes) -> bytes:
        reply = _json_object(body)
        if reply is None:
            return body
        self._annotate(reply)
        return _dumps(reply)

    def _annotated_events(self, chunk: bytes) -> bytes:
        """Server-sent events whole in ``chunk`` (vLLM sends one or more per chunk) get annotated."""
        if not chunk.endswith(b"\n\n"):
            return chunk
        events = []
        for event in chunk[:-2].split(b"\n\n"):
            if self._ticket.capture_id is None and not _finishes(event):
                events.append(event)  # nothing to add: parsing every token's event cost ~20 us each
                continue
            if event.startswith(b"data: {"):
                reply = _json_object(event[len(b"data: ") :])
                if reply is not None:
                    self._annotate(reply)
                    event = b"data: " + _dumps(reply)
            events.append(event)
        return b"\n\n".join(events) + b"\n\n"


def _finishes(event: bytes) -> bool:
    """Whether some choice in a server-sent event may carry a finish reason
    (every ``finish_reason`` key is null otherwise, as vLLM writes them)."""
    return event.count(b'"finish_reason":') != event.count(b'"finish_reason":null')


def _dumps(value: Any) -> bytes:
    """JSON as vLLM writes its replies (compact, UTF-8)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _is_json(scope: Scope) -> bool:
    return _header(scope.get("headers", []), b"content-type").startswith(b"application/json")


def _header(headers: Any, name: bytes) -> bytes:
    return next((value.lower() for key, value in headers if key.lower() == name), b"")


def _route_path(scope: Scope) -> str:
    root = scope.get("root_path", "")
    path = scope["path"]
    return path[len(root) :] if root and path.startswith(root) else path


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over ``body`` once, then listens to the real one
    (which reports the client's disconnect: vLLM aborts the request then)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


async def _reply_error(send: Send, status: int, error: WorkbenchError, param: str | None) -> None:
    body = error_bytes(error, status, param)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
