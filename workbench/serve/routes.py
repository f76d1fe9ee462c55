"""The server's own routes, beside vLLM's (all under ``/v1``, so ``--api-key`` guards them too).

- ``GET /v1/steering/info``: the model's shape and the server's steering settings.
- ``GET /v1/steering/tokenizer``: the served tokenizer's files as a zip (what
  ``RemoteSteerModel`` formats chats and tokenises prompts with).
- ``GET /v1/steering/specs``: every named spec and vector.
- ``GET /v1/steering/specs/{name}``: one of them, vectors included (base64).
- ``PUT /v1/steering/specs/{name}``: store a spec (the body: a spec dict), validated against the
  model and written atomically; 201 when new, 200 when replaced.
- ``DELETE /v1/steering/specs/{name}``: delete a spec file.
- ``GET /v1/captures``: the captures held (running, or finished and not fetched yet).
- ``GET /v1/captures/{id}``: a finished capture as a safetensors file (``workbench.capture_file``),
  then freed; 404 once fetched, deleted or expired, 409 while its request runs.
- ``DELETE /v1/captures/{id}``: free a capture unread.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from workbench import capture_file
from workbench.errors import SpecError, WorkbenchError
from workbench.serve.replies import error_body, status_of
from workbench.serve.request_fields import ModelShape
from workbench.serve.spec_store import SpecStore
from workbench.serve.steering import ServerSteering
from workbench.specs import SteeringSpec

router = APIRouter()


@dataclass
class ServerState:
    """What the routes and the middleware share (``app.state.workbench``)."""

    steering: ServerSteering
    store: SpecStore
    model: ModelShape
    info: dict[str, Any]
    tokenizer: Callable[[], Any]
    _tokenizer_zip: bytes | None = field(default=None, repr=False)

    async def tokenizer_zip(self) -> bytes:
        if self._tokenizer_zip is None:
            try:
                tokenizer = self.tokenizer()
            except Exception as exc:  # vLLM raises its own error when started with --skip-tokenizer-init
                raise WorkbenchError(f"this server has no tokenizer ({exc})") from exc
            self._tokenizer_zip = await asyncio.to_thread(_zip_tokenizer, tokenizer)
        return self._tokenizer_zip


def _zip_tokenizer(tokenizer: Any) -> bytes:
    if not hasattr(tokenizer, "save_pretrained"):
        raise WorkbenchError(f"the served tokenizer ({type(tokenizer).__name__}) cannot be saved to files")
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).iterdir()):
            archive.write(path, path.name)
    return buffer.getvalue()


def _state(request: Request) -> ServerState:
    return request.app.state.workbench


def _error(error: WorkbenchError, param: str | None = None) -> JSONResponse:
    status = status_of(error)
    return JSONResponse(error_body(error, status, param), status_code=status)


@router.get("/v1/steering/info")
async def info(request: Request) -> JSONResponse:
    state = _state(request)
    return JSONResponse({**state.info, "captures": state.steering.captures.stats()})


@router.get("/v1/steering/tokenizer")
async def tokenizer(request: Request) -> Response:
    try:
        data = await _state(request).tokenizer_zip()
    except WorkbenchError as error:
        return _error(error)
    return Response(data, media_type="application/zip")


@router.get("/v1/steering/specs")
async def list_specs(request: Request) -> JSONResponse:
    store = _state(request).store
    return JSONResponse({"object": "list", "data": [store.describe(entry) for entry in store.entries()]})


@router.get("/v1/steering/specs/{name}")
async def get_spec(name: str, request: Request) -> JSONResponse:
    store = _state(request).store
    try:
        return JSONResponse(store.describe(store.find(name), with_vectors=True))
    except WorkbenchError as error:
        return _error(error, "name")


@router.put("/v1/steering/specs/{name}")
async def put_spec(name: str, request: Request) -> JSONResponse:
    state = _state(request)
    try:
        try:
            data = await request.json()
        except ValueError as exc:
            raise SpecError(f"the body must be a spec dict in JSON: {exc}") from exc
        spec = SteeringSpec.from_dict(data)
        if spec.is_empty():
            raise SpecError("the spec steers nothing (no layer has an op)")
        model = state.model
        spec.validate_for(model.hidden_size, model.layer_count, model.dtype)
        created = state.store.put(name, spec)
        entry = state.store.find(name)
    except WorkbenchError as error:
        return _error(error, "spec")
    return JSONResponse(state.store.describe(entry), status_code=201 if created else 200)


@router.delete("/v1/steering/specs/{name}")
async def delete_spec(name: str, request: Request) -> JSONResponse:
    try:
        _state(request).store.delete(name)
    except WorkbenchError as error:
        return _error(error, "name")
    return JSONResponse({"name": name, "deleted": True})


@router.get("/v1/captures")
async def list_captures(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": _state(request).steering.captures.listing()})


@router.get("/v1/captures/{capture_id}")
async def get_capture(capture_id: str, request: Request) -> Response:
    try:
        capture = await _state(request).steering.captures.take(capture_id)
    except WorkbenchError as error:
        return _error(error, "capture_id")
    data = await asyncio.to_thread(capture.to_bytes)
    return Response(data, media_type=capture_file.MEDIA_TYPE)


@router.delete("/v1/captures/{capture_id}")
async def delete_capture(capture_id: str, request: Request) -> JSONResponse:
    try:
        _state(request).steering.captures.discard(capture_id)
    except WorkbenchError as error:
        return _error(error, "capture_id")
    return JSONResponse({"id": capture_id, "deleted": True})
