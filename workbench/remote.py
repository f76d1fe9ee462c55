"""``RemoteSteerModel``: a steering server (``workbench serve``) with ``VLLMSteerModel``'s API.

A notebook on one machine steers and captures a model served on another:
the same ``generate`` / ``chat`` / ``sweep``, steering setters, capture
handles (``handle.fetch()``, ``fetch_captures_batch``, message boundaries
of chats) and typed errors, over HTTP. It needs neither vLLM nor a GPU.

How it maps onto the server: every prompt is one ``POST /v1/completions``
with token ids (chats are formatted here, with the server's tokenizer, as
``VLLMSteerModel`` formats them, so message boundaries are the same), its
spec in ``steering`` (vectors in base64) and its layers in
``capture_layers``; ``fetch_captures_batch`` gets ``/v1/captures/{id}``.
The steering state lives here and is sent with each request, so the
server keeps no per-client state and any replica can answer. Sampling is
sent in full (``SamplingParams``' defaults where not given), so the
server's generation-config defaults never change a request.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import torch

from workbench import errors
from workbench.capture import CaptureHandle, MessageBoundary
from workbench.capture_file import CaptureFile
from workbench.engine_link import weak_callback
from workbench.errors import (
    CaptureError,
    EngineClosedError,
    EngineDeadError,
    HandleReleasedError,
    SpecError,
    WorkbenchError,
)
from workbench.specs import SteeringSpec
from workbench.steer_model import RequestResult, SteerModel

ROLE_TARGETING_NOT_SERVED = (
    "positions naming chat roles or messages are not served over HTTP yet (the server does not know a "
    "request's message boundaries before it runs); use 'all', 'prompt' or 'generated'"
)

logger = logging.getLogger(__name__)

SAMPLING_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": None,
    "stop_token_ids": None,
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
    "logit_bias": None,
    "allowed_token_ids": None,
}
"""vLLM ``SamplingParams`` fields a completion request carries, with ``SamplingParams``' defaults."""

UNSENT_FIELDS = (
    "structured_outputs",
    "bad_words",
    "logits_processors",
    "extra_args",
    "truncate_prompt_tokens",
    "detokenize",
)
"""``SamplingParams`` fields this client does not send: set, they are refused rather than dropped."""


