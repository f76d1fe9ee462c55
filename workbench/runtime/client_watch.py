"""A steered engine does not outlive the process that started it.

vLLM's engine-core process keeps running when its client dies without
closing it (a notebook kernel killed on restart, the OOM killer, SIGKILL of
a server): it holds the model's memory, on a GPU the card, until someone
finds and kills it, and the next engine then fails to fit. The client's
hand-off folder (captured rows not yet fetched, in shared memory) stays
behind too. So every process that runs the runtime watches the client named
by ``wire.CLIENT_PID_ENV``; when it exits, the hand-off folders whose makers
are gone (its own among them: its lock went with it) are removed and the
engine core gets SIGTERM, vLLM's own shutdown path (its worker processes
follow it).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time

import psutil

from workbench import wire

logger = logging.getLogger(__name__)

POLL_S = 1.0
"""How often a client is checked where there is no pidfd (macOS, Linux < 5.3)."""


def watch_client() -> threading.Thread | None:
    """Start the watch in this engine process (None: no client to watch here)."""
    named = os.environ.get(wire.CLIENT_PID_ENV)
    if not named:
        return None
    client = int(named)
    # The engine core is the client's child, a worker process of its executor the core's.
    # Anything else (the client's own process, a worker on another host) has nothing to watch.
    parent = os.getppid()
    if parent == client:
        engine_core = os.getpid()
    elif psutil.Process(parent).ppid() == client:
        engine_core = parent
    else:
        return None
    thread = threading.Thread(
        target=_stop_after, args=(client, engine_core), name="workbench-client-watch", daemon=True
    )
    thread.start()
    return thread


def _stop_after(client: int, engine_core: int) -> None:
    _wait_for_exit(client)
    logger.warning("workbench: the process that started this engine (pid %d) is gone; shutting the engine down", client)
    wire.remove_abandoned_folders()
    os.kill(engine_core, signal.SIGTERM)


def _wait_for_exit(pid: int) -> None:
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd here (macOS, Linux < 5.3): poll
        while _alive(pid):
            time.sleep(POLL_S)
        return
    try:
        select.select([handle], [], [])  # readable once the process has exited
    finally:
        os.close(handle)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        pass
    return True
