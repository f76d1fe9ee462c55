"""The capture budget alone: reservations wait in order and shrink; one larger than the budget is refused."""

from __future__ import annotations

import asyncio

import pytest

from workbench import CaptureBudgetError
from workbench.capture_budget import CaptureBudget


async def test_reservations_wait_for_room_in_order_of_arrival():
    budget = CaptureBudget(100)
    await budget.reserve("a", 60)
    second = asyncio.create_task(budget.reserve("b", 50))
    third = asyncio.create_task(budget.reserve("c", 10))  # fits, but waits behind b
    await asyncio.sleep(0.01)
    assert not second.done() and not third.done()
    assert budget.use().waiting == 2 and budget.used_bytes == 60
    budget.shrink("a", 40)  # a finished with fewer rows than it could have
    await asyncio.gather(second, third)
    assert budget.used_bytes == 100
    budget.release("a")
    budget.release("a")  # twice: ignored
    budget.release("unknown")
    assert budget.use() == budget.use().__class__(100, 60, 2, 0)


async def test_a_cancelled_waiter_gives_its_place_back():
    budget = CaptureBudget(100)
    await budget.reserve("a", 90)
    waiting = asyncio.create_task(budget.reserve("b", 50))
    after = asyncio.create_task(budget.reserve("c", 5))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.wait_for(after, 1)
    assert budget.used_bytes == 95 and budget.use().waiting == 0


async def test_a_capture_larger_than_the_budget_is_refused_with_the_sizes():
    budget = CaptureBudget(1 << 20)
    with pytest.raises(CaptureBudgetError, match=r"2.0 MiB \(2097152 bytes\).*1.0 MiB \(1048576 bytes\)"):
        await budget.reserve("a", 2 << 20)
    assert budget.used_bytes == 0
    for bad in (0, -5, 1.5, True, None):
        with pytest.raises(CaptureBudgetError, match="positive number of bytes"):
            CaptureBudget(bad)
