"""Bulk extraction of captured activations to disk: ``model.extract(...)``.

Prompts (text, token ids or conversations) run through the model with a
bounded number in flight; as each request finishes its captured rows are
fetched (in batches, one worker call per turn of the event loop), the chosen
positions are copied out, the request's capture is freed, and the rows join
the current shard. Full shards are written (safetensors, one ``[rows,
hidden]`` tensor per layer) on helper threads, several at once, while
generation goes on.

The folder::

    index.json              settings, prompt keys, finished shards (the commit point)
    shard-00000.safetensors tensors ``layer.<L>``: the shard's rows of layer L, block after block
    shard-00000.json        per block: prompt id, offset and rows in the shard, token ids, message spans

A shard, then its JSON, then the index are each written atomically; only
shards named in the index count. Run ``extract`` again on the same folder
with the same prompts and settings and it resumes: the prompts of finished
shards are kept, the rest (those of a shard that was still filling when the
run stopped) are redone. ``workbench.extract_reader.ActivationReader`` reads
the folder back.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from workbench.capture import CaptureHandle
from workbench.errors import ExtractError, PromptError
from workbench.files import atomic_path, atomic_write_text
from workbench.specs import SteeringSpec

if TYPE_CHECKING:
    from workbench.extract_reader import ActivationReader
    from workbench.steer_model import SteerModel

logger = logging.getLogger(__name__)

Positions = Literal["all", "prompt", "generated", "last"]
POSITIONS: tuple[str, ...] = ("all", "prompt", "generated", "last")

INDEX_NAME = "index.json"
FORMAT = "workbench-extract"
FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 256 << 20
"""Rows (all layers) a shard collects before it is written."""
DEFAULT_MAX_IN_FLIGHT = 64
"""Requests running or waiting to be fetched at once."""
DEFAULT_MAX_TOKENS = 16
WRITER_THREADS = 4
"""Shards written at once: joining a shard's rows into one tensor per layer
runs on one core, at about 1 GB/s; safetensors then writes the tensors as they are."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def tensor_name(layer: int) -> str:
    return f"layer.{layer}"


def select_rows(positions: str, prompt_tokens: int, rows: int) -> tuple[int, int]:
    """``[start, end)`` of the rows kept for ``positions`` out of a capture of
    ``rows`` rows whose prompt has ``prompt_tokens`` tokens: ``all`` rows,
    the ``prompt`` tokens, the ``generated`` tokens run through the model
    (all but the last sampled one), or the ``last`` row only."""
    if positions == "all":
        return 0, rows
    if positions == "prompt":
        return 0, min(prompt_tokens, rows)
    if positions == "generated":
        return min(prompt_tokens, rows), rows
    if positions == "last":
        return max(rows - 1, 0), rows
    raise ExtractError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")


@dataclass(frozen=True)
class _Item:
    prompt_id: int
    prompt: Any
    chat: bool
    key: str
    """Hash of the prompt and its steering: a resumed run must be given the same."""


@dataclass
class _Block:
    """One request's kept rows and what the index says about them."""

    prompt_id: int
    first_position: int
    prompt_token_ids: list[int]
    generated_token_ids: list[int]
    messages: list[dict[str, Any]]
    nonfinite_layer: int | None
    rows: dict[int, Tensor] = field(repr=False)

    @property
    def count(self) -> int:
        return next(iter(self.rows.values())).shape[0]


def _items(prompts: Sequence[Any], specs: Sequence[SteeringSpec]) -> list[_Item]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise PromptError(f"extract takes a list of prompts or conversations, got {type(prompts).__name__}")
    if not prompts:
        raise PromptError("prompts is empty")
    items = []
    for i, (prompt, spec) in enumerate(zip(prompts, specs)):
        if isinstance(prompt, str):
            chat, plain = False, prompt
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) for t in prompt):
            chat, plain = False, list(prompt)
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            chat, plain = True, [dict(m) for m in prompt]
        else:
            raise PromptError(f"prompts[{i}] must be a str, token ids or a conversation, got {prompt!r:.80}")
        text = json.dumps(plain, sort_keys=True, default=str)
        key = hashlib.sha256(f"{text}\0{spec.fingerprint}".encode()).hexdigest()[:16]
        items.append(_Item(i, plain, chat, key))
    return items


