"""How captured rows travel from the rank-0 worker to the client.

A fetch moves hundreds of MB (256 requests x 192 tokens x 4096 x bf16 is
400 MB per layer); vLLM's RPC channel would serialise and copy that several
times. Instead the client owns a folder in shared memory (``/dev/shm``), the
worker writes each capture's rows into files there while generating (see
``workbench.capture_space``), and at fetch the client maps the files and
unlinks them: the rows are written once and never copied again. A worker
that cannot see the folder (another host) sends the rows as safetensors
bytes in the RPC reply instead.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from torch import Tensor

SHARED_MEMORY = Path("/dev/shm")


def make_folder(prefix: str = "workbench-captures-") -> tempfile.TemporaryDirectory[str]:
    """A folder for capture files: in shared memory where the host has it."""
    parent = SHARED_MEMORY if SHARED_MEMORY.is_dir() else None
    return tempfile.TemporaryDirectory(prefix=prefix, dir=parent)


def read_reply(reply: dict[str, Any], hidden: int) -> dict[str, Tensor]:
    """The client side of a fetch reply: ``"<capture_id>/<layer>"`` -> ``[rows, hidden]``.

    Files are mapped privately (writes to the tensors stay in this process)
    and unlinked at once: the memory lives as long as some view of it does.
    """
    tensors = load_tensors(reply["data"]) if "data" in reply else {}
    dtype = getattr(torch, reply["dtype"])
    for key, (name, rows) in reply["files"].items():
        path = Path(name)
        try:
            if rows:
                tensors[key] = torch.from_file(name, shared=False, size=rows * hidden, dtype=dtype).view(rows, hidden)
            else:
                tensors[key] = torch.empty(0, hidden, dtype=dtype)
        finally:
            path.unlink(missing_ok=True)
    return tensors
