"""Everything that crosses between the client and vLLM's worker processes, defined once.

The client (``workbench.client``) and the code that runs in vLLM's workers
(``workbench.runtime``) import nothing from each other; both import this:

- how the engine is set up for the runtime: our load format, the worker
  extension, our keys in vLLM's configs, the environment of its processes;
- steering specs as the workers receive them (``encode_spec`` / ``decode_spec``);
- a request's payload in ``SamplingParams.extra_args`` (``RequestPayload``);
- the names of the workers' RPC methods (``Rpc``);
- the reply of a capture fetch (``FetchReply``), written by the worker and
  read by the client;
- the hand-off folder in shared memory through which captured rows travel,
  and the inf/NaN board the worker keeps there (``NonfiniteBoard``).

Values on the wire are plain data (dicts, lists, str, int, bytes): vLLM's
RPC and request transports serialise them with msgpack and turn bare
tensors into lists, so tensors travel as safetensors bytes.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from workbench.ops import MessageSpan
from workbench.specs import SteeringSpec

LOAD_FORMAT = "workbench"
"""The load format that installs the steered layers (``workbench.runtime.worker``)."""

INNER_LOAD_FORMAT_KEY = "workbench_inner_load_format"
"""Key in ``model_loader_extra_config``: the load format of the weights themselves."""

WORKER_EXTENSION = "workbench.runtime.worker.WorkbenchWorkerExtension"
"""vLLM's ``worker_extension_cls``: mixed into every worker; serves ``Rpc`` calls."""

SETTINGS_KEY = "workbench"
"""Key of our settings in ``VllmConfig.additional_config`` (also salts vLLM's compile cache)."""

EXTRA_ARGS_KEY = "workbench"
"""Key of a request's payload inside ``SamplingParams.extra_args``."""

CLIENT_PID_ENV = "WORKBENCH_CLIENT_PID"
"""Environment variable naming the process that starts a steered engine; the
engine's processes inherit it and shut the engine down when that process dies
(``workbench.runtime.client_watch``). Not in ``additional_config``: that salts
vLLM's compile cache, which a process id would defeat."""

MODEL_RUNNER_ENV = {"v1": {"VLLM_USE_V2_MODEL_RUNNER": "0"}, "v2": {"VLLM_USE_V2_MODEL_RUNNER": "1"}, "auto": {}}
"""Environment that selects vLLM's model runner in the engine processes
(``VLLMSteeringConfig.model_runner``; the runtime drives both, see
``workbench.runtime._vllm_internals``)."""

ENGINE_ENV_DEFAULTS = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
"""Defaults for the engine processes (a user's own setting wins): notebooks
and tests often touch CUDA before starting the engine; forked engine
processes then cannot use it, spawned ones can."""


class Rpc:
    """Names of the worker extension's methods, called through ``collective_rpc``."""

    SETUP = "workbench_setup"
    LOAD_SLOTS = "workbench_load_slots"
    FETCH_CAPTURES = "workbench_fetch_captures"
    RELEASE_CAPTURES = "workbench_release_captures"
    RECYCLE_CAPTURE_FILES = "workbench_recycle_capture_files"
    TAKE_NONFINITE = "workbench_take_nonfinite"
    LOGIT_LENS = "workbench_logit_lens"
    STATS = "workbench_stats"


