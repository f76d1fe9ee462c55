"""SlotTable: spec -> engine slot bookkeeping (client side, no engine)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from workbench import AddSpec, LayerSteeringSpec, SteeringSpec
from workbench.slots import NEUTRAL_SLOT, SlotTable


def spec(value: float) -> SteeringSpec:
    return SteeringSpec({0: LayerSteeringSpec(add=AddSpec(torch.full((4,), float(value))))})


async def test_equal_specs_share_a_slot_and_empty_uses_the_neutral_row():
    loads = []

    async def load(slot, s):
        loads.append(slot)

    table = SlotTable(2, load)
    assert await table.acquire(SteeringSpec()) == NEUTRAL_SLOT
    first = await table.acquire(spec(1))
    second = await table.acquire(spec(1))
    assert first == second and loads == [first]
    await table.release(first)
    await table.release(second)
    assert await table.acquire(spec(1)) == first and loads == [first]  # still loaded


async def test_a_new_spec_waits_for_a_free_slot():
    async def load(slot, s):
        await asyncio.sleep(0)

    table = SlotTable(1, load)
    held = await table.acquire(spec(1))
    waiter = asyncio.ensure_future(table.acquire(spec(2)))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await table.release(held)
    assert await asyncio.wait_for(waiter, 1) == held
    assert table.loaded_specs() == {held: spec(2).fingerprint}


async def test_a_failed_load_frees_the_slot():
    async def load(slot, s):
        raise RuntimeError("worker down")

    table = SlotTable(1, load)
    with pytest.raises(RuntimeError):
        await table.acquire(spec(1))
    assert table.loaded_specs() == {1: None}
