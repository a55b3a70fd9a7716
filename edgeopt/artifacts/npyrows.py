"""Read and write the rows of a ``.npy`` file a few at a time, with plain file I/O.

A dataset's image arrays can be larger than memory. ``np.load(mmap_mode="r")`` would read them
lazily, but every page a mapping touches stays in the process's resident set until the kernel
needs it back, so one epoch over a mapped 3 GB array shows 3 GB of RSS. Reading each batch's rows
into a fresh buffer (and writing rows with ``write``) leaves the caching to the kernel's page cache,
which is not charged to the process, and keeps the process at the size of one batch.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Tuple

import numpy as np
import numpy.typing as npt


class NpyRows:
    """Rows (first-axis entries) of a C-ordered ``.npy`` file, read by index."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or dtype.hasobject or not shape:
            raise ValueError(f"{self.path}: not a C-ordered array of plain values")
        self.shape: Tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, indices: npt.ArrayLike) -> np.ndarray:
        """The rows at ``indices``, in that order; consecutive indices are read in one call."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.path}: row index out of range 0..{len(self) - 1}")
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        flat = out.reshape(len(idx), self.row_bytes // self.dtype.itemsize).view(np.uint8)
        starts = np.flatnonzero(np.diff(idx, prepend=-2) != 1)
        with open(self.path, "rb", buffering=0) as f:
            for a, b in zip(starts, [*starts[1:], len(idx)]):
                f.seek(self.offset + int(idx[a]) * self.row_bytes)
                _read_exactly(f, flat[a:b].data.cast("B"), self.path)
        return out


class NpyWriter:
    """Write a ``.npy`` file of a known shape row block by row block, never holding it whole."""

    def __init__(self, path: Path, shape: Tuple[int, ...], dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.rows = 0
        self._f = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._f, header)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path}: rows of shape {rows.shape} do not fit {self.shape} after {self.rows} rows")
        self._f.write(rows.data.cast("B"))
        self.rows += len(rows)

    def close(self) -> None:
        """Finish the file; raise if fewer rows were written than the header declares."""
        self._f.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, the header declares {self.shape[0]}")

    def __enter__(self) -> "NpyWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


def _read_exactly(f: io.FileIO, buf: memoryview, path: Path) -> None:
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])
        if not n:
            raise ValueError(f"{path}: file ends early (truncated?)")
        done += n
