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

import contextlib
import os
import shutil
from dataclasses import dataclass

import numpy as np

from edge_sel.runtime import trace
from edge_sel.runtime.planning.rerank import chunk_runs
from edge_sel.runtime.scratch import owned_tempdir


@dataclass(eq=False, slots=True)
class Chunk:
    """Rows of candidates padded to the longest: which items, their lengths, and the hidden state between layers.
    The mask and positions follow from the lengths and are made when asked for (nothing per token is kept besides the
    hidden state); the token ids come from the call's :class:`.tokens.TokenStore` when the chunk is embedded."""

    items: np.ndarray        # indices into the item list (documents, then the query for bi-encoders)
    lengths: np.ndarray
    pos_offset: int = 0      # position of the first token (after a shared prefix)
    hidden: np.ndarray | None = None
    spilled: str | None = None    # hidden state in a spill file instead of RAM (a str: a Path costs 3x the memory)

    @property
    def width(self) -> int:
        return int(self.lengths.max())

    @property
    def mask(self) -> np.ndarray:
        """``[B, T]`` float32, 1.0 on real tokens."""
        return (np.arange(self.width)[None, :] < self.lengths[:, None]).astype(np.float32)

    @property
    def positions(self) -> np.ndarray:
        """``[B, T]`` int64 positions ``pos_offset ..``."""
        T = self.width
        return np.broadcast_to(np.arange(self.pos_offset, self.pos_offset + T, dtype=np.int64), (len(self.items), T)).copy()


@dataclass(frozen=True)
class Packing:
    """How rows are packed into chunks: padding id, first position (after a shared prefix), size limits."""

    pad_id: int
    pos_offset: int
    chunk_tokens: int
    max_batch: int


def _runs(sorted_lengths: np.ndarray, packing: Packing) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk over rows sorted by length: a chunk takes rows while they fit the packing's
    limits (the newest row sets the chunk's padded length) and do not pad it much (:func:`chunk_runs`)."""
    return chunk_runs(sorted_lengths, packing.chunk_tokens, packing.max_batch)


def make_chunks(lengths: np.ndarray, packing: Packing) -> list[Chunk]:
    """Chunks of the items sorted by length (stable), each as wide as its longest row. The chunks' item and length
    arrays are views of one sorted copy (no per-chunk allocations besides the chunk itself)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    sorted_lengths = np.asarray(lengths, dtype=np.int64)[order]
    return [Chunk(order[a:b], sorted_lengths[a:b], packing.pos_offset) for a, b in _runs(sorted_lengths, packing)]


class HiddenSpill:
    """A private directory of ``.npy`` files, one per spilled chunk state; ``close()`` removes it."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.dir = owned_tempdir("hidden", root)
        self._dir = str(self.dir)
        self._n = 0
        self.bytes_written = 0
        self.bytes_read = 0

    def put(self, arr: np.ndarray) -> str:
        path = os.path.join(self._dir, f"h{self._n}.npy")
        self._n += 1
        tk = trace.begin("spill.write", bytes=arr.nbytes)
        with open(path, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        trace.end(tk)
        self.bytes_written += arr.nbytes
        return path

    def get(self, path: str) -> np.ndarray:
        tk = trace.begin("spill.read")
        arr = np.load(path, allow_pickle=False)
        trace.end(tk, bytes=arr.nbytes)
        self.bytes_read += arr.nbytes
        return arr

    def view(self, path: str) -> np.ndarray:
        """Read-only memory map (for gathering a few rows while re-packing chunks; drop it promptly)."""
        return np.load(path, mmap_mode="r", allow_pickle=False)

    @staticmethod
    def drop(path: str | None) -> None:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

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
        items = np.concatenate([c.items for c in chunks])
        lengths = np.concatenate([c.lengths for c in chunks]).astype(np.int64, copy=False)
        source = np.concatenate([np.full(len(c.items), ci, dtype=np.int64) for ci, c in enumerate(chunks)])
        row = np.concatenate([np.arange(len(c.items), dtype=np.int64) for c in chunks])
        kept = keep_items[items]
        order = np.argsort(lengths[kept], kind="stable")  # by length, ties in chunk order
        items, lengths, source, row = (a[kept][order] for a in (items, lengths, source, row))
        out = []
        for a, b in _runs(lengths, packing):
            B, T = b - a, int(lengths[b - 1])
            hidden = np.zeros((B, T, hidden_size), dtype=np.float32)
            views: dict[int, np.ndarray] = {}
            for r in range(B):
                ci, sr, L = int(source[a + r]), int(row[a + r]), int(lengths[a + r])
                if ci not in views:
                    views[ci] = self._view(chunks[ci])
                hidden[r, :L] = views[ci][sr, :L]
            del views
            nc = Chunk(items[a:b], lengths[a:b], packing.pos_offset, hidden)
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
