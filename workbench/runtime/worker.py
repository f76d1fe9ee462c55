"""Worker-side runtime: installs the steered layers and serves the client's RPCs.

vLLM imports this module in every worker process (it is the engine's
``worker_extension_cls``), which registers the ``workbench`` load format.
That loader wraps the real one and, once the weights are in, replaces each
decoder layer by a ``SteeredDecoderLayer``, before the first forward pass (when
torch.compile traces the model and CUDA graphs are captured).

The client then talks to ``WorkbenchWorkerExtension`` through
``collective_rpc`` (method names in ``workbench.wire.Rpc``): setup installs
the per-step hook, slot loads stage specs for rows of the tables, captured
rows are fetched or released, fetched files recycled, and the layers where
steered requests broke (inf/NaN) are reported. Each request names its slot,
tag and capture in its ``RequestPayload``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench import wire
from workbench.errors import WorkbenchError
from workbench.model_layers import decoder_layer_list
from workbench.ops import TARGET_CODES, row_codes
from workbench.runtime import _vllm_internals as vi
from workbench.runtime.capture_store import CaptureStore
from workbench.runtime.client_watch import watch_client
from workbench.runtime.layer import SteeredDecoderLayer, StepPlan
from workbench.runtime.layer_conventions import convention_of
from workbench.runtime.layer_op import LayerUse
from workbench.runtime.logit_lens import final_norm, top_tokens
from workbench.runtime.nonfinite import NonfiniteWatch
from workbench.runtime.steering_tables import ALIGNMENT_BYTES, NO_LAYER, SteeringTables
from workbench.runtime.step_inputs import StepInputBuffer
from workbench.specs import LayerSteeringSpec, SteeringSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Batch:
    """What the requests of a batch asked for, read once per batch composition."""

    req_ids: tuple[str, ...]
    payloads: list[wire.RequestPayload | None]
    slot_of: np.ndarray
    """Each request's steering slot (0 for none)."""
    capturing: list[int]
    """Places of the requests that capture."""
    capture_layers: frozenset[int]
    in_chat: np.ndarray
    """Whether each request is a chat with message spans (bool)."""
    targets_messages: bool
    """Whether some request's spec targets chat roles or messages (their row codes are then filled)."""

    @classmethod
    def of(
        cls, req_ids: tuple[str, ...], payloads: list[wire.RequestPayload | None], targets_messages: set[int]
    ) -> _Batch:
        slot_of = np.array([payload.slot if payload else 0 for payload in payloads], dtype=np.int64)
        capturing = [place for place, payload in enumerate(payloads) if payload and payload.capture]
        layers = frozenset(layer for place in capturing for layer in payloads[place].capture.layers)  # type: ignore[union-attr]
        in_chat = np.array([bool(payload and payload.messages) for payload in payloads], dtype=bool)
        targeting = bool(targets_messages.intersection(slot_of.tolist()))
        return cls(req_ids, payloads, slot_of, capturing, layers, in_chat, targeting)

    @property
    def captures(self) -> list[wire.CaptureRequest | None]:
        return [payload.capture if payload else None for payload in self.payloads]

    @property
    def tags(self) -> list[str | None]:
        return [payload.tag if payload else None for payload in self.payloads]


def _layer_use(layer: LayerSteeringSpec) -> LayerUse:
    return LayerUse(
        add=layer.add is not None,
        cap=layer.projection_cap is not None,
        ablation=layer.ablation is not None,
        targeted=any(op.positions != "all" for _, op in layer.ops()),
    )


