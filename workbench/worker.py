"""Worker-side runtime: installs the steered layers and serves the client's RPCs.

vLLM imports this module in every worker process (it is the engine's
``worker_extension_cls``), which registers the ``workbench`` load format.
That loader wraps the real one and, once the weights are in, replaces each
decoder layer by a ``SteeredDecoderLayer``, before the first forward pass (when
torch.compile traces the model and CUDA graphs are captured).

The client then talks to ``WorkbenchWorkerExtension`` through
``collective_rpc``: ``workbench_setup`` installs the per-step hook,
``workbench_load_slots`` stages specs for slots of the tables, and
``workbench_fetch_captures`` / ``workbench_release_captures`` hand over or
drop captured rows, and ``workbench_recycle_capture_files`` gives back the
files of fetched captures that the client no longer uses. Each request
names its slot and capture in ``SamplingParams.extra_args["workbench"]``
(see ``request_payload``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from workbench import _vllm_internals as vi
from workbench.capture_store import CaptureStore
from workbench.layer import ALIGNMENT_BYTES, LayerUse, SteeredDecoderLayer, SteeringTables, StepPlan
from workbench.model_layers import decoder_layer_list
from workbench.ops import TARGET_CODES as PHASE
from workbench.specs import SteeringSpec

logger = logging.getLogger(__name__)

LOAD_FORMAT = "workbench"
INNER_LOAD_FORMAT_KEY = "workbench_inner_load_format"
SETTINGS_KEY = "workbench"
"""Key of our settings in ``VllmConfig.additional_config`` (also salts vLLM's compile cache)."""

# -- the wire format between client and worker -------------------------------


def encode_spec(spec: SteeringSpec) -> dict[str, Any]:
    """A spec as table rows for the workers: scalars as plain data, vectors as
    safetensors bytes (vLLM's RPC transport turns bare tensors into lists)."""
    params: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Tensor] = {}
    for index, layer in spec.layers.items():
        layer_params: dict[str, Any] = {}
        if layer.add is not None:
            tensors[f"{index}.add"] = layer.add.effect
            layer_params["add"] = {"positions": layer.add.positions}
        if layer.projection_cap is not None:
            cap = layer.projection_cap
            tensors[f"{index}.projection_cap"] = cap.vector
            layer_params["projection_cap"] = {"min": cap.min, "max": cap.max, "positions": cap.positions}
        if layer.ablation is not None:
            ablation = layer.ablation
            tensors[f"{index}.ablation"] = ablation.vector
            layer_params["ablation"] = {"scale": ablation.scale, "positions": ablation.positions}
        params[str(index)] = layer_params
    return {"params": params, "tensors": save_tensors(tensors)}


