"""The driving side of the wire to one running steered engine.

Whoever drives a steered ``AsyncLLM`` needs the same things, in your process
(``VLLMSteerModel``) or in a server's (``workbench serve``): the workers set
up once; worker calls that notice a dead engine and time out; steering slots,
so that each distinct spec is loaded into the workers' tables once and the
loads asked for in one turn of the event loop go in one call; a request run
with its slot, capture and prefix-cache salt (``RequestPayload`` in its
``extra_args``); the inf/NaN report of steered requests; and captured rows
fetched, released and recycled, in batches. ``EngineLink`` holds all of it
and knows nothing of prompts, chat or HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from workbench import transfer, wire
from workbench.capture_budget import CaptureBudget, default_budget_bytes
from workbench.errors import EngineDeadError, WorkerTimeoutError
from workbench.slots import SlotTable
from workbench.specs import SteeringSpec

logger = logging.getLogger(__name__)

NONFINITE_INTERVAL_S = 0.05
"""Least time between two ``Rpc.TAKE_NONFINITE`` calls (see ``EngineLink._ask_nonfinite``)."""

BOARD_POLL_S = 0.001
"""How often finished steered requests look at the workers' inf/NaN board while their marks are on the way."""

BOARD_PATIENCE_S = 1.0
"""Longest wait on the board (its marks land within a step) before asking the workers instead."""

ENGINE_POLL_S = 0.5
"""How often a pending worker call checks whether the engine has died."""


@dataclass
class SteeredRun:
    """One request as it runs through ``EngineLink.stream``: what it asked
    for, and once it has finished, its last output and whether steering
    broke its residual stream."""

    request_id: str
    spec: SteeringSpec
    capture: wire.CaptureRequest | None = None
    messages: tuple[tuple[int, int, int], ...] = ()
    """The chat's message spans, when its spec targets roles or messages (``wire.RequestPayload.messages``)."""
    final: Any = None
    """vLLM's last ``RequestOutput`` of the request (``final.finished`` once it ended)."""
    nonfinite_layer: int | None = None
    """The layer where steering broke the stream (inf, NaN, too large), or None."""

    @property
    def finished(self) -> bool:
        return self.final is not None and self.final.finished


@dataclass
class FetchedRows:
    """What came back for a fetch: rows by capture id and layer, and why some captures are incomplete."""

    rows: dict[str, dict[int, Tensor]]
    errors: dict[str, str]


