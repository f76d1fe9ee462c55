"""The capture budget: bytes of host memory that captured rows not yet fetched may hold.

Every capturing request reserves its capacity (prompt + ``max_tokens`` - 1
rows, per layer) before it is submitted, and waits, first come first
served, while the reservations held leave no room for it. Once the request
has finished its reservation shrinks to the rows it really recorded; it is
returned when the rows are fetched (they then belong to the caller) or
released. A request that alone needs more than the budget can never run
and raises ``CaptureBudgetError`` at once, naming the sizes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import CaptureBudgetError

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_FRACTION = 0.5
"""Share of the free shared memory that the default budget takes (measured when the engine starts)."""

WAIT_WARNING_S = 30.0
"""A request waiting this long for room logs a warning (its caller may hold unfetched handles)."""


def default_budget_bytes(folder: str | Path) -> int:
    """``DEFAULT_BUDGET_FRACTION`` of the free space in ``folder`` (the hand-off folder, where rows are written)."""
    stats = os.statvfs(folder)
    return int(stats.f_bavail * stats.f_frsize * DEFAULT_BUDGET_FRACTION)


def format_bytes(count: int) -> str:
    """``count`` bytes in MiB, or GiB from 1 GiB on."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


@dataclass(frozen=True)
class BudgetUse:
    """A snapshot of the budget: its limit, the bytes reserved and the requests waiting for room."""

    limit_bytes: int
    used_bytes: int
    reservations: int
    waiting: int


class CaptureBudget:
    """Reservations of captured rows against ``limit_bytes``, by capture id (one event loop)."""

    def __init__(self, limit_bytes: int) -> None:
        if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes <= 0:
            raise CaptureBudgetError(f"the capture budget must be a positive number of bytes, got {limit_bytes!r}")
        self.limit_bytes = limit_bytes
        self._held: dict[str, int] = {}
        self._used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def used_bytes(self) -> int:
        return self._used

    def use(self) -> BudgetUse:
        return BudgetUse(self.limit_bytes, self._used, len(self._held), len(self._waiters))

    def check(self, nbytes: int, what: str = "this capture") -> None:
        """Raise ``CaptureBudgetError`` if ``nbytes`` can never fit."""
        if nbytes > self.limit_bytes:
            raise CaptureBudgetError(
                f"{what} may need {format_bytes(nbytes)} ({nbytes} bytes) of captured rows, more than the whole "
                f"capture budget of {format_bytes(self.limit_bytes)} ({self.limit_bytes} bytes): lower max_tokens, "
                "capture fewer layers or prompts at once (model.extract streams any number to disk), or raise "
                "VLLMSteeringConfig.capture_budget_bytes"
            )

    async def reserve(self, capture_id: str, nbytes: int) -> None:
        """Hold ``nbytes`` for ``capture_id``, waiting (in order of arrival) until they fit."""
        self.check(nbytes)
        if not self._waiters and self._used + nbytes <= self.limit_bytes:
            self._take(capture_id, nbytes)
            return
        future = asyncio.get_running_loop().create_future()
        entry = (nbytes, future)
        self._waiters.append(entry)
        try:
            done, _ = await asyncio.wait({future}, timeout=WAIT_WARNING_S)
            if not done:
                logger.warning(
                    "a capture of %s has waited %.0f s for room in the capture budget (%s of %s reserved by "
                    "captures running or not fetched yet): fetch or close capture handles to free it",
                    format_bytes(nbytes),
                    WAIT_WARNING_S,
                    format_bytes(self._used),
                    format_bytes(self.limit_bytes),
                )
                await future
        except BaseException:
            if future.done() and not future.cancelled():
                self._used -= nbytes  # granted while being cancelled: give it back
                self._wake()
            else:
                future.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise
        self._held[capture_id] = nbytes

    def _take(self, capture_id: str, nbytes: int) -> None:
        self._held[capture_id] = nbytes
        self._used += nbytes

    def shrink(self, capture_id: str, nbytes: int) -> None:
        """Lower the reservation of ``capture_id`` to ``nbytes`` (its request finished with fewer rows)."""
        held = self._held.get(capture_id)
        if held is not None and nbytes < held:
            self._held[capture_id] = nbytes
            self._used -= held - nbytes
            self._wake()

    def release(self, capture_id: str) -> None:
        """Return the reservation of ``capture_id`` (fetched or released; unknown ids are ignored)."""
        held = self._held.pop(capture_id, None)
        if held is not None:
            self._used -= held
            self._wake()

    def _wake(self) -> None:
        """Grant waiting reservations in order while they fit (the bytes are counted here, the id on waking)."""
        while self._waiters:
            nbytes, future = self._waiters[0]
            if future.cancelled():
                self._waiters.popleft()
                continue
            if self._used + nbytes > self.limit_bytes:
                return
            self._waiters.popleft()
            self._used += nbytes
            future.set_result(None)