class _ShardWriter:
    """The shard being filled, and full shards being written on helper threads,
    up to ``WRITER_THREADS`` at once; each joins the index (the commit point)
    in order, once it and every shard before it are on disk."""

    def __init__(
        self, folder: Path, settings: dict[str, Any], keys: list[str], shards: list[dict[str, Any]], shard_bytes: int
    ) -> None:
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.settings = settings
        self.keys = keys
        self.shards = shards
        self._blocks: list[_Block] = []
        self._bytes = 0
        self._writes: collections.deque[asyncio.Future[dict[str, Any]]] = collections.deque()
        """Shards being written, in order; each gives its index entry."""
        self._committing = asyncio.Lock()
        self._threads = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="workbench-shards")

    def add(self, block: _Block) -> None:
        self._blocks.append(block)
        self._bytes += sum(rows.numel() * rows.element_size() for rows in block.rows.values())

    async def flush(self, force: bool = False) -> None:
        """Start writing the filling shard once it holds ``shard_bytes`` (any
        size with ``force``, which also waits for every write); otherwise wait
        only while ``WRITER_THREADS`` shards are being written. Shards written
        meanwhile join the index."""
        if self._blocks and (force or self._bytes >= self.shard_bytes):
            blocks, self._blocks, self._bytes = self._blocks, [], 0
            number = len(self.shards) + len(self._writes)
            loop = asyncio.get_running_loop()
            self._writes.append(loop.run_in_executor(self._threads, self._write, number, blocks))
        await self._commit(keep=0 if force else WRITER_THREADS - 1)

    async def wait(self) -> None:
        """At the end: let the shards being written finish and join the index
        (their threads run on even when the extraction is cancelled)."""
        try:
            await self._commit(keep=0)
        finally:
            self._threads.shutdown(wait=False)

    async def _commit(self, keep: int) -> None:
        """Add finished shards to the index, in order, waiting while more than ``keep`` are being written."""
        async with self._committing:
            while self._writes and (self._writes[0].done() or len(self._writes) > keep):
                shard = await asyncio.shield(self._writes[0])
                self._writes.popleft()
                self.shards.append(shard)
                write_index(self.folder, self.settings, self.keys, self.shards)

    def _write(self, number: int, blocks: list[_Block]) -> dict[str, Any]:
        """Write one shard's rows and records; returns its index entry."""
        name = shard_name(number)
        tensors: dict[str, Tensor] = {}
        records, offset = [], 0
        for block in blocks:
            records.append(
                {
                    "prompt_id": block.prompt_id,
                    "offset": offset,
                    "rows": block.count,
                    "first_position": block.first_position,
                    "prompt_token_ids": block.prompt_token_ids,
                    "generated_token_ids": block.generated_token_ids,
                    "messages": block.messages,
                    "nonfinite_layer": block.nonfinite_layer,
                }
            )
            offset += block.count
        for layer in self.settings["layers"]:
            tensors[tensor_name(layer)] = torch.cat([block.rows[layer] for block in blocks]).contiguous()
        with atomic_path(self.folder / f"{name}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        atomic_write_text(self.folder / f"{name}.json", json.dumps({"records": records}))
        return {"name": name, "rows": offset, "prompt_ids": [b.prompt_id for b in blocks]}


def write_index(folder: Path, settings: dict[str, Any], keys: list[str], shards: list[dict[str, Any]]) -> None:
    index = {"format": FORMAT, "version": FORMAT_VERSION, "settings": settings, "prompt_keys": keys, "shards": shards}
    atomic_write_text(folder / INDEX_NAME, json.dumps(index))


def _resume(folder: Path, settings: dict[str, Any], keys: list[str], overwrite: bool) -> list[dict[str, Any]]:
    """The finished shards of an earlier run of the same extraction in ``folder`` (none for a new folder)."""
    path = folder / INDEX_NAME
    if not path.exists():
        return []
    if overwrite:
        for stale in folder.glob("shard-*"):
            stale.unlink()
        path.unlink()
        return []
    try:
        index = json.loads(path.read_text())
        old_settings, old_keys, shards = index["settings"], index["prompt_keys"], index["shards"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExtractError(f"{path} is not a workbench extraction index ({error}); pass overwrite=True") from error
    if old_settings != settings:
        changed = sorted(k for k in settings.keys() | old_settings.keys() if settings.get(k) != old_settings.get(k))
        raise ExtractError(
            f"{folder} holds an extraction with other settings ({', '.join(changed)}: "
            f"{ {k: old_settings.get(k) for k in changed} } there, { {k: settings.get(k) for k in changed} } here); "
            "use another folder, or pass overwrite=True"
        )
    if old_keys != keys:
        differ = next((i for i, (a, b) in enumerate(zip(old_keys, keys)) if a != b), min(len(old_keys), len(keys)))
        raise ExtractError(
            f"{folder} holds an extraction of other prompts ({len(old_keys)} there, {len(keys)} here; "
            f"the first difference is at prompt {differ}); use another folder, or pass overwrite=True"
        )
    for shard in shards:
        for suffix in (".safetensors", ".json"):
            if not (folder / f"{shard['name']}{suffix}").is_file():
                raise ExtractError(f"{folder}: {shard['name']}{suffix} is named in the index but missing")
    return list(shards)


class _Fetcher:
    """Fetches finished handles in batches: those that finish in one turn of the event loop go in one call."""

    def __init__(self, model: SteerModel) -> None:
        self.model = model
        self._pending: list[tuple[CaptureHandle, asyncio.Future[None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def fetch(self, handle: CaptureHandle) -> None:
        future = asyncio.get_running_loop().create_future()
        if not self._pending:
            task = asyncio.ensure_future(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._pending.append((handle, future))
        await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)
        pending, self._pending = self._pending, []
        error: BaseException | None = None
        try:
            await self.model.fetch_captures_batch([handle for handle, _ in pending])
        except Exception as failure:
            error = failure
        for handle, future in pending:
            if future.done():
                continue
            if handle.is_fetched:
                future.set_result(None)
            else:
                future.set_exception(error or ExtractError(f"capture {handle.capture_id} was not fetched"))


async def extract(
    model: SteerModel,
    prompts: Sequence[Any],
    layers: Sequence[int] | int,
    out_dir: str | Path,
    *,
    positions: Positions = "all",
    sampling_params: Any = None,
    steering_spec: SteeringSpec | Sequence[SteeringSpec | None] | None = None,
    chat_options: Mapping[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    progress: bool = True,
    overwrite: bool = False,
) -> ActivationReader:
    """Capture ``layers`` for every prompt and write the rows at ``positions`` to ``out_dir``.

    See ``SteerModel.extract`` for the arguments; returns the folder's ``ActivationReader``.
    """
    from workbench.extract_reader import ActivationReader

    if positions not in POSITIONS:
        raise ExtractError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    for name, value in (("shard_bytes", shard_bytes), ("max_in_flight", max_in_flight)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExtractError(f"{name} must be a positive int, got {value!r}")
    await model._ensure_ready()
    layer_tuple = model._capture_layers(layers)
    params = model._resolve_sampling(sampling_params, {}, temperature=0.0, max_tokens=DEFAULT_MAX_TOKENS)
    if model._sample_count(params) != 1:
        raise ExtractError(f"extract needs SamplingParams.n == 1, got n={model._sample_count(params)}")
    count = len(prompts) if isinstance(prompts, Sequence) and not isinstance(prompts, str) else 0
    specs = model._per_request_specs(steering_spec, count)
    items = _items(prompts, specs)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": model.model_id,
        "hidden_size": model.hidden_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "layers": list(layer_tuple),
        "positions": positions,
        "sampling": repr(params),
    }
    keys = [item.key for item in items]
    shards = _resume(folder, settings, keys, overwrite)
    done = {prompt_id for shard in shards for prompt_id in shard["prompt_ids"]}
    todo = [(item, specs[item.prompt_id]) for item in items if item.prompt_id not in done]
    if done:
        logger.info("%s: resuming, %d of %d prompts already extracted", folder, len(done), len(items))
    writer = _ShardWriter(folder, settings, keys, shards, shard_bytes)
    if not shards:
        write_index(folder, settings, keys, shards)
    fetcher = _Fetcher(model)
    room = asyncio.Semaphore(max_in_flight)
    bar = tqdm(total=len(items), initial=len(done), desc="extract", unit="prompt", disable=not progress)

    async def run(item: _Item, spec: SteeringSpec) -> None:
        try:
            if item.chat:
                texts, handles = await model.chat(
                    item.prompt, params, capture_layers=layer_tuple, steering_spec=spec, chat_options=chat_options
                )
            else:
                texts, handles = await model.generate(
                    item.prompt, params, capture_layers=layer_tuple, steering_spec=spec
                )
            (handle,) = handles
            try:
                await fetcher.fetch(handle)
                block = _take_block(item.prompt_id, handle, positions, texts[0].nonfinite_layer)
            finally:
                handle.close()
            writer.add(block)
            await writer.flush()
            bar.update(1)
        finally:
            room.release()

    try:
        async with asyncio.TaskGroup() as group:
            for item, spec in todo:
                await room.acquire()
                group.create_task(run(item, spec))
        await writer.flush(force=True)
    except BaseExceptionGroup as failure:
        raise failure.exceptions[0] from None
    finally:
        await writer.wait()
        bar.close()
    return ActivationReader(folder)


def _take_block(prompt_id: int, handle: CaptureHandle, positions: str, nonfinite_layer: int | None) -> _Block:
    """The kept rows of a fetched handle, as views of its capture's memory:
    they hold it (the handle is closed right after) until the shard is
    written, where ``torch.cat`` copies them once."""
    prompt_tokens = len(handle.prompt_token_ids)
    start, end = select_rows(positions, prompt_tokens, handle.expected_rows)
    return _Block(
        prompt_id=prompt_id,
        first_position=start,
        prompt_token_ids=list(handle.prompt_token_ids),
        generated_token_ids=list(handle.generated_token_ids),
        messages=[asdict(boundary) for boundary in handle.message_boundaries],
        nonfinite_layer=nonfinite_layer,
        rows={layer: handle.hidden(layer)[start:end] for layer in handle.layer_indices},
    )
