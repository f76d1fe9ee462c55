"""Client-side bookkeeping of the engine's steering slots.

The workers hold ``num_slots`` rows of steering tables (plus the neutral row
0). Every request names the row it runs with, so different specs can share a
batch. ``SlotTable`` maps spec fingerprints to rows with reference counts:
requests with equal specs share a row, a row stays loaded after its last user
finishes (reused if the spec comes back), and when all rows are busy a new
spec waits until one frees up. Each request holds at most one row, so waiting
cannot deadlock.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from workbench.specs import SteeringSpec

NEUTRAL_SLOT = 0


@dataclass
class _Row:
    fingerprint: str | None = None
    refs: int = 0
    last_used: int = 0
    loaded: asyncio.Event = field(default_factory=asyncio.Event)


class SlotTable:
    """Assigns specs to engine slots ``1..num_slots``; ``load(slot, spec)`` writes one into the workers."""

    def __init__(self, num_slots: int, load: Callable[[int, SteeringSpec], Awaitable[None]]) -> None:
        self._rows = {slot: _Row() for slot in range(1, num_slots + 1)}
        self._by_fingerprint: dict[str, int] = {}
        self._load = load
        self._clock = itertools.count(1)
        self._freed = asyncio.Condition()

    async def acquire(self, spec: SteeringSpec) -> int:
        """The slot holding ``spec`` (loading it if needed); pair with ``release``."""
        if spec.is_empty():
            return NEUTRAL_SLOT
        fingerprint = spec.fingerprint
        async with self._freed:
            while True:
                slot = self._by_fingerprint.get(fingerprint)
                if slot is not None:
                    must_load = False
                    break
                slot = self._free_slot()
                if slot is not None:
                    must_load = True
                    break
                await self._freed.wait()
            row = self._rows[slot]
            row.refs += 1
            row.last_used = next(self._clock)
            if must_load:
                if row.fingerprint is not None:
                    del self._by_fingerprint[row.fingerprint]
                row.fingerprint = fingerprint
                row.loaded = asyncio.Event()
                self._by_fingerprint[fingerprint] = slot
        if must_load:
            try:
                await self._load(slot, spec)
            except BaseException:
                await self._forget(slot)
                raise
            row.loaded.set()
        else:
            await row.loaded.wait()
            if row.fingerprint != fingerprint:  # its load failed while we waited
                await self.release(slot)
                return await self.acquire(spec)
        return slot

    async def release(self, slot: int) -> None:
        if slot == NEUTRAL_SLOT:
            return
        async with self._freed:
            self._rows[slot].refs -= 1
            self._freed.notify_all()

    async def _forget(self, slot: int) -> None:
        row = self._rows[slot]
        async with self._freed:
            if row.fingerprint is not None:
                self._by_fingerprint.pop(row.fingerprint, None)
            row.fingerprint = None
            row.refs -= 1
            row.loaded.set()  # wake waiters; they see the cleared fingerprint
            self._freed.notify_all()

    def _free_slot(self) -> int | None:
        idle = [(row.fingerprint is not None, row.last_used, slot) for slot, row in self._rows.items() if row.refs == 0]
        return min(idle)[2] if idle else None

    def loaded_specs(self) -> dict[int, str | None]:
        """Slot -> fingerprint of the spec it holds (for diagnostics and tests)."""
        return {slot: row.fingerprint for slot, row in self._rows.items()}