class SteeringRuntime:
    """The steered layers of one worker, the shared per-step inputs, and captures in progress."""

    def __init__(
        self,
        layers: dict[int, SteeredDecoderLayer],
        tables: SteeringTables,
        inputs: dict[str, torch.Tensor],
        plan: StepPlan,
        num_slots: int,
    ) -> None:
        self.layers = layers
        self.tables = tables
        self._places = {index: place for place, index in enumerate(layers)}
        """Layer index -> its place in the stacked tables."""
        self.slot_index = StepInputBuffer(inputs["slot_index"])
        self.row_codes = StepInputBuffer(inputs["row_codes"])
        self.capture_flags = StepInputBuffer(inputs["capture_flags"])
        """Per local layer (in table order), first byte: 1 while a request of the step captures it."""
        self.nonfinite = NonfiniteWatch(inputs["nonfinite_rows"])
        self.plan = plan
        self.num_slots = num_slots
        self._slot_use: dict[int, dict[int, LayerUse]] = {}
        """Slot -> layer -> what its spec uses there."""
        self._slots_targeting_messages: set[int] = set()
        """Slots whose spec targets chat roles or messages."""
        self._layer_use_cache: dict[frozenset[int], dict[int, LayerUse]] = {}
        """Steps mostly repeat the same set of slots: their per-layer union, cached."""
        self.records_captures = True
        self.hooked = False
        self.lens_norm: nn.Module | None = None
        """The model's final norm, for the logit lens (on the pipeline stage holding the last layer)."""
        vectors = tables.add_vectors
        self.captures = CaptureStore(frozenset(layers), vectors.shape[-1], vectors.dtype, vectors.device)
        self._step: vi.StepRows | None = None
        self._steered = False
        self._batch = _Batch.of((), [], set())
        self._payloads: dict[str, wire.RequestPayload | None] = {}
        """Parsed payloads of the requests in the batch, by vLLM request id."""
        self._pending_slots: dict[int, tuple[SteeringSpec, set[int]]] = {}
        """Slot -> (spec, layers to write), written by the next step."""
        self._extra_args: vi.ExtraArgs = lambda req_id: None
        """Scheduled requests' ``extra_args`` (set when the step hooks are installed)."""

    def install(self, runner: Any) -> None:
        """Hook into ``runner``'s steps (once); only tensor-parallel rank 0 records captures."""
        if not self.hooked:
            self._extra_args = vi.install_step_hooks(runner, self.before_step, self.after_step)
            self.records_captures = vi.tensor_parallel_rank() == 0
            self.hooked = True
            logger.info("workbench: step hooks on vLLM's %s model runner", vi.runner_name(runner))

    # step hooks (called around every forward by the model runner)

    def before_step(self, step: vi.StepRows) -> None:
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
        self._step = step
        if step.req_ids != self._batch.req_ids:
            self._batch = self._read_batch(step.req_ids)
            recorded = self._batch.capture_layers if self.records_captures else frozenset()
            flags = np.zeros(self.capture_flags.target.shape, dtype=np.int8)
            flags[:, 0] = [index in recorded for index in self.layers]
            self.capture_flags.update(flags)
        batch = self._batch
        counts = np.diff(step.starts)
        slots = np.repeat(batch.slot_of, counts)
        self.slot_index.update(slots)
        self._steered = bool(slots.any())
        if self._steered:
            self.row_codes.update(self._row_codes(step, counts))
            if self.records_captures:
                self.nonfinite.before_step()
        if self.plan.eager:
            layer_ops = self._layer_use(frozenset(np.unique(batch.slot_of).tolist()) if self._steered else frozenset())
            self.plan.layer_ops = layer_ops
            self.plan.capture_layers = batch.capture_layers
            self.plan.watch_from = min(layer_ops, default=None) if self.records_captures else None

    def _row_codes(self, step: vi.StepRows, counts: np.ndarray) -> np.ndarray:
        """Every row's phase, role and message codes (``ops.RowCodes``); roles and
        messages only when some spec of the batch targets them."""
        batch = self._batch
        positions = np.arange(step.num_rows) + np.repeat(step.computed - step.starts[:-1], counts)
        generated = positions >= np.repeat(step.num_prompt_tokens, counts)
        codes = np.zeros((step.num_rows, 3), dtype=np.int16)
        codes[:, 0] = np.where(generated, TARGET_CODES["generated"], TARGET_CODES["prompt"])
        if batch.targets_messages:
            codes[:, 1] = np.where(generated & np.repeat(batch.in_chat, counts), TARGET_CODES["assistant"], 0)
            for place in np.flatnonzero(batch.in_chat):
                low, high = int(step.starts[place]), int(step.starts[place + 1])
                if low < high and not generated[low]:  # a chunk of the prompt (its rows come first)
                    messages = batch.payloads[place].messages  # type: ignore[union-attr]
                    codes[low:high] = row_codes(positions[low:high], int(step.num_prompt_tokens[place]), messages)
        return codes

    def _read_batch(self, req_ids: tuple[str, ...]) -> _Batch:
        known = self._payloads
        self._payloads = {
            req_id: known[req_id] if req_id in known else wire.RequestPayload.from_extra_args(self._extra_args(req_id))
            for req_id in req_ids
        }
        return _Batch.of(req_ids, [self._payloads[req_id] for req_id in req_ids], self._slots_targeting_messages)

    def _write_pending_slots(self) -> None:
        places, slots, entries = [], [], []
        for slot, (spec, touched) in self._pending_slots.items():
            for index in touched:
                places.append(self._places[index])
                slots.append(slot)
                entries.append(spec.layers.get(index))
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

    def after_step(self) -> None:
        """Record the rows of capturing requests (see ``capture_store``) and the steered rows' inf/NaN marks."""
        batch, step = self._batch, self._step
        assert step is not None
        if self.records_captures and batch.capturing:
            captured = {layer: self.layers[layer].captured for layer in batch.capture_layers & self.layers.keys()}
            self.captures.record(batch, batch.captures, batch.capturing, step, captured)
        if self.records_captures and self._steered:
            self.nonfinite.after_step(step.starts, batch.tags)
        self.captures.tick()

    # RPC bodies

    def load_slot(self, slot: int, spec: SteeringSpec) -> None:
        """Stage ``spec`` for ``slot``; the next step writes it into the tables.

        Writing from the step hook puts the copies on the stream the model
        runs on, ahead of the first step that can use the slot, without
        blocking: a copy from pageable host memory here would wait for the
        GPU to drain once per vector (a 64-spec batch stalled on this).
        """
        if not 1 <= slot <= self.num_slots:
            raise WorkbenchError(f"slot {slot} outside 1..{self.num_slots}")
        # Layers the slot's previous spec used go back to neutral; the others already are.
        _, pending = self._pending_slots.get(slot, (spec, set()))
        touched = (set(spec.layers) | set(self._slot_use.get(slot, {})) | pending) & set(self.layers)
        self._pending_slots[slot] = (spec, touched)
        self._layer_use_cache.clear()
        self._slot_use[slot] = {index: _layer_use(layer) for index, layer in spec.layers.items()}
        if spec.needs_messages:
            self._slots_targeting_messages.add(slot)
        else:
            self._slots_targeting_messages.discard(slot)


