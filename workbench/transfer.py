"""How captured rows travel from the rank-0 worker to the client.

A fetch moves hundreds of MB (256 requests x 192 tokens x 4096 x bf16 is
400 MB per layer); vLLM's RPC channel would serialise and copy that several
times. Instead the client owns a folder in shared memory (``/dev/shm``), the
worker writes each capture's rows into files there while generating (see
``workbench.runtime.capture_space``), and at fetch the client maps the files: the
rows are written once and never copied again. Once the client no longer
views a file, the worker reuses it (and its memory) for a later capture. A
worker that cannot see the folder (another host) sends the rows as
safetensors bytes in the RPC reply instead.
"""

from __future__ import annotations

import collections
import itertools
import mmap
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from workbench.wire import FetchReply, RowsKey


def read_reply(reply: FetchReply, hidden: int, recycle: Callable[[str], None] | None = None) -> dict[RowsKey, Tensor]:
    """The rows of a fetch reply: ``(capture_id, layer)`` -> ``[rows, hidden]``.

    A capture's file holds all its layers, each at its own offset; it is
    mapped once, privately (writes to the tensors stay in this process), and
    every layer's tensor views that one mapping. With ``recycle``, the file
    stays in the folder and ``recycle(path)`` is called once no tensor views
    any of its layers (from the thread that dropped the last one), so the
    worker can write the next capture into the same pages: faulting fresh
    shared memory in and freeing it again cost more than writing the rows.
    Without it the file is unlinked at once and its memory lives as long as
    some view of it does.
    """
    tensors = dict(reply.inline)
    dtype = getattr(torch, reply.dtype)
    row_bytes = hidden * dtype.itemsize
    layers_of: dict[str, list[tuple[RowsKey, int, int]]] = collections.defaultdict(list)
    for key, (name, rows, offset) in reply.files.items():
        layers_of[name].append((key, rows, offset))
    for name, parts in layers_of.items():
        length = max(offset + rows * row_bytes for _, rows, offset in parts)
        if length == 0:  # nothing recorded (an mmap cannot be empty)
            tensors.update({key: torch.empty(0, hidden, dtype=dtype) for key, _, _ in parts})
            _let_go(name, recycle)
            continue
        try:
            with open(name, "rb") as file:
                memory = mmap.mmap(file.fileno(), length, flags=mmap.MAP_PRIVATE)
        except BaseException:
            _let_go(name, recycle)
            raise
        # frombuffer keeps `memory` alive for as long as any view of the tensor lives.
        whole = torch.frombuffer(memory, dtype=dtype)
        tensors.update(_layer_views(whole, parts, hidden))
        del whole
        if recycle is None:
            Path(name).unlink(missing_ok=True)
        else:
            weakref.finalize(memory, recycle, name).atexit = False
    return tensors


def _layer_views(whole: Tensor, parts: list[tuple[RowsKey, int, int]], hidden: int) -> dict[RowsKey, Tensor]:
    """``[rows, hidden]`` views of ``whole`` at each part's byte offset. The
    blocks of a capture's layers are evenly spaced with equal row counts: then
    one ``unbind`` makes every view (slicing each in Python cost ~13 us, 0.1 s
    for 32 layers of 256 requests)."""
    parts = sorted(parts, key=lambda part: part[2])
    firsts = [offset // whole.element_size() for _, _, offset in parts]
    counts = {count for _, count, _ in parts}
    strides = {later - earlier for earlier, later in itertools.pairwise(firsts)}
    if len(counts) == 1 and len(strides) == 1 and min(strides) > 0:
        shape, stride = (len(parts), counts.pop(), hidden), (strides.pop(), hidden, 1)
        blocks = whole.as_strided(shape, stride, firsts[0]).unbind(0)
        return {key: block for (key, _, _), block in zip(parts, blocks)}
    return {
        key: whole[first : first + rows * hidden].view(rows, hidden) for (key, rows, _), first in zip(parts, firsts)
    }


def _let_go(name: str, recycle: Callable[[str], None] | None) -> None:
    if recycle is None:
        Path(name).unlink(missing_ok=True)
    else:
        recycle(name)
