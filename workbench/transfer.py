"""How captured rows travel from the rank-0 worker to the client.

A fetch moves hundreds of MB (256 requests x 192 tokens x 4096 x bf16 is
400 MB per layer); vLLM's RPC channel would serialise and copy that several
times. Instead the client owns a folder in shared memory (``/dev/shm``), the
worker allocates the fetch's rows as a file there and assembles them in
place, and the client maps the file and unlinks it: the rows are written
once and never copied again. A worker that cannot see the folder (another
host) falls back to safetensors bytes through the RPC reply.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

SHARED_MEMORY = Path("/dev/shm")


def make_folder() -> tempfile.TemporaryDirectory[str]:
    """The client's hand-off folder: in shared memory where the host has it."""
    parent = SHARED_MEMORY if SHARED_MEMORY.is_dir() else None
    return tempfile.TemporaryDirectory(prefix="workbench-captures-", dir=parent)


class RowsOut:
    """The worker side: a ``[rows, hidden]`` tensor to assemble into, then its reply fields."""

    def __init__(self, folder: str | None, rows: int, hidden: int, dtype: torch.dtype) -> None:
        self.path: Path | None = None
        if folder is not None and rows and Path(folder).is_dir():
            self.path = Path(folder) / f"{uuid.uuid4().hex}.rows"
            flat = torch.from_file(str(self.path), shared=True, size=rows * hidden, dtype=dtype)
        else:
            flat = torch.empty(rows * hidden, dtype=dtype)
        self.rows = flat.view(rows, hidden)

    def reply(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"dtype": str(self.rows.dtype).removeprefix("torch.")}
        if self.path is not None:
            fields["path"] = str(self.path)
        else:
            fields["data"] = save_tensors({"rows": self.rows})
        return fields


def read_rows(reply: dict[str, Any], hidden: int) -> Tensor:
    """The client side: the reply's rows as a ``[rows, hidden]`` tensor, mapped
    from the shared file (which is unlinked; the mapping lives as long as any
    view of it) or decoded from the inline bytes."""
    if "path" not in reply:
        return load_tensors(reply["data"])["rows"]
    path = Path(reply["path"])
    dtype = getattr(torch, reply["dtype"])
    try:
        count = path.stat().st_size // dtype.itemsize
        return torch.from_file(str(path), shared=False, size=count, dtype=dtype).view(-1, hidden)
    finally:
        path.unlink(missing_ok=True)
