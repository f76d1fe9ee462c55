"""Run the engine's coroutines on an event loop of their own, in a thread.

Jupyter's kernel already runs an asyncio loop, and vLLM's ``AsyncLLM`` binds
to the loop it first runs on. Patching the kernel loop to be re-entrant
(``nest_asyncio``) is archived and breaks ipykernel 7, so the engine gets a
dedicated loop thread instead:

- from notebook cells: ``await bridge.run_async(coro)`` (top-level await) or
  ``bridge.run(coro)``;
- from widget callbacks: ``bridge.submit(coro, on_done)``, which never blocks
  the kernel; ``on_done`` receives the result or the exception.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from workbench.errors import EngineClosedError, EngineTimeoutError, WorkbenchError

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0


def _call_safely(callback: Callable[..., None], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        logger.exception("error in a workbench completion callback")


class LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str = "workbench-engine-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def submit(
        self,
        coro: Coroutine[Any, Any, T],
        on_done: Callable[[T | None, BaseException | None], None] | None = None,
    ) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop thread and return at once.

        ``on_done(result, error)`` runs in the loop thread when it finishes,
        before the returned future resolves; exceptions it raises are logged,
        never lost silently.
        """
        if not self.is_running:
            coro.close()
            raise EngineClosedError("the engine loop thread has stopped")
        if on_done is not None:
            coro = self._reporting(coro, on_done)
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @staticmethod
    async def _reporting(coro: Coroutine[Any, Any, T], on_done: Callable[[T | None, BaseException | None], None]) -> T:
        # The callback runs before the future resolves, so whoever waits on the
        # future sees its effects.
        try:
            result = await coro
        except BaseException as error:
            _call_safely(on_done, None, error)
            raise
        _call_safely(on_done, result, None)
        return result

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = DEFAULT_TIMEOUT_S) -> T:
        """Run ``coro`` on the loop thread and wait for it (not from the loop thread itself)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise WorkbenchError("LoopThread.run called from its own loop thread; await the coroutine instead")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise EngineTimeoutError(f"engine call did not finish within {timeout} s") from None

    async def run_async(self, coro: Coroutine[Any, Any, T], timeout: float | None = DEFAULT_TIMEOUT_S) -> T:
        """Await ``coro`` from another event loop (e.g. a notebook cell)."""
        future = asyncio.wrap_future(self.submit(coro))
        return await asyncio.wait_for(future, timeout)

    def stop(self) -> None:
        if self.is_running:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
