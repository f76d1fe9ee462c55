"""Where a worker writes captured rows: one file per capture, in shared
memory, all mapped side by side in one reserved address range.

Each capturing request gets a file holding, for each captured layer in turn,
a block of ``capacity x hidden`` rows (prompt + max_tokens - 1) in the
client's hand-off folder under ``/dev/shm`` (a new file, or one the client
gave back, renamed: see ``capture_store.FilePool``). One file per capture
rather than per capture and layer: capturing all 32 layers of 256 requests
opened, mapped and unmapped 8192 files a run. Rows are written into the file
as the steps run; at fetch time the client maps it, so the rows are never
copied after generation (assembling them at fetch cost ~0.3 s per 400 MB
layer, most of it first-touch page faults, which now fall while the GPU
runs). The files are sparse, so rows a request never reaches cost nothing.

The worker maps every open file at a fixed place inside one reserved range
of its address space, and ``RowSpace.rows`` views that whole range as one
``[rows, hidden]`` tensor: the rows of all capturing requests of a step then
land with one ``index_copy_`` per layer (or per run of layers), where a
Python loop over requests would cost a few microseconds per request, layer
and step. Row 0 is a scratch row for rows nobody keeps. ``index_copy_`` on
the CPU moves one element at a time, so rows are copied as 16-byte elements
(``RowSpace.write``): twice as fast as bfloat16 elements, measured on mapped
pages.

Linux only (``mmap`` with ``MAP_FIXED`` through libc: Python's ``mmap``
module cannot place a mapping).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import threading
from bisect import insort
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from workbench.errors import RowSpaceError

RESERVED_BYTES = 1 << 42
"""Address space reserved for open capture files (4 TiB: virtual only, no
memory is committed). A window per capture and layer is sized for the
request's longest possible output, e.g. 1 GiB for 128k tokens x 4096 x bf16."""

_PROT_NONE = 0
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(address: int | None, length: int, prot: int, flags: int, fd: int = -1) -> int:
    result = _libc.mmap(address, length, prot, flags, fd, 0)
    if result == _MAP_FAILED or (address is not None and result != address):
        errno = ctypes.get_errno()
        raise RowSpaceError(f"mmap of {length} bytes failed: {os.strerror(errno)}")
    return result