def install_steering(model: nn.Module, vllm_config: Any) -> SteeringRuntime:
    """Replace every local decoder layer of ``model`` by a ``SteeredDecoderLayer``."""
    settings = wire.EngineSettings.from_vllm_config(vllm_config)
    max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
    hidden_size = vllm_config.model_config.get_hidden_size()
    dtype = vllm_config.model_config.dtype
    device = next(model.parameters()).device
    layer_count = vllm_config.model_config.get_total_num_hidden_layers()
    layer_list = decoder_layer_list(model, layer_count, settings.layers_path)
    plan = StepPlan(eager=vi.runs_python_every_step(vllm_config))
    local = [index for index, layer in enumerate(layer_list) if not vi.is_missing_layer(layer)]
    hf_backend = vi.is_transformers_backend(model)
    conventions = {index: convention_of(layer_list[index], hf_backend) for index in local}
    inputs = {
        "slot_index": torch.zeros(max_tokens, dtype=torch.long, device=device),
        "row_codes": torch.zeros(max_tokens, 3, dtype=torch.int16, device=device),
        # One aligned row per layer (see ALIGNMENT_BYTES); the flag is its first byte.
        "capture_flags": torch.zeros(len(local), ALIGNMENT_BYTES, dtype=torch.int8, device=device),
        "nonfinite_rows": torch.full((max_tokens,), NO_LAYER, dtype=torch.int32, device=device),
    }
    tables = SteeringTables.create(len(local), settings.num_slots, hidden_size, dtype, device)
    steered: dict[int, SteeredDecoderLayer] = {}
    for place, index in enumerate(local):
        layer_tables = tables.of_layer(
            place, inputs["slot_index"], inputs["row_codes"], inputs["capture_flags"][place, :1]
        )
        wrapper = SteeredDecoderLayer(
            layer_list[index], index, conventions[index], plan, layer_tables, inputs["nonfinite_rows"], max_tokens
        )
        layer_list[index] = wrapper
        steered[index] = wrapper
    runtime = SteeringRuntime(steered, tables, inputs, plan, settings.num_slots)
    runtime.lens_norm = final_norm(model, layer_list) if local and local[-1] == layer_count - 1 else None
    model.workbench_runtime = runtime
    watch_client()
    logger.info(
        "workbench: steering installed on %d %s layers (%s), %d slots, %s mode",
        len(steered),
        type(layer_list[local[0]]).__name__ if local else "no",
        ", ".join(sorted({convention.name for convention in conventions.values()})),
        settings.num_slots,
        "eager" if plan.eager else "compiled",
    )
    return runtime


