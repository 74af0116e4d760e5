"""Candidates grouped into chunks, re-packed after pruning, and their hidden states kept in RAM or spilled to files.

Candidates are sorted by length and cut into chunks of at most ``chunk_tokens`` padded tokens (and ``max_batch``
rows), so padding stays small and one chunk's activations fit the plan's room. After pruning, the survivors are
re-packed the same way (:func:`compact`), so dropped candidates cost nothing in later layers.

Monolithic forwarding (GRATING, EuroSys'26) moves every live candidate through one layer before the next, so
between layers the runtime holds a hidden state per candidate token (4 x hidden x tokens bytes). When those do
not fit the budget, a :class:`HiddenSpill` keeps each chunk's state in a file while other chunks compute; only the
chunk in flight is in RAM. Files are written with plain writes and read back into fresh arrays, so they sit in
the kernel's page cache, which is not the process's resident set; nothing is memory-mapped while a layer runs.
The spill directory is private to one call and removed afterwards.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_sel.runtime import trace
from edge_sel.runtime.scratch import owned_tempdir


@dataclass
class Chunk:
    items: np.ndarray        # indices into the item list (documents, then the query for bi-encoders)
    lengths: np.ndarray
    ids: np.ndarray          # [B, T] int64
    mask: np.ndarray         # [B, T] float32
    positions: np.ndarray    # [B, T] int64
    types: np.ndarray | None
    hidden: np.ndarray | None = None
    spilled: Path | None = None   # hidden state in a spill file instead of RAM


@dataclass(frozen=True)
class Packing:
    """How rows are packed into chunks: padding id, first position (after a shared prefix), size limits."""

    pad_id: int
    pos_offset: int
    chunk_tokens: int
    max_batch: int

    def positions(self, rows: int, width: int) -> np.ndarray:
        return np.broadcast_to(np.arange(self.pos_offset, self.pos_offset + width, dtype=np.int64), (rows, width)).copy()

    def full(self, rows: int, width: int) -> bool:
        """Would a chunk of ``rows`` rows padded to ``width`` tokens exceed the limits?"""
        return rows * width > self.chunk_tokens or rows > self.max_batch


def make_chunks(ids: list[np.ndarray], types: list[np.ndarray] | None, packing: Packing) -> list[Chunk]:
    """Chunks of the items sorted by length (stable), each padded to its longest row."""
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(lengths, kind="stable")
    chunks, cur = [], []

    def flush():
        if not cur:
            return
        idx = np.array(cur)
        L = lengths[idx]
        T = int(L.max())
        B = len(idx)
        a = np.full((B, T), packing.pad_id, dtype=np.int64)
        m = np.zeros((B, T), dtype=np.float32)
        t = np.zeros((B, T), dtype=np.int64) if types is not None else None
        for r, i in enumerate(idx):
            a[r, : L[r]] = ids[i]
            m[r, : L[r]] = 1.0
            if t is not None:
                t[r, : L[r]] = types[i]
        chunks.append(Chunk(idx, L, a, m, packing.positions(B, T), t))
        cur.clear()

    for i in order:
        T = lengths[i]  # sorted ascending: the newest item sets the chunk's padded length
        if cur and packing.full(len(cur) + 1, T):
            flush()
        cur.append(int(i))
    flush()
    return chunks


class HiddenSpill:
    """A private directory of ``.npy`` files, one per spilled chunk state; ``close()`` removes it."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.dir = owned_tempdir("hidden", root)
        self._n = 0
        self.bytes_written = 0
        self.bytes_read = 0

    def put(self, arr: np.ndarray) -> Path:
        path = self.dir / f"h{self._n}.npy"
        self._n += 1
        tk = trace.begin("spill.write", bytes=arr.nbytes)
        with open(path, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        trace.end(tk)
        self.bytes_written += arr.nbytes
        return path

    def get(self, path: Path) -> np.ndarray:
        tk = trace.begin("spill.read")
        arr = np.load(path, allow_pickle=False)
        trace.end(tk, bytes=arr.nbytes)
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


class ChunkStore:
    """Where the chunks' hidden states live between layers: in RAM, or in a :class:`HiddenSpill` when the plan spills."""

    def __init__(self, spill: HiddenSpill | None = None):
        self.spill = spill

    def keep(self, c: Chunk) -> None:
        """Between layers: spill the chunk's fresh hidden state to a file when the plan says so."""
        if self.spill is not None and c.hidden is not None:
            old = c.spilled
            c.spilled = self.spill.put(c.hidden)
            c.hidden = None
            HiddenSpill.drop(old)

    def hidden(self, c: Chunk) -> np.ndarray:
        """The chunk's hidden state (read back from its spill file when spilled)."""
        return c.hidden if c.hidden is not None else self.spill.get(c.spilled)

    def _view(self, c: Chunk) -> np.ndarray:
        return c.hidden if c.hidden is not None else self.spill.view(c.spilled)

    @staticmethod
    def release(c: Chunk) -> None:
        """Forget the chunk's hidden state (and remove its spill file)."""
        c.hidden = None
        HiddenSpill.drop(c.spilled)
        c.spilled = None

    def compact(self, chunks: list[Chunk], keep_items: np.ndarray, packing: Packing, hidden_size: int) -> list[Chunk]:
        """Rebuild the chunks from the surviving rows (re-packed by length, padding trimmed). With a spill,
        each new chunk gathers its rows from memory maps of the old chunks' files and is spilled in turn."""
        rows = []  # (item, length, source chunk, source row)
        for ci, c in enumerate(chunks):
            for r, it in enumerate(c.items):
                if keep_items[it]:
                    rows.append((int(it), int(c.lengths[r]), ci, r))
        rows.sort(key=lambda x: x[1])
        groups, cur = [], []
        for row in rows:
            if cur and packing.full(len(cur) + 1, row[1]):
                groups.append(cur)
                cur = []
            cur.append(row)
        if cur:
            groups.append(cur)
        out = []
        for g in groups:
            B, T = len(g), max(x[1] for x in g)
            ids = np.full((B, T), packing.pad_id, dtype=np.int64)
            mask = np.zeros((B, T), dtype=np.float32)
            pos = packing.positions(B, T)
            has_types = chunks[g[0][2]].types is not None
            types = np.zeros((B, T), dtype=np.int64) if has_types else None
            hidden = np.zeros((B, T, hidden_size), dtype=np.float32)
            views: dict[int, np.ndarray] = {}
            for r, (_, L, ci, sr) in enumerate(g):
                c = chunks[ci]
                if ci not in views:
                    views[ci] = self._view(c)
                ids[r, :L], mask[r, :L], pos[r, :L], hidden[r, :L] = c.ids[sr, :L], 1.0, c.positions[sr, :L], views[ci][sr, :L]
                if types is not None:
                    types[r, :L] = c.types[sr, :L]
            del views
            nc = Chunk(np.array([x[0] for x in g]), np.array([x[1] for x in g]), ids, mask, pos, types, hidden)
            self.keep(nc)
            out.append(nc)
        for c in chunks:
            HiddenSpill.drop(c.spilled)
        return out

    @property
    def bytes_written(self) -> int:
        return self.spill.bytes_written if self.spill is not None else 0

    @property
    def bytes_read(self) -> int:
        return self.spill.bytes_read if self.spill is not None else 0

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None