def _reserve(address: int | None, length: int) -> int:
    """Map ``length`` bytes of inaccessible, uncommitted address space."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | (_MAP_FIXED if address is not None else 0)
    return _mmap(address, length, _PROT_NONE, flags)


class FreeRanges:
    """First-fit allocator of ``[start, start + length)`` ranges of units, merging freed neighbours."""

    def __init__(self, start: int, length: int) -> None:
        self._free: list[tuple[int, int]] = [(start, length)]

    def take(self, length: int) -> int | None:
        for place, (start, size) in enumerate(self._free):
            if size >= length:
                if size == length:
                    del self._free[place]
                else:
                    self._free[place] = (start + length, size - length)
                return start
        return None

    def give(self, start: int, length: int) -> None:
        insort(self._free, (start, length))
        merged: list[tuple[int, int]] = []
        for begin, size in self._free:
            if merged and merged[-1][0] + merged[-1][1] == begin:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((begin, size))
        self._free = merged


@dataclass(frozen=True)
class Window:
    """One open capture file and where its rows sit in ``RowSpace.rows``."""

    path: Path
    first_row: int
    capacity: int
    units: int
    growth: int
    """Bytes of shared memory the file may still allocate (counted against the free space)."""


class RowSpace:
    """The reserved range, its ``[rows, hidden]`` tensor view, and the open windows."""

    def __init__(self, hidden: int, dtype: torch.dtype, reserved_bytes: int = RESERVED_BYTES) -> None:
        self.hidden = hidden
        self.dtype = dtype
        self.row_bytes = hidden * dtype.itemsize
        # Windows start on page boundaries (mmap) that are also row boundaries.
        self.unit_bytes = math.lcm(mmap.PAGESIZE, self.row_bytes)
        self.rows_per_unit = self.unit_bytes // self.row_bytes
        units = reserved_bytes // self.unit_bytes
        self._base = _reserve(None, units * self.unit_bytes)
        buffer = (ctypes.c_char * (units * self.unit_bytes)).from_address(self._base)
        self.rows: Tensor = torch.frombuffer(buffer, dtype=dtype).view(-1, hidden)
        self.copy_dtype = _widest_dtype(self.row_bytes)
        self._wide_rows = self.rows.view(self.copy_dtype)
        # Unit 0 is ordinary memory holding the scratch row.
        _mmap(
            self._base,
            self.unit_bytes,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED,
        )
        self.scratch_row = 0
        self._free = FreeRanges(1, units - 1)
        self._lock = threading.Lock()
        """Windows are opened on the model's thread and may be closed on a helper thread."""
        self._open_bytes = 0
        """What the open windows' files may still allocate (an upper bound)."""
        self.open_file_bytes = 0
        """Sizes of the open windows' files (what their rows may take at most)."""

    def open(self, path: Path, capacity: int, reuse: Path | None = None) -> Window:
        """Create ``path`` sized for ``capacity`` rows and map it into the range.
        With ``reuse``, that file (pages and all) is renamed to ``path`` instead
        and grown if it is smaller (a larger one keeps its size: shrinking it
        would free pages on the model's thread, which a later capture may
        want); ``FileNotFoundError`` if it is gone."""
        units = max(1, -(-capacity // self.rows_per_unit))
        size = capacity * self.row_bytes
        if reuse is not None:
            os.rename(reuse, path)
        fd = os.open(path, os.O_RDWR | (0 if reuse else os.O_CREAT | os.O_EXCL), 0o600)
        start = None
        try:
            # What the file may still allocate: its size less the pages it already has.
            growth = max(0, size - os.fstat(fd).st_blocks * 512)
            self._check_free(path.parent, growth)
            with self._lock:
                start = self._free.take(units)
            if start is None:
                raise RowSpaceError(
                    f"no address space left for a {capacity}-row capture ({units * self.unit_bytes} bytes); "
                    "fetch or close captures, or capture fewer requests at once"
                )
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            address = self._base + start * self.unit_bytes
            _mmap(address, units * self.unit_bytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd)
        except BaseException:
            if start is not None:
                with self._lock:
                    self._free.give(start, units)
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        with self._lock:
            self._open_bytes += growth
            self.open_file_bytes += size
        return Window(path, start * self.rows_per_unit, capacity, units, growth)

    def _check_free(self, folder: Path, growth: int) -> None:
        """Refuse a file that might not fit: writing past the end of a full tmpfs
        kills the process (SIGBUS), so it is refused here, where it is an error."""
        stats = os.statvfs(folder)
        free = stats.f_bavail * stats.f_frsize
        if free < self._open_bytes + growth:
            raise RowSpaceError(
                f"{folder} has {free >> 20} MiB free, but the captures in flight may need "
                f"{(self._open_bytes + growth) >> 20} MiB; fetch or close captures, lower max_tokens, "
                "or give the machine more shared memory (e.g. docker --shm-size)"
            )

    def close(self, window: Window, unlink: bool) -> None:
        """Unmap ``window`` (its range becomes reserved again); delete its file if ``unlink``."""
        start = window.first_row // self.rows_per_unit
        _reserve(self._base + start * self.unit_bytes, window.units * self.unit_bytes)
        with self._lock:
            self._free.give(start, window.units)
            self._open_bytes -= window.growth
            self.open_file_bytes -= window.capacity * self.row_bytes
        if unlink:
            window.path.unlink(missing_ok=True)

    def view(self, window: Window, rows: int, first: int = 0) -> Tensor:
        """``rows`` rows of ``window`` from its row ``first`` on."""
        start = window.first_row + first
        return self.rows[start : start + rows]

    def write(self, destinations: Tensor, source: Tensor) -> None:
        """``rows[destinations] = source`` for ``[n, hidden]`` rows, copied as
        ``copy_dtype`` elements (a plain move: the bits are kept as they are)."""
        self._wide_rows.index_copy_(0, destinations, source.view(self.copy_dtype))


_COPY_DTYPES = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)
"""Element types rows are moved as, widest first (complex128: 16 bytes, the widest torch has)."""


def _widest_dtype(row_bytes: int) -> torch.dtype:
    return next(dtype for dtype in _COPY_DTYPES if row_bytes % dtype.itemsize == 0)