def decode_spec(payload: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Inverse of ``encode_spec``: layer -> op name -> params with ``vector``."""
    tensors = load_tensors(payload["tensors"])
    return {
        int(index): {name: {**op, "vector": tensors[f"{index}.{name}"]} for name, op in ops.items()}
        for index, ops in payload["params"].items()
    }


def request_payload(
    slot: int,
    capture_id: str | None = None,
    capture_layers: tuple[int, ...] = (),
    capacity: int = 0,
    folder: str | None = None,
) -> dict[str, Any]:
    """What a request carries in ``extra_args``: its slot and, if capturing,
    what to capture, how many rows it can produce, and the client's hand-off
    folder for the rows' files (None: send them inline)."""
    payload: dict[str, Any] = {"slot": slot}
    if capture_id is not None:
        payload.update(capture_id=capture_id, layers=list(capture_layers), capacity=capacity, folder=folder)
    return payload


# -- worker-side state --------------------------------------------------------


class StepInputBuffer:
    """A persistent device tensor refilled from the host before every step.

    On CUDA the rows go through two pinned staging buffers used in turn, with
    non-blocking copies: a pageable copy would make the CPU wait for the GPU
    to drain and undo vLLM's overlap of input preparation with the previous
    step. Before a staging buffer is reused, the copy that read it is waited
    for (it was issued a step earlier, so this rarely waits).
    """

    def __init__(self, target: Tensor) -> None:
        self.target = target
        self._staging: list[Tensor] = []
        self._copied: list[Any] = []
        if target.is_cuda:
            self._staging = [torch.empty(target.shape, dtype=target.dtype).pin_memory() for _ in range(2)]
            self._copied = [None, None]
        self._turn = 0

    def write(self, rows: np.ndarray) -> None:
        count = rows.shape[0]
        if not self._staging:
            self.target[:count].copy_(torch.from_numpy(rows))
            return
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        staging = self._staging[self._turn]
        staging[:count].copy_(torch.from_numpy(rows))
        self.target[:count].copy_(staging[:count], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[self._turn] = event
        self._turn ^= 1


@dataclass(frozen=True)
class _BatchPayloads:
    """What the requests of a batch asked for, read once per batch composition."""

    req_ids: tuple[str, ...]
    payloads: list[dict[str, Any] | None]
    slot_of: np.ndarray
    """Each request's steering slot (0 for none)."""
    capturing: list[int]
    """Places of the requests that capture."""
    capture_layers: frozenset[int]

    @classmethod
    def read(cls, runner: Any, req_ids: tuple[str, ...]) -> _BatchPayloads:
        payloads = [vi.scheduled_payload(runner, req_id) for req_id in req_ids]
        slot_of = np.array([payload["slot"] if payload else 0 for payload in payloads], dtype=np.int64)
        capturing = [place for place, payload in enumerate(payloads) if payload and "capture_id" in payload]
        layers = frozenset(layer for place in capturing for layer in payloads[place]["layers"])  # type: ignore[index]
        return cls(req_ids, payloads, slot_of, capturing, layers)


def _write_if_changed(buffer: StepInputBuffer, written: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Copy ``rows`` into ``buffer`` unless its leading rows (``written``) already
    hold them; returns what the buffer's leading rows hold afterwards."""
    count = rows.shape[0]
    if count <= written.shape[0] and np.array_equal(written[:count], rows):
        return written
    buffer.write(rows.reshape(-1, *buffer.target.shape[1:]))
    return rows


class SteeringRuntime:
    """The steered layers of one worker, the shared slot index, and captures in progress."""

    def __init__(
        self,
        layers: dict[int, SteeredDecoderLayer],
        tables: SteeringTables,
        slot_index: Tensor,
        row_phases: Tensor,
        capture_flags: Tensor,
        plan: StepPlan,
        num_slots: int,
    ) -> None:
        self.layers = layers
        self.tables = tables
        self._places = {index: place for place, index in enumerate(layers)}
        """Layer index -> its place in the stacked tables."""
        self.slot_index = StepInputBuffer(slot_index)
        self.row_phases = StepInputBuffer(row_phases)
        self.capture_flags = StepInputBuffer(capture_flags)
        """Per local layer (in table order), first byte: 1 while a request of the step captures it."""
        self.plan = plan
        self.num_slots = num_slots
        self._slot_use: dict[int, dict[int, LayerUse]] = {}
        """Slot -> layer -> what its spec uses there."""
        self._layer_use_cache: dict[frozenset[int], dict[int, LayerUse]] = {}
        """Steps mostly repeat the same set of slots: their per-layer union, cached."""
        self.records_captures = True
        self.hooked = False
        vectors = tables.add_vectors
        self.captures = CaptureStore(frozenset(layers), vectors.shape[-1], vectors.dtype, vectors.device)
        self._step: vi.StepRows | None = None
        self._batch = _BatchPayloads((), [], np.zeros(0, dtype=np.int64), [], frozenset())
        self._written_slots = np.zeros(slot_index.shape[0], dtype=np.int64)
        self._written_phases = np.zeros(row_phases.shape[0], dtype=np.int8)
        self._written_flags = np.zeros(capture_flags.shape, dtype=np.int8)
        """What the device's slot index, phase and capture flag buffers hold (their leading rows)."""
        self._pending_slots: dict[int, tuple[dict[int, dict[str, Any]], set[int]]] = {}
        """Slot -> (decoded spec, layers to write), written by the next step."""

    # step hooks (called around every forward by the model runner)

    def before_step(self, runner: Any) -> None:
        """Write each row's slot and phase (prompt or generated), and each
        layer's capture flag, for the step about to run. Rows past the step's
        last are padding whose outputs vLLM drops, so they keep whatever they
        held.

        Per-step host work is kept small, since it competes with vLLM's own
        scheduling: payloads are read again only when the set of requests
        changes, and a buffer is copied to the device only when its rows
        differ from what it holds (steady decode rewrites nothing).
        """
        if self._pending_slots:
            self._write_pending_slots()
        step = self._step = vi.step_rows(runner)
        if step.req_ids != self._batch.req_ids:
            self._batch = _BatchPayloads.read(runner, step.req_ids)
            recorded = self._batch.capture_layers if self.records_captures else frozenset()
            flags = np.zeros_like(self._written_flags)
            flags[:, 0] = [index in recorded for index in self.layers]
            self._written_flags = _write_if_changed(self.capture_flags, self._written_flags, flags)
        batch = self._batch
        counts = np.diff(step.starts)
        slots = np.repeat(batch.slot_of, counts)
        self._written_slots = _write_if_changed(self.slot_index, self._written_slots, slots)
        steered = bool(slots.any())
        if steered:
            # Position of each row minus its request's prompt length: >= 0 on generated tokens.
            offset = np.repeat(step.computed - step.starts[:-1] - step.num_prompt_tokens, counts)
            phases = np.where(np.arange(step.num_rows) + offset >= 0, PHASE["generated"], PHASE["prompt"])
            self._written_phases = _write_if_changed(self.row_phases, self._written_phases, phases.astype(np.int8))
        if self.plan.eager:
            self.plan.layer_ops = self._layer_use(
                frozenset(np.unique(batch.slot_of).tolist()) if steered else frozenset()
            )
            self.plan.capture_layers = batch.capture_layers

    def _write_pending_slots(self) -> None:
        places, slots, entries = [], [], []
        for slot, (layers, touched) in self._pending_slots.items():
            for index in touched:
                places.append(self._places[index])
                slots.append(slot)
                entries.append(layers.get(index))
        self.tables.write(places, slots, entries)
        self._pending_slots.clear()

    def _layer_use(self, slots: frozenset[int]) -> dict[int, LayerUse]:
        cached = self._layer_use_cache.get(slots)
        if cached is None:
            cached = {}
            for slot in slots:
                for layer, use in self._slot_use.get(slot, {}).items():
                    cached[layer] = cached.get(layer, use) | use
            self._layer_use_cache[slots] = cached
        return cached

    def after_step(self, runner: Any) -> None:
        """Record the rows of capturing requests (see ``workbench.capture_store``)."""
        batch = self._batch
        if self.records_captures and batch.capturing:
            captured = {layer: self.layers[layer].captured for layer in batch.capture_layers & self.layers.keys()}
            self.captures.record(batch, batch.payloads, batch.capturing, self._step, captured)
        self.captures.tick()

    # RPC bodies

    def load_slot(self, slot: int, payload: dict[str, Any]) -> None:
        """Stage a spec for ``slot``; the next step writes it into the tables.

        Writing from the step hook puts the copies on the stream the model
        runs on, ahead of the first step that can use the slot, without
        blocking: a copy from pageable host memory here would wait for the
        GPU to drain once per vector (a 64-spec batch stalled on this).
        """
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"slot {slot} outside 1..{self.num_slots}")
        layers = decode_spec(payload)
        # Layers the slot's previous spec used go back to neutral; the others already are.
        _, pending = self._pending_slots.get(slot, ({}, set()))
        touched = (set(layers) | set(self._slot_use.get(slot, {})) | pending) & set(self.layers)
        self._pending_slots[slot] = (layers, touched)
        self._layer_use_cache.clear()
        self._slot_use[slot] = {
            index: LayerUse(
                add="add" in ops,
                cap="projection_cap" in ops,
                ablation="ablation" in ops,
                targeted=any(op["positions"] != "all" for op in ops.values()),
            )
            for index, ops in layers.items()
        }

    def fetch(self, capture_ids: list[str]) -> dict[str, Any]:
        return self.captures.fetch(capture_ids)

    def release(self, capture_ids: list[str]) -> None:
        self.captures.release(capture_ids)

    def stats(self) -> dict[str, int]:
        return self.captures.stats()


def install_steering(model: nn.Module, vllm_config: Any) -> SteeringRuntime:
    """Replace every local decoder layer of ``model`` by a ``SteeredDecoderLayer``."""
    settings = vllm_config.additional_config[SETTINGS_KEY]
    num_slots = int(settings["num_slots"])
    max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
    hidden_size = vllm_config.model_config.get_hidden_size()
    dtype = vllm_config.model_config.dtype
    device = next(model.parameters()).device
    layer_list = decoder_layer_list(model)
    slot_index = torch.zeros(max_tokens, dtype=torch.long, device=device)
    row_phases = torch.zeros(max_tokens, 1, dtype=torch.int8, device=device)
    plan = StepPlan(eager=vi.runs_python_every_step(vllm_config))
    local = [index for index, layer in enumerate(layer_list) if not vi.is_missing_layer(layer)]
    # One aligned row per layer (see layer.ALIGNMENT_BYTES); the flag is its first byte.
    capture_flags = torch.zeros(len(local), ALIGNMENT_BYTES, dtype=torch.int8, device=device)
    tables = SteeringTables.create(len(local), num_slots, hidden_size, dtype, device)
    steered: dict[int, SteeredDecoderLayer] = {}
    for place, index in enumerate(local):
        wrapper = SteeredDecoderLayer(
            layer_list[index], index, plan, tables, place, slot_index, row_phases, capture_flags, max_tokens
        )
        layer_list[index] = wrapper
        steered[index] = wrapper
    runtime = SteeringRuntime(steered, tables, slot_index, row_phases, capture_flags, plan, num_slots)
    model.workbench_runtime = runtime
    logger.info(
        "workbench: steering installed on %d layers, %d slots, %s mode",
        len(steered),
        num_slots,
        "eager" if plan.eager else "compiled",
    )
    return runtime


@vi.register_model_loader(LOAD_FORMAT)
class SteeringModelLoader(vi.BaseModelLoader):
    """Loads the model with the loader named in ``model_loader_extra_config``
    (default ``auto``), then installs the steered layers."""

    def __init__(self, load_config: Any) -> None:
        super().__init__(load_config)
        inner = (load_config.model_loader_extra_config or {}).get(INNER_LOAD_FORMAT_KEY, "auto")
        self.inner = vi.inner_model_loader(load_config, inner)

    def download_model(self, model_config: Any) -> None:
        self.inner.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: Any) -> None:
        self.inner.load_weights(model, model_config)

    def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> nn.Module:
        model = self.inner.load_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        install_steering(model, vllm_config)
        return model


class WorkbenchWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); methods are
    called by name through ``collective_rpc`` and carry a ``workbench_`` prefix
    so they never clash with the worker's own."""

    def _workbench_runtime(self) -> SteeringRuntime:
        return self.model_runner.get_model().workbench_runtime  # type: ignore[attr-defined]

    def workbench_setup(self) -> dict[str, Any]:
        runtime = self._workbench_runtime()
        if not runtime.hooked:
            vi.wrap_model_forward(self.model_runner, runtime.before_step, runtime.after_step)  # type: ignore[attr-defined]
            runtime.records_captures = vi.tensor_parallel_rank() == 0
            runtime.hooked = True
        return {"layers": sorted(runtime.layers), "num_slots": runtime.num_slots}

    def workbench_load_slots(self, loads: list[tuple[int, dict[str, Any]]]) -> None:
        runtime = self._workbench_runtime()
        for slot, payload in loads:
            runtime.load_slot(slot, payload)

    def workbench_fetch_captures(self, capture_ids: list[str]) -> dict[str, Any]:
        return self._workbench_runtime().fetch(capture_ids)

    def workbench_release_captures(self, capture_ids: list[str]) -> None:
        self._workbench_runtime().release(capture_ids)

    def workbench_recycle_capture_files(self, paths: list[str]) -> None:
        runtime = self._workbench_runtime()
        if runtime.records_captures:  # only the worker that writes capture files reuses them
            runtime.captures.recycle(paths)

    def workbench_stats(self) -> dict[str, int]:
        return self._workbench_runtime().stats()