class RemoteSteerModel(SteerModel):
    """A model served by ``workbench serve``, steered and captured per request over HTTP.

    Args:
        url: the server (``http://host:8000``; a trailing ``/v1`` is fine).
        api_key: the server's ``--api-key``, if it has one.
        model: the served model name to ask for (default: the server's first).
        timeout_s: longest wait for one HTTP reply (generation included).

    Example::

        model = RemoteSteerModel("http://gpu-host:8000")
        await model.set_layer_vector(10, vector, scale=4.0)
        texts, handles = await model.generate("Once upon a time", max_tokens=32, capture_layers=[10])
        await model.fetch_captures_batch(handles)
    """

    def __init__(
        self, url: str, *, api_key: str | None = None, model: str | None = None, timeout_s: float = 600.0
    ) -> None:
        super().__init__()
        self.url = url.rstrip("/").removesuffix("/v1")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=30.0)
        info = self._get_sync("/v1/steering/info").json()
        self.info: dict[str, Any] = info
        """The server's ``/v1/steering/info``: model, shape, settings, versions."""
        self._dtype = getattr(torch, info["dtype"])
        self._served = model or info["model"]
        self._tokenizer: Any = None
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- properties --------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return int(self.info["hidden_size"])

    @property
    def layer_count(self) -> int:
        return int(self.info["layer_count"])

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def max_model_len(self) -> int:
        return int(self.info["max_model_len"])

    @property
    def model_name(self) -> str:
        """The path or name the server loaded (a path on the server's host)."""
        return self.info["model_path"]

    @property
    def model_id(self) -> str:
        """The served model name requests ask for."""
        return self._served

    @property
    def tokenizer(self) -> Any:
        """The server's tokenizer (fetched once from ``/v1/steering/tokenizer``)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            data = self._get_sync("/v1/steering/tokenizer").content
            with tempfile.TemporaryDirectory() as folder:
                zipfile.ZipFile(io.BytesIO(data)).extractall(folder)
                self._tokenizer = AutoTokenizer.from_pretrained(folder)
        return self._tokenizer

    @property
    def is_alive(self) -> bool:
        """Not closed (whether the server answers shows at the next request)."""
        return not self._closed

    # -- HTTP ----------------------------------------------------------------------

    def _get_sync(self, path: str) -> httpx.Response:
        try:
            with httpx.Client(timeout=self._timeout, headers=self._headers) as client:
                reply = client.get(self.url + path)
        except httpx.HTTPError as exc:
            raise EngineDeadError(f"no steering server answers at {self.url}: {exc}") from exc
        _raise_for_error(reply, path)
        return reply

    def _client(self) -> httpx.AsyncClient:
        """The async client of the running loop (an httpx client belongs to one loop)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        client = self._clients.get(loop)
        if client is None:
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
            client = self._clients[loop] = httpx.AsyncClient(
                timeout=self._timeout, headers=self._headers, limits=limits
            )
        return client

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            reply = await self._client().request(method, self.url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise EngineDeadError(f"the steering server at {self.url} did not answer {method} {path}: {exc}") from exc
        _raise_for_error(reply, path)
        return reply

    async def _ensure_ready(self) -> None:
        if self._closed:
            raise EngineClosedError("this RemoteSteerModel is closed")

    def close(self) -> None:
        """Stop using the server (its captures not fetched yet expire there)."""
        if self._closed:
            return
        self._closed = True
        clients, self._clients = self._clients, {}
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, client in clients.items():
            if loop is current:
                self._start(client.aclose())
            elif loop.is_running():  # another thread's loop: its connections close there
                asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=30)

    async def aclose(self) -> None:
        """``close()``, waiting for this loop's connections to close."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        self.close()
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> RemoteSteerModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- generation ----------------------------------------------------------------

    def _resolve_sampling(self, sampling_params: Any, sampling_kwargs: Mapping[str, Any], **defaults: Any) -> Any:
        """The sampling fields of a request: from a vLLM ``SamplingParams``, a dict of
        its fields, or keywords (over ``defaults``); ``SamplingParams``' defaults elsewhere."""
        if sampling_params is not None and sampling_kwargs:
            raise TypeError(
                f"pass sampling_params or sampling keyword arguments ({', '.join(sampling_kwargs)}), not both"
            )
        if sampling_params is None or isinstance(sampling_params, Mapping):
            values = {**defaults, **sampling_kwargs, **(sampling_params or {})}
            unknown = sorted(set(values) - set(SAMPLING_DEFAULTS))
            if unknown:
                raise TypeError(f"unknown sampling fields {unknown}; known: {sorted(SAMPLING_DEFAULTS)}")
            return {**SAMPLING_DEFAULTS, **values}
        if type(sampling_params).__name__ != "SamplingParams":
            raise TypeError(
                f"sampling_params must be a vllm.SamplingParams or a dict, got {type(sampling_params).__name__}"
            )
        return _sampling_fields(sampling_params)

    def _sample_count(self, params: Any) -> int:
        return int(params["n"])

    async def _run_request(
        self,
        token_ids: list[int],
        params: Any,
        spec: SteeringSpec,
        layers: tuple[int, ...],
        boundaries: tuple[MessageBoundary, ...],
        on_text: Callable[[str], None] | None = None,
    ) -> RequestResult:
        if spec.needs_messages:
            raise SpecError(ROLE_TARGETING_NOT_SERVED)
        body: dict[str, Any] = {"model": self._served, "prompt": token_ids, "return_token_ids": True}
        body.update({key: value for key, value in params.items() if value is not None})
        if not spec.is_empty():
            body["steering"] = spec.to_dict(vector_format="base64")
        if layers:
            body["capture_layers"] = list(layers)
        reply = (await self._request("POST", "/v1/completions", json=body)).json()
        choice = reply["choices"][0]
        handle = None
        if layers:
            handle = CaptureHandle(
                request_id=reply["id"],
                capture_id=reply["capture_id"],
                layer_indices=layers,
                prompt_token_ids=tuple(choice.get("prompt_token_ids") or token_ids),
                generated_token_ids=tuple(choice.get("token_ids") or ()),
                message_boundaries=boundaries,
            )
            handle._attach(self, weak_callback(self, "_delete_capture_soon"))
        if on_text is not None:  # one call with the whole text: these requests are not streamed
            on_text(choice["text"])
        return RequestResult(choice["text"], reply, handle, choice.get("nonfinite_layer"))

    # -- captures --------------------------------------------------------------------

    async def fetch_captures_batch(self, handles: Sequence[CaptureHandle]) -> None:
        """Fetch these handles' rows from the server (one request each, all at once).

        Every handle that comes back whole gets its rows; then
        ``HandleReleasedError`` names the captures the server does not know
        (fetched elsewhere, deleted, expired) and ``CaptureError`` those
        whose rows are incomplete.
        """
        await self._ensure_ready()
        pending = [handle for handle in handles if not handle.is_fetched]
        for handle in pending:
            if handle.is_closed:
                raise HandleReleasedError(f"capture handle {handle.capture_id} was closed")
        replies = await asyncio.gather(
            *(self._request("GET", f"/v1/captures/{handle.capture_id}") for handle in pending), return_exceptions=True
        )
        unknown, incomplete = [], []
        for handle, reply in zip(pending, replies):
            if isinstance(reply, HandleReleasedError):
                unknown.append(str(reply))
            elif isinstance(reply, BaseException):
                raise reply
            else:
                try:
                    choice = CaptureFile.from_bytes(reply.content).choices[0]
                    if choice.error is not None:
                        raise CaptureError(f"capture {handle.capture_id} is incomplete: {choice.error}")
                    handle._set_data(choice.rows)
                except CaptureError as error:
                    incomplete.append(str(error))
        if unknown:
            raise HandleReleasedError("; ".join(unknown + incomplete))
        if incomplete:
            raise CaptureError("; ".join(incomplete))

    def _delete_capture_soon(self, capture_id: str) -> None:
        """Free an unfetched capture on the server (from a handle's close or finaliser, any thread)."""
        loop = self._loop
        if self._closed or loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._start_delete, capture_id)

    def _start_delete(self, capture_id: str) -> None:
        self._start(self._delete_capture(capture_id))

    def _start(self, coro: Any) -> None:
        """Run ``coro`` in the background, keeping a reference until it finishes."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete_capture(self, capture_id: str) -> None:
        try:
            await self._request("DELETE", f"/v1/captures/{capture_id}")
        except WorkbenchError:  # already gone (fetched elsewhere, expired) or the server is down
            logger.debug("could not delete capture %s on the server", capture_id, exc_info=True)

    # -- named specs on the server -------------------------------------------------------

    async def list_specs(self) -> list[dict[str, Any]]:
        """The server's named specs and vectors (``--steering-dir``)."""
        await self._ensure_ready()
        return (await self._request("GET", "/v1/steering/specs")).json()["data"]

    async def get_spec(self, name: str) -> SteeringSpec:
        """The named spec ``name`` from the server."""
        await self._ensure_ready()
        entry = (await self._request("GET", f"/v1/steering/specs/{name}")).json()
        if entry["kind"] != "spec":
            raise errors.SpecError(f"{name!r} is a library vector on the server, not a spec")
        return SteeringSpec.from_dict(entry["spec"])

    async def put_spec(self, name: str, spec: SteeringSpec) -> None:
        """Store ``spec`` on the server under ``name`` (requests can then use ``{"name": name}``)."""
        await self._ensure_ready()
        self._check_spec(spec)
        await self._request("PUT", f"/v1/steering/specs/{name}", json=spec.to_dict(vector_format="base64"))

    async def delete_spec(self, name: str) -> None:
        await self._ensure_ready()
        await self._request("DELETE", f"/v1/steering/specs/{name}")


def _sampling_fields(params: Any) -> dict[str, Any]:
    """A vLLM ``SamplingParams`` as completion request fields; refuses settings a request cannot carry."""
    from vllm import SamplingParams

    defaults = SamplingParams()
    lost = [name for name in UNSENT_FIELDS if getattr(params, name, None) != getattr(defaults, name, None)]
    if lost:
        raise TypeError(f"SamplingParams fields {lost} are not sent to a steering server; leave them at their defaults")
    return {name: getattr(params, name) for name in SAMPLING_DEFAULTS}


def _raise_for_error(reply: httpx.Response, path: str) -> None:
    """The typed workbench error of an error reply (the server names its class), else ``WorkbenchError``."""
    if reply.status_code < 400:
        return
    try:
        error = reply.json()["error"]
        message, kind = error["message"], error.get("type", "")
    except (ValueError, KeyError, TypeError):
        message, kind = reply.text[:500], ""
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, WorkbenchError)):
        cls = WorkbenchError
        message = f"{path}: HTTP {reply.status_code}: {message}"
    raise cls(message)
