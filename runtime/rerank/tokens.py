"""The token ids of one call's candidates, kept compactly: 4 bytes a token (+1 for a token type), not per-document
Python objects.

The text stage fills the store batch by batch (:meth:`TokenStore.add`); the embedding stage gathers a chunk's rows
(:meth:`TokenStore.rows`) as padded ``int64`` arrays, exactly what the graphs were fed when every candidate's ids
were held as separate arrays. Past ``ram_limit`` bytes the store moves to an unnamed temporary file in the spill
folder (the system removes it even when the process is killed) and rows are read back with ``pread``: then the
store's share of memory does not grow with the number of documents.
"""

from __future__ import annotations

import os
import tempfile
from bisect import bisect_right
from itertools import chain

import numpy as np

BYTES_PER_TOKEN = 4   # int32 ids
BYTES_PER_TYPE = 1    # int8 token types (cross-encoders)
BYTES_PER_ITEM = 12   # a length (int32) and an offset (int64)


class TokenStore:
    """Append-only token ids (and optional token types) of items ``0 .. n-1``; read back as padded chunk rows.
    ``with_types`` None: decided by the first batch (types given or not)."""

    def __init__(self, with_types: bool | None = None, ram_limit: int | None = None, spill_dir: str | os.PathLike | None = None,
                 vocab: int | None = None):
        self.with_types = with_types
        self.ram_limit = ram_limit
        self.spill_dir = spill_dir
        self._lengths: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []     # in RAM: one flat int32 block per batch
        self._types: list[np.ndarray] = []
        self._starts: list[int] = []         # first token offset of each RAM block
        self._file = self._types_file = None
        self.n_tokens = 0
        self.seen = np.zeros(vocab, dtype=bool) if vocab else None  # which embedding rows the call touches
        self.lengths: np.ndarray | None = None
        self.offsets: np.ndarray | None = None

    # ---- filling ---------------------------------------------------------------------------------
    def add(self, ids: list, types: list | None = None) -> None:
        """Append one batch of items (each a sequence of ints)."""
        if self.with_types is None:
            self.with_types = types is not None
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
        n = int(lengths.sum())
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=n)
        if self.seen is not None and n:
            self.seen[flat] = True
        flat_types = None
        if self.with_types:
            flat_types = np.fromiter(chain.from_iterable(types), dtype=np.int8, count=n)
        self._lengths.append(lengths)
        start = self.n_tokens
        self.n_tokens += n
        if self._file is None and self.ram_limit is not None and self.nbytes_if_ram() > self.ram_limit:
            self._to_file()
        if self._file is not None:
            self._file.write(flat.tobytes())
            if flat_types is not None:
                self._types_file.write(flat_types.tobytes())
        else:
            self._starts.append(start)
            self._ids.append(flat)
            if flat_types is not None:
                self._types.append(flat_types)

    def _to_file(self) -> None:
        self._file = tempfile.TemporaryFile(dir=self.spill_dir)
        self._types_file = tempfile.TemporaryFile(dir=self.spill_dir) if self.with_types else None
        for block in self._ids:
            self._file.write(block.tobytes())
        for block in self._types:
            self._types_file.write(block.tobytes())
        self._ids, self._types, self._starts = [], [], []

    def nbytes_if_ram(self) -> int:
        return self.n_tokens * (BYTES_PER_TOKEN + (BYTES_PER_TYPE if self.with_types else 0))

    def freeze(self) -> "TokenStore":
        """End of filling: one length and offset per item."""
        self.lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        self._lengths = []
        self.offsets = np.zeros(len(self.lengths), dtype=np.int64)
        np.cumsum(self.lengths[:-1], out=self.offsets[1:])
        if self._file is not None:
            self._file.flush()
            if self._types_file is not None:
                self._types_file.flush()
        return self

    # ---- reading ---------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.lengths)

    @property
    def in_ram(self) -> bool:
        return self._file is None

    @property
    def ram_bytes(self) -> int:
        """Bytes of token ids held in RAM (0 once they are in a file; the per-item lengths and offsets,
        :data:`BYTES_PER_ITEM` each, are the planner's per-candidate bookkeeping)."""
        return self.nbytes_if_ram() if self.in_ram else 0

    def unique_ids(self) -> int:
        return int(self.seen.sum()) if self.seen is not None else 0

    def _row(self, i: int, types: bool) -> np.ndarray:
        off, n = int(self.offsets[i]), int(self.lengths[i])
        if self._file is None:
            b = bisect_right(self._starts, off) - 1  # a batch's items never straddle two blocks
            local = off - self._starts[b]
            return (self._types if types else self._ids)[b][local: local + n]
        f, size, dtype = (self._types_file, BYTES_PER_TYPE, np.int8) if types else (self._file, BYTES_PER_TOKEN, np.int32)
        return np.frombuffer(os.pread(f.fileno(), n * size, off * size), dtype=dtype)

    def item(self, i: int) -> np.ndarray:
        """Item ``i``'s ids as ``int64``."""
        return self._row(i, False).astype(np.int64)

    def rows(self, items: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The ids ``[B, T]`` (padded with ``pad_id``) and token types ``[B, T]`` (0-padded; None without types)
        of ``items``, ``T`` their longest length, both ``int64``."""
        lengths = self.lengths[items]
        B, T = len(items), int(lengths.max()) if len(items) else 0
        ids = np.full((B, T), pad_id, dtype=np.int64)
        types = np.zeros((B, T), dtype=np.int64) if self.with_types else None
        for r, i in enumerate(items):
            L = int(lengths[r])
            ids[r, :L] = self._row(int(i), False)
            if types is not None:
                types[r, :L] = self._row(int(i), True)
        return ids, types

    def close(self) -> None:
        """Forget the tokens (the temporary file, if any, is removed by the system on close)."""
        for f in (self._file, self._types_file):
            if f is not None:
                f.close()
        self._file = self._types_file = None
        self._ids, self._types, self._starts = [], [], []
