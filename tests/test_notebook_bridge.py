"""LoopThread: the engine's own event loop, reachable from cells and callbacks."""

from __future__ import annotations

import asyncio
import threading

import pytest

from workbench import WorkbenchError
from workbench.notebook.bridge import LoopThread


@pytest.fixture
def bridge():
    loop_thread = LoopThread(name="test-loop")
    yield loop_thread
    loop_thread.stop()


async def where_am_i() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


def test_run_blocks_until_the_coroutine_finishes_on_the_loop_thread(bridge):
    assert bridge.run(where_am_i()) == "test-loop"


async def test_run_async_from_another_running_loop(bridge):
    # A notebook cell with top-level await runs on the kernel's loop, like this test.
    assert await bridge.run_async(where_am_i()) == "test-loop"


def test_submit_reports_results_and_errors_to_the_callback(bridge):
    done = threading.Event()
    seen = []

    async def fail():
        raise ValueError("bad value 42")

    def on_done(result, error):
        seen.append((result, error))
        if len(seen) == 2:
            done.set()

    bridge.submit(where_am_i(), on_done)
    bridge.submit(fail(), on_done)
    assert done.wait(5)
    results = sorted(seen, key=lambda item: item[1] is not None)
    assert results[0] == ("test-loop", None)
    assert isinstance(results[1][1], ValueError) and "42" in str(results[1][1])


def test_run_times_out_instead_of_hanging(bridge):
    with pytest.raises(TimeoutError, match="within 0.1 s"):
        bridge.run(asyncio.sleep(10), timeout=0.1)
    assert bridge.run(where_am_i()) == "test-loop"  # still serving


def test_run_from_the_loop_thread_itself_is_refused(bridge):
    async def nested():
        inner = where_am_i()
        with pytest.raises(WorkbenchError, match="own loop thread"):
            bridge.run(inner)
        return "ok"

    assert bridge.run(nested()) == "ok"


def test_a_stopped_bridge_refuses_work(bridge):
    from workbench import EngineClosedError

    bridge.stop()
    with pytest.raises(EngineClosedError):
        bridge.submit(where_am_i())
