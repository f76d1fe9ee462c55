"""One engine per kernel: ``get_engine()`` starts the shared ``VLLMSteerModel``
once, on the bridge's loop thread, and hands back a ``NotebookEngine`` that
runs its coroutines there. ``get_engine(url=...)`` uses a steering server
instead (a ``RemoteSteerModel``: the model runs on another machine).

Asking again with another config raises ``EngineConfigError`` naming the
difference; pass ``restart=True`` to replace the engine. An engine whose
processes died is noticed on the next ``get_engine()`` and restarted, with a
message. Unless the config names a ``log_file``, the engine processes'
output goes to this kernel's log file under the workbench folder
(``home.engine_log_path()``), and so does what vLLM logs in the kernel's own
process: cells show one progress line, not vLLM's log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from workbench.client import VLLMSteeringConfig, VLLMSteerModel
from workbench.errors import EngineConfigError
from workbench.notebook.bridge import DEFAULT_TIMEOUT_S, LoopThread
from workbench.notebook.home import engine_log_path
from workbench.remote import RemoteSteerModel
from workbench.steer_model import SteerModel

logger = logging.getLogger(__name__)

T = TypeVar("T")


@contextlib.contextmanager
def _elapsed(description: str) -> Iterator[None]:
    """A progress line with elapsed time while something of unknown length runs."""
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=description, bar_format="{desc} {elapsed}")
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()


LOGGING_CONFIG_ENV = "VLLM_LOGGING_CONFIG_PATH"
"""vLLM's own setting: a ``logging.config.dictConfig`` JSON file its processes apply."""


def _vllm_logs_to(path: str) -> None:
    """Have vLLM log into ``path`` in this process and in the engine's (unless
    the user configured vLLM's logging): through vLLM's documented logging
    config file, which every process applies when vLLM sets up its logging."""
    if os.environ.get(LOGGING_CONFIG_ENV) or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
        return
    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper()
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "(%(processName)s pid=%(process)d) %(levelname)s %(asctime)s %(name)s: %(message)s"}
        },
        "handlers": {"file": {"class": "logging.FileHandler", "filename": path, "formatter": "plain", "level": level}},
        "loggers": {"vllm": {"handlers": ["file"], "level": level, "propagate": False}},
    }
    config_path = Path(path).with_suffix(".logging.json")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=1))
    os.environ[LOGGING_CONFIG_ENV] = str(config_path)


class NotebookEngine:
    """The shared model plus the loop thread it runs on."""

    def __init__(self, config: VLLMSteeringConfig, engine_kwargs: dict[str, Any], url: str | None = None) -> None:
        self.config = config
        self.engine_kwargs = engine_kwargs
        self.url = url
        self.bridge = LoopThread()

        async def start() -> SteerModel:
            # Built on the loop thread so vLLM's AsyncLLM binds to that loop.
            if url is not None:
                return RemoteSteerModel(url, **engine_kwargs)
            return VLLMSteerModel(config, **engine_kwargs)

        if url is not None:
            description = f"connecting to {url}; elapsed"
        else:
            if config.log_file is not None:
                _vllm_logs_to(config.log_file)
            description = f"starting the engine ({config.model_name}); its log: {config.log_file}; elapsed"
        with _elapsed(description):
            self.model: SteerModel = self.bridge.run(start(), timeout=None)

    @property
    def is_alive(self) -> bool:
        return self.bridge.is_running and self.model.is_alive

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = DEFAULT_TIMEOUT_S) -> T:
        """Block until ``coro`` (a model coroutine) finishes; for cells and scripts."""
        return self.bridge.run(coro, timeout)

    async def run_async(self, coro: Coroutine[Any, Any, T], timeout: float | None = DEFAULT_TIMEOUT_S) -> T:
        """``await engine.run_async(model.generate(...))`` from a notebook cell."""
        return await self.bridge.run_async(coro, timeout)

    def submit(self, coro: Coroutine[Any, Any, T], on_done: Any = None) -> Any:
        """Start ``coro`` without blocking (widget callbacks); see ``LoopThread.submit``."""
        return self.bridge.submit(coro, on_done)

    def close(self) -> None:
        self.model.close()
        self.bridge.stop()


_lock = threading.Lock()
_current: NotebookEngine | None = None


def _differences(a: VLLMSteeringConfig, b: VLLMSteeringConfig) -> list[str]:
    return [
        f"{field.name}: running {getattr(a, field.name)!r}, asked {getattr(b, field.name)!r}"
        for field in dataclasses.fields(a)
        if getattr(a, field.name) != getattr(b, field.name)
    ]


def _with_log_file(config: VLLMSteeringConfig) -> VLLMSteeringConfig:
    if config.log_file is not None:
        return config
    return dataclasses.replace(config, log_file=str(engine_log_path()))


def get_engine(
    config: VLLMSteeringConfig | None = None, restart: bool = False, url: str | None = None, **engine_kwargs: Any
) -> NotebookEngine:
    """The kernel's engine, started on first use (this takes a while; a progress line shows the time).

    With ``url``, the model is the steering server there (``RemoteSteerModel``;
    ``engine_kwargs`` are its options, e.g. ``api_key``) instead of an engine in this kernel.
    """
    global _current
    if url is not None and config is not None:
        raise EngineConfigError("give a config (an engine in this kernel) or a url (a steering server), not both")
    if config is not None:
        config = _with_log_file(config)
    with _lock:
        if _current is not None and not restart:
            if _current.is_alive:
                differences = _differences(_current.config, config) if config is not None else []
                if url != _current.url and (url is not None or config is not None):
                    differences.append(f"url: running {_current.url!r}, asked {url!r}")
                if engine_kwargs and engine_kwargs != _current.engine_kwargs:
                    differences.append(f"engine_kwargs: running {_current.engine_kwargs!r}, asked {engine_kwargs!r}")
                if differences:
                    raise EngineConfigError(
                        "the engine is already running with another configuration ("
                        + "; ".join(differences)
                        + "); call get_engine(config, restart=True) to replace it"
                    )
                return _current
            logger.warning("the workbench engine had stopped; starting a new one")
        if _current is not None:
            _current.close()
            _current = None
        _current = NotebookEngine(config or _with_log_file(VLLMSteeringConfig()), engine_kwargs, url)
        return _current


def shutdown_engine() -> None:
    """Stop the kernel's engine, if any."""
    global _current
    with _lock:
        if _current is not None:
            _current.close()
            _current = None