@vi.register_model_loader(wire.LOAD_FORMAT)
class SteeringModelLoader(vi.BaseModelLoader):
    """Loads the model with the loader named in ``model_loader_extra_config``
    (default ``auto``), then installs the steered layers."""

    def __init__(self, load_config: Any) -> None:
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        inner = extra.pop(wire.INNER_LOAD_FORMAT_KEY, "auto")
        # The rest of the extra config (e.g. a tensorizer's settings) is the inner loader's.
        self.inner = vi.inner_model_loader(load_config, inner, extra)

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
    called by name (``wire.Rpc``) through ``collective_rpc`` and carry a
    ``workbench_`` prefix so they never clash with the worker's own."""

    def _workbench_runtime(self) -> SteeringRuntime:
        return self.model_runner.get_model().workbench_runtime  # type: ignore[attr-defined]

    def workbench_setup(self, handoff_folder: str | None = None) -> dict[str, Any]:
        runtime = self._workbench_runtime()
        runtime.install(self.model_runner)  # type: ignore[attr-defined]
        watches = runtime.records_captures
        board = runtime.nonfinite.open_board(handoff_folder) if watches else None
        return wire.WorkerInfo(tuple(sorted(runtime.layers)), runtime.num_slots, watches, board).to_wire()

    def workbench_load_slots(self, loads: list[tuple[int, dict[str, Any]]]) -> None:
        runtime = self._workbench_runtime()
        for slot, payload in loads:
            runtime.load_slot(slot, wire.decode_spec(payload))

    def workbench_fetch_captures(self, capture_ids: list[str]) -> dict[str, Any]:
        return self._workbench_runtime().captures.fetch(capture_ids).to_wire()

    def workbench_release_captures(self, capture_ids: list[str]) -> None:
        self._workbench_runtime().captures.release(capture_ids)

    def workbench_recycle_capture_files(self, paths: list[str]) -> None:
        runtime = self._workbench_runtime()
        if runtime.records_captures:  # only the worker that writes capture files reuses them
            runtime.captures.recycle(paths)

    def workbench_take_nonfinite(self, tags: list[str]) -> dict[str, int]:
        runtime = self._workbench_runtime()
        return runtime.nonfinite.take(tags) if runtime.records_captures else {}

    def workbench_logit_lens(self, rows: bytes, top_k: int) -> dict[str, list[list[Any]]] | None:
        runtime = self._workbench_runtime()
        if runtime.lens_norm is None:  # a pipeline stage without the last layer holds no lm head
            return None
        return top_tokens(self.model_runner.get_model(), runtime.lens_norm, wire.decode_rows(rows), top_k)  # type: ignore[attr-defined]

    def workbench_stats(self) -> dict[str, int]:
        return self._workbench_runtime().captures.stats()
