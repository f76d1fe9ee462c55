"""Where vLLM's output goes: quiet by default, and kept to explain failures.

vLLM logs its whole configuration at INFO from every engine process, which
buries a script's or a notebook cell's own output. Unless the user chose a
level (``WORKBENCH_LOG_LEVEL``, or vLLM's own ``VLLM_LOGGING_LEVEL``),
importing workbench sets vLLM's level to WARNING; ``WORKBENCH_LOG_LEVEL=INFO``
brings the full log back.

``EngineOutput`` runs the engine processes' stdout and stderr through a pipe:
a thread forwards it (to this process's stderr or to a log file) and keeps
the last lines, so that an engine that fails to start raises an error with
vLLM's own reason instead of "see the log above".
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

LOG_LEVEL_ENV = "WORKBENCH_LOG_LEVEL"
VLLM_LEVEL_ENV = "VLLM_LOGGING_LEVEL"

QUIET_ENGINE_ENV = {
    # The engine processes' Python warnings (deprecations inside vLLM and torch)
    # and torch's C++ warnings are for vLLM's developers, not for its users.
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}

TAIL_LINES = 400
"""Lines of engine output kept for error messages."""

_ERROR_LINE = re.compile(
    r"^\s*(?:\(\w+ pid=\d+\)\s*)?(?:[A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]*\]\s*)?([A-Za-z_][\w.]*(?:Error|Exception)\b.*)$"
)
"""The last line of a Python traceback, as vLLM's processes print it (bare, or after their log prefix)."""

_POINTER = re.compile(r"root cause|stack trace|see (the )?log", re.IGNORECASE)
"""Messages that only point elsewhere ("see root cause above"): the reason is an earlier line."""


_level_chosen = bool(os.environ.get(LOG_LEVEL_ENV) or os.environ.get(VLLM_LEVEL_ENV))
"""Whether the user chose vLLM's log level (before workbench set its default)."""


def quiet_vllm() -> None:
    """Set vLLM's log level (and the engine processes' warning filters) unless the user chose them."""
    os.environ.setdefault(VLLM_LEVEL_ENV, os.environ.get(LOG_LEVEL_ENV, "WARNING").upper())
    if os.environ[VLLM_LEVEL_ENV].upper() in ("WARNING", "ERROR", "CRITICAL"):
        for key, value in QUIET_ENGINE_ENV.items():
            os.environ.setdefault(key, value)
    if "vllm" in sys.modules:  # imported before us: its logger is configured already
        logging.getLogger("vllm").setLevel(os.environ[VLLM_LEVEL_ENV].upper())


def server_logging() -> None:
    """vLLM's own INFO log unless the user chose a level: a server reports its
    start-up, routes and requests there, as ``vllm serve`` does."""
    if not _level_chosen:
        os.environ[VLLM_LEVEL_ENV] = "INFO"
        for key, value in QUIET_ENGINE_ENV.items():
            if os.environ.get(key) == value:
                del os.environ[key]
        logging.getLogger("vllm").setLevel("INFO")


class EngineOutput:
    """The engine processes' stdout and stderr, forwarded by a thread and its tail kept.

    ``attached()`` wraps the engine's start: processes started inside it
    inherit the pipe as their stdout and stderr for their whole life (and
    pass it on to their own children). This process's own output during that
    time goes through the pipe too, and is forwarded like the rest.
    """

    def __init__(self, log_file: str | os.PathLike[str] | None = None) -> None:
        self.log_file = Path(log_file) if log_file is not None else None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._read, self._write = os.pipe()
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._destination = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        else:
            self._destination = os.dup(2)
        self._thread = threading.Thread(target=self._forward, name="workbench-engine-output", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(self._write, 1)
        os.dup2(self._write, 2)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            # The engine processes hold their own copies; ours would keep the pipe open after they exit.
            os.close(self._write)
            self._write = -1

    def _forward(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            with contextlib.suppress(OSError):
                os.write(self._destination, chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            self._tail.extend(line.decode(errors="replace") for line in lines)
        os.close(self._read)
        if self.log_file is not None:
            os.close(self._destination)

    def tail(self) -> list[str]:
        """The last lines the engine printed."""
        return list(self._tail)

    def failure_reason(self) -> str | None:
        """The last Python exception the engine printed (``Type: message``, with
        the message's following lines when it spans several), if any."""
        lines = self.tail()
        for index in range(len(lines) - 1, -1, -1):
            match = _ERROR_LINE.match(lines[index])
            if match and not _POINTER.search(match.group(1)):
                reason = match.group(1).strip()
                if reason.endswith(":"):
                    following = [line.strip() for line in lines[index + 1 : index + 8]]
                    reason = " ".join([reason, *(line for line in following if line)][:4])
                return reason
        return None

    def drain(self, timeout_s: float = 5.0) -> None:
        """Wait (briefly) until the engine processes' last output has been read:
        when they have exited, the pipe ends."""
        self._thread.join(timeout_s)
