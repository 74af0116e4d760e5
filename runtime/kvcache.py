"""The KV cache of one layer: preallocated numpy buffers that never grow.

``k``/``v`` are ``[1, kv_heads, capacity, head_dim]`` float32 (keys stored after rotary embedding),
``pos`` ``[kv_heads, capacity]`` the token position held by each slot (``EMPTY_POS`` when empty, which
the attention graph masks out), ``score`` ``[kv_heads, capacity]`` an importance a policy may keep
(accumulated attention for H2O, max attention for MPCache). All heads hold the same number of
tokens ``n``; which tokens may differ per head (per-head eviction). Slots stay in position order.

``fetch`` extra slots after ``capacity`` form the recall fetch area (MPCache recall): groups of evicted
tokens read back from the cold store for one attention step, ``nf`` of them valid, the rest
``EMPTY_POS``. Resident tokens never go there (``append``/``compact`` work on ``[0, capacity)``); the
attention reads resident + fetched (``full``/``prefix``), so both count against the budget.
"""

from __future__ import annotations

import numpy as np

from .manifest import EMPTY_POS


class LayerCache:
    def __init__(self, kv_heads: int, capacity: int, head_dim: int, fetch: int = 0):
        self.kv_heads, self.capacity, self.head_dim = kv_heads, capacity, head_dim
        self.fetch = int(fetch)
        slots = capacity + self.fetch
        self.k = np.zeros((1, kv_heads, slots, head_dim), dtype=np.float32)
        self.v = np.zeros((1, kv_heads, slots, head_dim), dtype=np.float32)
        self.pos = np.full((kv_heads, slots), EMPTY_POS, dtype=np.int64)
        self.score = np.zeros((kv_heads, slots), dtype=np.float32)
        self.n = 0
        self.nf = 0  # valid slots of the fetch area
        self.peak = 0  # most slots ever read at once (resident + fetched)

    @staticmethod
    def bytes_per_slot(kv_heads: int, head_dim: int) -> int:
        return kv_heads * (2 * head_dim * 4 + 8 + 4)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes + self.score.nbytes

    def used_bytes(self) -> int:
        return self.n * self.bytes_per_slot(self.kv_heads, self.head_dim)

    def append(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> slice:
        """Write ``T`` new tokens (``k``/``v`` ``[1, kv, T, D]``) after the filled slots; returns their slots."""
        T = k.shape[2]
        if self.n + T > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.n} + {T} > capacity {self.capacity} (policy bug)")
        s = slice(self.n, self.n + T)
        self.k[0, :, s] = k[0]
        self.v[0, :, s] = v[0]
        self.pos[:, s] = positions[None, :]
        self.score[:, s] = 0.0
        self.n += T
        self.peak = max(self.peak, self.n + self.nf)
        return s

    def compact(self, keep: np.ndarray) -> None:
        """Keep only slots ``keep`` (``[m]`` shared by all heads, or ``[kv, m]`` per head; ascending)."""
        keep = np.asarray(keep, dtype=np.int64)
        m = keep.shape[-1]
        self._copy_slots(self, keep)
        self.pos[:, m:self.n] = EMPTY_POS
        self.score[:, m:self.n] = 0.0
        self.n = m

    def _copy_slots(self, src: "LayerCache", keep: np.ndarray) -> None:
        """Write ``src``'s slots ``keep`` (``[m]`` shared by all heads or ``[kv, m]`` per head) to this cache's
        first ``m`` slots; ``src`` may be this cache (fancy indexing copies before the write)."""
        m = keep.shape[-1]
        for dst, a in ((self.k[0], src.k[0]), (self.v[0], src.v[0]), (self.pos, src.pos), (self.score, src.score)):
            if keep.ndim == 1:
                dst[:, :m] = a[:, keep]
            else:  # k/v rows are [kv, slots, D]: the per-head indices broadcast over D
                dst[:, :m] = np.take_along_axis(a, keep if a.ndim == 2 else keep[..., None], axis=1)

    def truncate(self, n: int) -> None:
        """Forget every slot from ``n`` on (the keys a context-reconstruction pass appended for a while)."""
        if n < self.n:
            self.pos[:, n:self.n] = EMPTY_POS
            self.score[:, n:self.n] = 0.0
            self.n = n

    def reset(self) -> None:
        self.truncate(0)

    def load_from(self, src: "LayerCache", keep: np.ndarray | None) -> None:
        """Fill this (empty) cache with ``src``'s slots ``keep`` (``[m]`` or ``[kv, m]``, ascending; None = all)."""
        if keep is None:
            keep = np.arange(src.n)
        keep = np.asarray(keep, dtype=np.int64)
        m = keep.shape[-1]
        if m > self.capacity:
            raise RuntimeError(f"KV cache overflow: keeping {m} > capacity {self.capacity} (policy bug)")
        self._copy_slots(src, keep)
        self.pos[:, m:self.capacity] = EMPTY_POS
        self.score[:, m:self.capacity] = 0.0
        self.n = m
        self.peak = max(self.peak, m + self.nf)

    # ---- fetch area ---------------------------------------------------------------------
    def fetch_area(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views ``k``/``v`` ``[kv, fetch, D]`` and ``pos`` ``[kv, fetch]`` of the fetch area (write targets)."""
        a, b = self.capacity, self.capacity + self.fetch
        return self.k[0, :, a:b], self.v[0, :, a:b], self.pos[:, a:b]

    def set_fetched(self, m: int) -> None:
        """The first ``m`` fetch slots now hold fetched tokens; the rest are masked."""
        if not 0 <= m <= self.fetch:
            raise RuntimeError(f"fetch area overflow: {m} > {self.fetch} slots (policy bug)")
        self.pos[:, self.capacity + m:self.capacity + self.fetch] = EMPTY_POS
        self.nf = m
        self.peak = max(self.peak, self.n + m)

    def fetched_slots(self) -> np.ndarray:
        return np.arange(self.capacity, self.capacity + self.nf)

    def prefix(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Contiguous copies of the filled slots and the fetched ones (prefill: avoids attending over empty capacity)."""
        n = self.n
        if self.nf:
            idx = np.concatenate([np.arange(n), self.fetched_slots()])
            return self.k[:, :, idx], self.v[:, :, idx], self.pos[None][:, :, idx]
        return (np.ascontiguousarray(self.k[:, :, :n]), np.ascontiguousarray(self.v[:, :, :n]),
                np.ascontiguousarray(self.pos[None, :, :n]))

    def full(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole buffer (no copy); empty slots carry ``EMPTY_POS`` and are masked by the graph."""
        return self.k, self.v, self.pos[None]

    def read_slots(self) -> np.ndarray | None:
        """``[kv, n + nf]`` the slots a prefix read covers when the fetch area holds tokens, else None (all)."""
        if not self.nf:
            return None
        return np.broadcast_to(np.concatenate([np.arange(self.n), self.fetched_slots()]), (self.kv_heads, self.n + self.nf))

    def take(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys ``[kv, m, D]``, values and positions ``[kv, m]`` of per-head ``slots`` ``[kv, m]`` (copies)."""
        k = np.take_along_axis(self.k[0], slots[..., None], axis=1)
        v = np.take_along_axis(self.v[0], slots[..., None], axis=1)
        return k, v, np.take_along_axis(self.pos, slots, axis=1)

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys/values/positions of ``slots`` ``[kv, m]`` (a per-head selection) as new contiguous arrays; a slot of
        -1 is none (its position ``EMPTY_POS``, which the attention masks)."""
        none = slots < 0
        idx = np.where(none, 0, slots) if none.any() else slots
        k = np.take_along_axis(self.k[0], idx[..., None], axis=1)[None]
        v = np.take_along_axis(self.v[0], idx[..., None], axis=1)[None]
        p = np.take_along_axis(self.pos, idx, axis=1)[None]
        if idx is not slots:
            p[0][none] = EMPTY_POS
        return k, v, p
