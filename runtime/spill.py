"""Spill kept hidden states to files when every candidate's states do not fit the memory budget.

Monolithic forwarding (GRATING, EuroSys'26) moves every live candidate through one layer before the
next, so between layers the runtime holds a hidden state per candidate token: 4 x hidden x tokens
bytes — 150 MB for 512 SmolLM2 candidates of 130 tokens. With a spill, a chunk's states live in a
file while other chunks compute; only the chunk in flight (its input and output) is in RAM. Files are
written with plain writes and read back into fresh arrays, so they sit in the kernel's page cache,
which is not the process's resident set (the kernel drops those pages under pressure); nothing is
memory-mapped while a layer runs. The directory is private to one call and removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


class HiddenSpill:
    """A private directory of ``.npy`` files, one per spilled chunk state; ``close()`` removes it."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="edge_sel-hidden-", dir=root))
        self._n = 0
        self.bytes_written = 0
        self.bytes_read = 0

    def put(self, arr: np.ndarray) -> Path:
        path = self.dir / f"h{self._n}.npy"
        self._n += 1
        with open(path, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        self.bytes_written += arr.nbytes
        return path

    def get(self, path: Path) -> np.ndarray:
        arr = np.load(path, allow_pickle=False)
        self.bytes_read += arr.nbytes
        return arr

    def view(self, path: Path) -> np.ndarray:
        """Read-only memory map (for gathering a few rows while re-packing chunks; drop it promptly)."""
        return np.load(path, mmap_mode="r", allow_pickle=False)

    @staticmethod
    def drop(path: Path | None) -> None:
        if path is not None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "HiddenSpill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