@dataclass(frozen=True)
class EngineSettings:
    """What the workers need to know when they build the steered layers."""

    num_slots: int
    runtime: str
    """Hash of the runtime's code: part of vLLM's compile-cache key through ``additional_config``."""
    layers_path: str | None = None
    """Dotted path of the decoder layers' ModuleList in vLLM's model (None: found by structure)."""

    def to_additional_config(self) -> dict[str, Any]:
        settings = {"num_slots": self.num_slots, "runtime": self.runtime, "layers_path": self.layers_path}
        return {SETTINGS_KEY: settings}

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> EngineSettings:
        settings = vllm_config.additional_config[SETTINGS_KEY]
        return cls(
            num_slots=int(settings["num_slots"]),
            runtime=str(settings["runtime"]),
            layers_path=settings.get("layers_path"),
        )


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's answer to ``Rpc.SETUP`` (which passes the client's hand-off folder)."""

    layers: tuple[int, ...]
    """Decoder layers this worker holds (a pipeline stage holds some)."""
    num_slots: int
    watches_nonfinite: bool = False
    """Whether this worker reads inf/NaN marks (one per pipeline stage)."""
    nonfinite_board: tuple[str, str] | None = None
    """Its ``NonfiniteBoard`` in the hand-off folder, when it could write there."""

    def to_wire(self) -> dict[str, Any]:
        board = list(self.nonfinite_board) if self.nonfinite_board else None
        return {
            "layers": list(self.layers),
            "num_slots": self.num_slots,
            "watches_nonfinite": self.watches_nonfinite,
            "nonfinite_board": board,
        }

    @classmethod
    def from_wire(cls, reply: Mapping[str, Any]) -> WorkerInfo:
        board = reply.get("nonfinite_board")
        return cls(
            tuple(reply["layers"]),
            int(reply["num_slots"]),
            bool(reply.get("watches_nonfinite")),
            (str(board[0]), str(board[1])) if board else None,
        )


# -- specs -------------------------------------------------------------------


def encode_spec(spec: SteeringSpec) -> dict[str, Any]:
    """A spec for the workers: its scalars as plain data, its vectors as safetensors bytes."""
    layers, tensors = spec.to_parts()
    return {"layers": layers, "tensors": save_tensors(tensors)}


def decode_spec(payload: Mapping[str, Any]) -> SteeringSpec:
    """Inverse of ``encode_spec``."""
    return SteeringSpec.from_parts(payload["layers"], load_tensors(payload["tensors"]))


def encode_rows(rows: Tensor) -> bytes:
    """Rows (``[N, H]``) for the workers, as float32 safetensors bytes."""
    return save_tensors({"rows": rows.detach().to("cpu", torch.float32).contiguous()})


def decode_rows(data: bytes) -> Tensor:
    return load_tensors(data)["rows"]


# -- requests ------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureRequest:
    """What a capturing request asks the recording worker to keep."""

    capture_id: str
    layers: tuple[int, ...]
    capacity: int
    """Rows the request can produce (prompt + max_tokens - 1, within max_model_len)."""
    folder: str | None
    """The client's hand-off folder for the rows' files (None: send them inline)."""


@dataclass(frozen=True)
class RequestPayload:
    """What one request carries in ``SamplingParams.extra_args[EXTRA_ARGS_KEY]``."""

    slot: int = 0
    """Row of the steering tables the request runs with (0: unsteered)."""
    tag: str | None = None
    """The client's id of the request, for reports about it (``Rpc.TAKE_NONFINITE``)."""
    capture: CaptureRequest | None = None
    messages: tuple[MessageSpan, ...] = ()
    """A chat's messages as (first row, end row, role code), for ops that target roles or messages."""

    def to_extra_args(self, extra_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``extra_args`` (the caller's own, kept) with this payload added."""
        payload: dict[str, Any] = {"slot": self.slot, "tag": self.tag}
        if self.messages:
            payload["messages"] = [list(span) for span in self.messages]
        if self.capture is not None:
            capture = self.capture
            payload["capture"] = {
                "capture_id": capture.capture_id,
                "layers": list(capture.layers),
                "capacity": capture.capacity,
                "folder": capture.folder,
            }
        return {**(extra_args or {}), EXTRA_ARGS_KEY: payload}

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> RequestPayload | None:
        """The payload of a request's ``extra_args`` (None for requests not sent by workbench)."""
        payload = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if payload is None:
            return None
        capture = payload.get("capture")
        return cls(
            slot=int(payload["slot"]),
            tag=payload.get("tag"),
            messages=tuple((int(start), int(end), int(role)) for start, end, role in payload.get("messages", ())),
            capture=None
            if capture is None
            else CaptureRequest(
                capture_id=capture["capture_id"],
                layers=tuple(capture["layers"]),
                capacity=int(capture["capacity"]),
                folder=capture["folder"],
            ),
        )


# -- capture fetch -------------------------------------------------------------

RowsKey = tuple[str, int]
"""(capture id, layer): one layer's rows of one capture."""


def _key_text(key: RowsKey) -> str:
    return f"{key[0]}/{key[1]}"


def _key_of(text: str) -> RowsKey:
    capture_id, layer = text.rsplit("/", 1)
    return capture_id, int(layer)


@dataclass
class FetchReply:
    """One worker's answer to ``Rpc.FETCH_CAPTURES``. Captures it never saw are absent."""

    dtype: str
    """torch dtype name of the rows (e.g. ``bfloat16``)."""
    files: dict[RowsKey, tuple[str, int, int]] = field(default_factory=dict)
    """Rows handed over as files in the client's hand-off folder: path, row
    count, and byte offset of the first row (one file holds every layer of a capture)."""
    inline: dict[RowsKey, Tensor] = field(default_factory=dict)
    """Rows of captures whose files the client cannot see (a worker on another host)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Capture id -> why its rows are incomplete."""

    def to_wire(self) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "dtype": self.dtype,
            "files": {_key_text(key): list(place) for key, place in self.files.items()},
            "errors": dict(self.errors),
        }
        if self.inline:
            reply["data"] = save_tensors({_key_text(key): rows for key, rows in self.inline.items()})
        return reply

    @classmethod
    def from_wire(cls, reply: Mapping[str, Any]) -> FetchReply:
        inline = load_tensors(reply["data"]) if "data" in reply else {}
        return cls(
            dtype=reply["dtype"],
            files={
                _key_of(key): (name, int(rows), int(offset)) for key, (name, rows, offset) in reply["files"].items()
            },
            inline={_key_of(key): rows for key, rows in inline.items()},
            errors=dict(reply["errors"]),
        )


# -- the hand-off folder ---------------------------------------------------------

SHARED_MEMORY = Path("/dev/shm")
HANDOFF_PREFIX = "workbench-captures-"
"""Name prefix of the clients' hand-off folders."""


class HandoffFolder:
    """A folder for capture files: in shared memory where the host has it.

    The client makes one and names it in each capturing request; a worker
    that cannot see it (another host) makes its own and sends rows inline.
    Its maker holds a lock on the folder's ``OWNER`` file while it lives, so a
    folder left behind by a process killed outright (SIGKILL: a notebook
    kernel's process group on a forced restart), captured rows and all, is
    unlocked, and removed when the next folder is made (or by the engine that
    outlives its maker, ``workbench.runtime.client_watch``).
    """

    OWNER = ".owner"

    def __init__(self, prefix: str = HANDOFF_PREFIX) -> None:
        remove_abandoned_folders(prefix)
        self._folder = tempfile.TemporaryDirectory(prefix=prefix, dir=_handoff_parent())
        self.name = self._folder.name
        # Locked before it takes its name: a folder's OWNER file is never seen unlocked while its maker lives.
        unnamed = Path(self.name) / f"{self.OWNER}-{uuid.uuid4().hex}"
        self._lock = os.open(unnamed, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        unnamed.rename(Path(self.name) / self.OWNER)

    def cleanup(self) -> None:
        self._folder.cleanup()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def _handoff_parent() -> Path:
    return SHARED_MEMORY if SHARED_MEMORY.is_dir() else Path(tempfile.gettempdir())


def remove_abandoned_folders(prefix: str = HANDOFF_PREFIX) -> None:
    """Remove the hand-off folders named ``prefix*`` whose maker is gone (their OWNER file is unlocked)."""
    for folder in _handoff_parent().glob(f"{prefix}*"):
        try:
            lock = os.open(folder / HandoffFolder.OWNER, os.O_RDONLY)
        except OSError:  # another user's, or made before folders had owners
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its maker is alive
        finally:
            os.close(lock)
        shutil.rmtree(folder, ignore_errors=True)


# -- the inf/NaN board -----------------------------------------------------------

_THROUGH = struct.Struct("<d")

KEPT_BROKEN_REQUESTS = 4096
"""Broken requests kept until they are asked about; the oldest go first (e.g. of cancelled requests)."""


class BrokenLayers:
    """Per steered request (its tag), the lowest layer where steering broke its
    stream: kept by the worker that reads the marks and by the client reading
    its board, for the ``KEPT_BROKEN_REQUESTS`` latest requests."""

    def __init__(self) -> None:
        self._layers: collections.OrderedDict[str, int] = collections.OrderedDict()

    def note(self, tag: str, layer: int) -> None:
        self._layers[tag] = min(layer, self._layers.get(tag, layer))
        self._layers.move_to_end(tag)
        while len(self._layers) > KEPT_BROKEN_REQUESTS:
            self._layers.popitem(last=False)

    def pop(self, tag: str) -> int | None:
        """The request's lowest broken layer (forgotten afterwards), or None."""
        return self._layers.pop(tag, None)


class NonfiniteBoard:
    """What a worker has read of the inf/NaN marks, kept in two files of the
    client's hand-off folder so that the client needs no worker call
    (``Rpc.TAKE_NONFINITE``) to flag a finished steered request:

    - ``*.found``: a JSON line ``[tag, layer]`` for each broken steered
      request and layer seen, appended as the worker reads the marks;
    - ``*.through``: 8 bytes, a ``time.monotonic()`` before which every
      queued step's marks have been read and their lines appended (``inf``:
      none is waiting).

    A request's last step is queued before its outputs leave the worker, so
    once the client has a finished output and ``through`` is later than the
    moment it got it, the board holds that request's marks. Plain reads and
    writes of the files (no shared mapping), so the kernel orders them across
    processes; the worker writes the lines before the time.
    """

    def __init__(self, found: int, through: int, paths: tuple[str, str]) -> None:
        self._found = found
        self._through = through
        self._posted: float | None = None
        self.paths = paths
        """(found, through) file paths."""

    @classmethod
    def create(cls, folder: Path, through: float) -> NonfiniteBoard:
        stem = folder / f"nonfinite-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        found_path, through_path = f"{stem}.found", f"{stem}.through"
        found = os.open(found_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        through_fd = os.open(through_path, os.O_WRONLY | os.O_CREAT, 0o644)
        board = cls(found, through_fd, (found_path, through_path))
        board.post_through(through)
        return board

    def post(self, found: list[tuple[str, int]], through: float) -> None:
        """Append ``found`` (tag, layer) pairs, then move the time to ``through``."""
        if found:
            os.write(self._found, "".join(json.dumps([tag, layer]) + "\n" for tag, layer in found).encode())
        self.post_through(through)

    def post_through(self, through: float) -> None:
        if through != self._posted:  # on CPU it stays inf: no write per step
            os.pwrite(self._through, _THROUGH.pack(through), 0)
            self._posted = through


class NonfiniteBoardReader:
    """The client's side of the boards of every worker that reads marks."""

    def __init__(self, boards: list[tuple[str, str]]) -> None:
        self._boards = [(open(found, "rb"), os.open(through, os.O_RDONLY)) for found, through in boards]  # noqa: SIM115
        self._partial = [b"" for _ in boards]
        self._found = BrokenLayers()

    def through(self) -> float:
        """The earliest of the boards' times, after which the lines posted before them are read."""
        times = [_THROUGH.unpack(os.pread(through, _THROUGH.size, 0))[0] for _, through in self._boards]
        for index, (found, _) in enumerate(self._boards):
            chunk = found.read()
            if chunk:
                *lines, self._partial[index] = (self._partial[index] + chunk).split(b"\n")
                for line in lines:
                    self._found.note(*json.loads(line))
        return min(times)

    def take(self, tag: str) -> int | None:
        """The lowest broken layer of a request read so far (forgotten afterwards), or None."""
        return self._found.pop(tag)

    def close(self) -> None:
        for found, through in self._boards:
            found.close()
            os.close(through)
        self._boards = []
