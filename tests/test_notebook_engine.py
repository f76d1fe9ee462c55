"""One engine per kernel: start once, refuse a different config, restart a dead engine."""

from __future__ import annotations

import asyncio
import signal
import threading

import psutil
import pytest
from vllm import SamplingParams
from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

from tests.conftest import ENGINE_SETTINGS
from workbench import EngineDeadError, VLLMSteeringConfig
from workbench.notebook import EngineConfigError, get_engine, shutdown_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def config():
    yield VLLMSteeringConfig(**{**ENGINE_SETTINGS, "max_steering_slots": 4})
    shutdown_engine()


@pytest.mark.slow
async def test_engine_singleton_lifecycle(config):
    engine = get_engine(config)
    assert get_engine(config) is engine and get_engine() is engine
    # From a "cell": await across loops; from a "callback": run blocking in a thread.
    text = await engine.run_async(engine.model.generate("Hello", GREEDY))
    result = {}
    worker = threading.Thread(target=lambda: result.update(text=engine.run(engine.model.generate("Hello", GREEDY))))
    worker.start()
    worker.join(60)
    assert result["text"] == text
    with pytest.raises(EngineConfigError, match="max_model_len: running 1024, asked 512"):
        get_engine(VLLMSteeringConfig(**{**ENGINE_SETTINGS, "max_steering_slots": 4, "max_model_len": 512}))
    # A dead engine is noticed and replaced on the next call.
    engine.model.close()
    assert not engine.is_alive
    fresh = get_engine(config)
    assert fresh is not engine and fresh.is_alive
    assert await fresh.run_async(fresh.model.generate("Hello", GREEDY)) == text


@pytest.mark.slow
async def test_engine_killed_mid_session_is_reported_and_restarted(config):
    """An engine process that dies raises in the caller (no hang), is seen as
    dead, and the next get_engine() starts a working one."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = get_engine(config, restart=True)
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    core = next(p for p in started if "EngineCore" in p.name())
    core.send_signal(signal.SIGKILL)
    # vLLM's EngineDeadError if the request was already under way, ours if the death was noticed first.
    with pytest.raises((EngineDeadError, VllmEngineDeadError)):
        await asyncio.wait_for(engine.run_async(engine.model.generate("Hello", GREEDY)), 60)
    assert not engine.is_alive
    fresh = get_engine(config)
    assert fresh is not engine
    assert await fresh.run_async(fresh.model.generate("Hello", GREEDY))