class EngineLink:
    """Slots, worker calls and captures of one steered engine (``engine``, an ``AsyncLLM``).

    Args:
        engine: the running engine (its ``collective_rpc`` reaches the workers).
        num_slots: rows of the workers' steering tables (the engine's ``max_steering_slots``).
        rpc_timeout_s: longest wait for a worker call, read at each call (a
            ``VLLMSteeringConfig`` may change it while the engine runs).
        failure_reason: the engine's own last words when it dies (or None).
        restart_hint: what the user should do once the engine is dead.
        capture_budget: bytes that captured rows not yet fetched may hold;
            capturing requests wait for room before they are submitted
            (``workbench.capture_budget``). ``"auto"``: a share of the free
            shared memory at start (``default_budget_bytes``); None: no budget.
    """

    def __init__(
        self,
        engine: Any,
        *,
        num_slots: int,
        rpc_timeout_s: Callable[[], float],
        failure_reason: Callable[[], str | None] = lambda: None,
        restart_hint: str = "start a new engine",
        capture_budget: int | str | None = None,
    ) -> None:
        self.engine = engine
        model_config = engine.model_config
        self.hidden_size: int = model_config.get_hidden_size()
        self.layer_count: int = model_config.get_total_num_hidden_layers()
        self.dtype = model_config.dtype
        self.max_model_len: int = model_config.max_model_len
        self._rpc_timeout_s = rpc_timeout_s
        self._failure_reason = failure_reason
        self._restart_hint = restart_hint
        self._row_bytes = self.hidden_size * self.dtype.itemsize
        self._prefix_caching = bool(engine.vllm_config.cache_config.enable_prefix_caching)
        self._slots = SlotTable(num_slots, self._load_slot)
        self._setup_done = False
        self._setup_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_items: dict[str, dict[str, None]] = {}
        """Worker method -> items queued for it in this turn of the event loop (releases, recycled files)."""
        self._pending_loads: list[tuple[int, dict[str, Any], asyncio.Future[None]]] = []
        self._pending_nonfinite: dict[str, asyncio.Future[int | None]] = {}
        self._board: wire.NonfiniteBoardReader | None = None
        """The workers' inf/NaN board, when every worker that reads marks keeps one (same host)."""
        self._board_waiting: list[tuple[float, str, asyncio.Future[int | None]]] = []
        """(when the request finished, its tag, its answer) of finished requests waiting on the board."""
        self._nonfinite_asked_at = float("-inf")
        """Event-loop time of the last ``Rpc.TAKE_NONFINITE`` call."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handoff = wire.HandoffFolder()
        self.handoff_folder: str | None = self._handoff.name
        """Where workers write capture files (if they cannot see it, rows come inline in the fetch reply)."""
        if capture_budget == "auto":
            capture_budget = default_budget_bytes(self._handoff.name)
        self.budget: CaptureBudget | None = None if capture_budget is None else CaptureBudget(capture_budget)
        """Reservations of captured rows not yet fetched (None: unbounded)."""
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    async def ensure_ready(self) -> None:
        """Set the workers up (their step hook) once, from the loop that drives the engine."""
        if self._setup_done:
            return
        async with self._setup_lock:
            if not self._setup_done:
                self._loop = asyncio.get_running_loop()
                replies = await self.rpc(wire.Rpc.SETUP, self.handoff_folder)
                infos = [wire.WorkerInfo.from_wire(reply) for reply in replies]
                boards = [info.nonfinite_board for info in infos if info.watches_nonfinite]
                if boards and all(boards):
                    self._board = wire.NonfiniteBoardReader(boards)  # type: ignore[arg-type]
                self._setup_done = True

    def close(self) -> None:
        """Forget the engine's captures here (the caller shuts the engine down)."""
        if not self._closed:
            self._closed = True
            if self._board is not None:
                self._board.close()
            self._handoff.cleanup()

    def check_alive(self) -> None:
        if self.engine.errored:
            reason = self._failure_reason()
            raise EngineDeadError(
                "the vLLM engine's processes died" + (f" ({reason})" if reason else "") + f"; {self._restart_hint}"
            )

    async def rpc(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every worker. Raises ``EngineDeadError`` as soon as
        the engine dies (vLLM leaves such a call pending) and
        ``WorkerTimeoutError`` after ``rpc_timeout_s``, instead of waiting forever."""
        self.check_alive()
        call = asyncio.ensure_future(self.engine.collective_rpc(method, args=args))
        loop = asyncio.get_running_loop()
        timeout = self._rpc_timeout_s()
        deadline = loop.time() + timeout
        while not call.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                call.cancel()
                raise WorkerTimeoutError(f"worker call {method!r} got no answer within {timeout} s (rpc_timeout_s)")
            await asyncio.wait({call}, timeout=min(remaining, ENGINE_POLL_S))
            if not call.done() and self.engine.errored:
                call.cancel()
                self.check_alive()
        return call.result()

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Keep a reference to a background task until it finishes."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests ----------------------------------------------------------

    def capture_request(self, layers: tuple[int, ...], prompt_tokens: int | None, max_tokens: int | None) -> Any:
        """A new capture of ``layers`` for a request of ``prompt_tokens`` (None:
        unknown) that may generate ``max_tokens``: its rows are every token the
        request can hold but the last sampled one."""
        limit = self.max_model_len
        if prompt_tokens is None:
            capacity = limit - 1
        else:
            capacity = min(prompt_tokens + (max_tokens or limit), limit) - 1
        return wire.CaptureRequest(uuid.uuid4().hex, layers, capacity, self.handoff_folder)

    def capture_bytes(self, capture: wire.CaptureRequest, rows: int | None = None) -> int:
        """Bytes of host memory the rows of ``capture`` may take (``rows`` per layer; default its capacity)."""
        return (capture.capacity if rows is None else rows) * len(capture.layers) * self._row_bytes

    async def stream(
        self,
        prompt: dict[str, Any],
        params: Any,
        run: SteeredRun,
        generate: Callable[..., AsyncIterator[Any]] | None = None,
        **generate_kwargs: Any,
    ) -> AsyncIterator[Any]:
        """vLLM's outputs of one request run with ``run.spec`` and ``run.capture``.

        Takes a slot for the spec (waiting while all are busy), tags the
        request's ``extra_args`` with its ``RequestPayload``, salts its prefix
        cache when steered (KV blocks computed under one steering must not
        serve another) and skips reading the cache when capturing (cached
        blocks are never recomputed, so their rows would be missing).
        ``generate`` is vLLM's ``AsyncLLM.generate`` (the default) or a
        function with its signature; ``generate_kwargs`` go to it. Before the
        finished output is yielded, ``run.nonfinite_layer`` is set. A capture
        whose request did not finish is released.
        """
        generate = generate or self.engine.generate
        steered = not run.spec.is_empty()
        if run.capture is not None and self.budget is not None:
            await self.budget.reserve(run.capture.capture_id, self.capture_bytes(run.capture))
        try:
            slot = await self._slots.acquire(run.spec)
        except BaseException:
            if run.capture is not None and self.budget is not None:
                self.budget.release(run.capture.capture_id)
            raise
        try:
            payload = wire.RequestPayload(
                slot=slot, tag=run.request_id if steered else None, capture=run.capture, messages=run.messages
            )
            request_params = params.clone()
            request_params.extra_args = payload.to_extra_args(params.extra_args)
            if run.capture is not None:
                request_params.skip_reading_prefix_cache = True
            if self._prefix_caching and steered:
                salt = prompt.get("cache_salt")
                prompt = {**prompt, "cache_salt": f"{salt}:{run.spec.fingerprint}" if salt else run.spec.fingerprint}
            async for output in generate(prompt, request_params, run.request_id, **generate_kwargs):
                if output.finished and steered:
                    run.nonfinite_layer = await self._nonfinite_layer(run.request_id)
                    if run.nonfinite_layer is not None:
                        logger.warning(
                            "steering broke the residual stream of request %s at layer %d (inf, NaN, or too large "
                            "for the next layer's norm); its text is not the model's: lower the scale there",
                            run.request_id,
                            run.nonfinite_layer,
                        )
                run.final = output
                if output.finished and run.capture is not None and self.budget is not None:
                    rows = len(output.prompt_token_ids or ()) + max(len(output.outputs[0].token_ids) - 1, 0)
                    self.budget.shrink(run.capture.capture_id, self.capture_bytes(run.capture, rows))
                yield output
        except BaseException:
            if run.capture is not None and not run.finished:
                if self.budget is not None:
                    self.budget.release(run.capture.capture_id)
                self.release_soon(run.capture.capture_id)
            raise
        finally:
            await self._slots.release(slot)

    async def _nonfinite_layer(self, tag: str) -> int | None:
        """Where steering broke this finished request's stream: read from the
        workers' board once it covers the moment the request finished (within a
        step, see ``wire.NonfiniteBoard``), else asked of the workers."""
        if self._board is None:
            return await self._ask_nonfinite(tag)
        future = asyncio.get_running_loop().create_future()
        self._board_waiting.append((time.monotonic(), tag, future))
        if len(self._board_waiting) == 1:
            self._track(asyncio.ensure_future(self._watch_board()))
        try:
            return await future
        except TimeoutError:  # the board stalled (see _watch_board)
            return await self._ask_nonfinite(tag)

    async def _watch_board(self) -> None:
        """Answer the finished requests the board covers, every ``BOARD_POLL_S`` while some wait;
        one waiting past ``BOARD_PATIENCE_S`` (a stalled engine) is asked of the workers."""
        assert self._board is not None
        while self._board_waiting:
            if self._closed:
                for *_, future in self._board_waiting:
                    if not future.done():
                        future.set_exception(EngineDeadError("the engine was closed"))
                self._board_waiting = []
                return
            through = self._board.through()
            now = time.monotonic()
            waiting = []
            for finished_at, tag, future in self._board_waiting:
                if future.done():
                    continue
                if through >= finished_at:
                    future.set_result(self._board.take(tag))
                elif now - finished_at > BOARD_PATIENCE_S:
                    future.set_exception(TimeoutError())
                else:
                    waiting.append((finished_at, tag, future))
            self._board_waiting = waiting
            if waiting:
                await asyncio.sleep(BOARD_POLL_S)

    async def _ask_nonfinite(self, tag: str) -> int | None:
        """Where steering broke this finished request's stream (``Rpc.TAKE_NONFINITE``),
        asked together with the other requests finishing until the call goes out.

        A worker call pauses the engine between two steps, and a server's
        clients finish requests one by one: one call per finish cost half of
        a steered server's throughput. So calls go out at most every
        ``NONFINITE_INTERVAL_S``; the first after a quiet spell goes at once.
        """
        future = asyncio.get_running_loop().create_future()
        if not self._pending_nonfinite:
            self._track(asyncio.ensure_future(self._flush_nonfinite()))
        self._pending_nonfinite[tag] = future
        return await future

    async def _flush_nonfinite(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._nonfinite_asked_at + NONFINITE_INTERVAL_S - loop.time()))
        self._nonfinite_asked_at = loop.time()
        pending, self._pending_nonfinite = self._pending_nonfinite, {}
        try:
            replies = await self.rpc(wire.Rpc.TAKE_NONFINITE, list(pending))
        except BaseException as error:
            for future in pending.values():
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        found = {tag: layer for reply in replies for tag, layer in reply.items()}
        for tag, future in pending.items():
            if not future.done():
                future.set_result(found.get(tag))

    async def _load_slot(self, slot: int, spec: SteeringSpec) -> None:
        """Load ``spec`` into ``slot`` in the workers. Loads asked for in the same
        turn of the event loop (a batch of per-request specs) go in one worker
        call: each call pauses the engine between two steps, and a request
        starts only once its slot is loaded, so one call per spec made a
        64-spec batch start request by request."""
        future = asyncio.get_running_loop().create_future()
        if not self._pending_loads:
            self._track(asyncio.ensure_future(self._flush_loads()))
        self._pending_loads.append((slot, wire.encode_spec(spec), future))
        await future

    async def _flush_loads(self) -> None:
        await asyncio.sleep(0)
        loads, self._pending_loads = self._pending_loads, []
        try:
            await self.rpc(wire.Rpc.LOAD_SLOTS, [(slot, payload) for slot, payload, _ in loads])
        except BaseException as error:
            for *_, future in loads:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
        else:
            for *_, future in loads:
                if not future.done():
                    future.set_result(None)

    # -- captures ------------------------------------------------------------

    async def fetch_rows(self, capture_ids: Sequence[str]) -> FetchedRows:
        """The captured rows of these captures, in one worker call; the workers
        let go of them. A capture the workers do not know is absent from the rows."""
        await self.ensure_ready()
        try:
            replies = await self.rpc(wire.Rpc.FETCH_CAPTURES, list(capture_ids))
        finally:
            if self.budget is not None:  # the rows are the caller's now (or gone with the engine)
                for capture_id in capture_ids:
                    self.budget.release(capture_id)
        rows: dict[str, dict[int, Tensor]] = {capture_id: {} for capture_id in capture_ids}
        errors: dict[str, str] = {}
        recycle = weak_callback(self, "_recycle_soon", _delete_file)
        for wire_reply in replies:
            reply = wire.FetchReply.from_wire(wire_reply)
            for (capture_id, layer), tensor in transfer.read_reply(reply, self.hidden_size, recycle).items():
                rows[capture_id][layer] = tensor
            errors.update(reply.errors)
        return FetchedRows(rows, errors)

    def release_soon(self, capture_id: str) -> None:
        """Free a capture in the workers; safe to call from any thread or a finaliser."""
        self._send_soon(wire.Rpc.RELEASE_CAPTURES, capture_id)

    def _recycle_soon(self, path: str) -> None:
        """Give a fetched capture's file back to the workers for later captures
        (called once no tensor views it); deleted instead once the engine is gone."""
        if not self._send_soon(wire.Rpc.RECYCLE_CAPTURE_FILES, path):
            _delete_file(path)

    def _send_soon(self, method: str, item: str) -> bool:
        """Pass ``item`` to the workers' ``method`` with the others queued in the
        same turn of the event loop, in one call; safe from any thread or a
        finaliser. False once the engine is closed."""
        loop = self._loop
        if self._closed or loop is None or loop.is_closed():
            return False
        loop.call_soon_threadsafe(self._queue_item, method, item)
        return True

    def _queue_item(self, method: str, item: str) -> None:
        if method == wire.Rpc.RELEASE_CAPTURES and self.budget is not None:
            self.budget.release(item)
        pending = self._pending_items.setdefault(method, {})
        if not pending:
            self._track(asyncio.ensure_future(self._flush_items(method)))
        pending[item] = None

    async def _flush_items(self, method: str) -> None:
        await asyncio.sleep(0)
        items = list(self._pending_items.pop(method, {}))
        if items and not self._closed:
            try:
                await self.rpc(method, items)
            except Exception:  # the engine is gone; its memory went with it
                logger.warning("%s: could not pass %d items to the workers", method, len(items), exc_info=True)

    async def worker_stats(self) -> list[dict[str, int]]:
        """Per-worker counts of captures held (for leak checks), after the
        workers' queued capture work (writes, releases) has finished, and
        the bytes of their row files; with a capture budget, every entry also
        carries this link's ``capture_budget_bytes``, ``capture_reserved_bytes``
        and ``capture_waiting`` (requests waiting for room)."""
        await self.ensure_ready()
        stats = await self.rpc(wire.Rpc.STATS)
        if self.budget is not None:
            use = self.budget.use()
            budget = {
                "capture_budget_bytes": use.limit_bytes,
                "capture_reserved_bytes": use.used_bytes,
                "capture_waiting": use.waiting,
            }
            stats = [{**entry, **budget} for entry in stats]
        return stats

    def loaded_specs(self) -> dict[int, str | None]:
        """Slot -> fingerprint of the spec it holds (for diagnostics and tests)."""
        return self._slots.loaded_specs()


def weak_callback(target: Any, method: str, orphaned: Callable[[str], None] | None = None) -> Callable[[str], None]:
    """``target.<method>(item)`` as a callback that does not keep ``target``
    alive (for finalisers); ``orphaned(item)`` runs instead once it is gone."""
    ref = weakref.ref(target)

    def call(item: str) -> None:
        alive = ref()
        if alive is not None:
            getattr(alive, method)(item)
        elif orphaned is not None:
            orphaned(item)

    return call


def _delete_file(path: str) -> None:
    Path(path).unlink(missing_ok=True)
