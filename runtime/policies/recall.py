"""Recall base: evicted tokens are not dropped but written to disk, and read back into a fetch area.

:class:`RecallPolicy` owns the mechanics every recalling policy shares: a cold store (one file per
layer in a temporary directory the call owns, removed when it ends, also on an exception; see
:mod:`edge_sel.runtime.coldstore`), writing what the cache evicts to it, the size of the fetch area
carved out of the budget (``fetch_frac`` of the context's share in whole ``group`` s, at least ``fetch_min``
tokens when the resident minimum leaves the room, or ``fetch`` tokens), the RAM it keeps beside the cache (``fixed_bytes``, ``held_bytes``), the bytes read back, the
causal schedule of a scored suffix (a new selection every ``SUFFIX_BLOCK`` tokens, each made by the
queries of the tokens before it) and the ``"cold"`` stats section.

A subclass writes ``recall(layer, q, cache, phase)`` (which evicted tokens fill ``cache.fetch_area()``
for queries ``q``) and may declare ``stats_layers`` (layers whose cold groups keep their alpha-mix
vector in RAM), ``minmax``, ``token_granular`` and ``scratch_bytes``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .base import Policy

log = logging.getLogger("edge_sel")


@dataclass
class RecallPolicy(Policy):
    SUFFIX_BLOCK: ClassVar[int] = 32  # scored suffix tokens per recall selection

    group: int = 16          # cold tokens per group (the unit of the store's records and statistics)
    fetch_frac: float = 0.5  # of the context's share of the budget
    fetch: int | None = None  # fetch-area tokens, fixed (carved out even when the budget holds everything)
    fetch_min: int = 0       # the area holds at least this many tokens when the budget has the room (small budgets)
    alpha: float = 0.6       # group statistic: alpha * kmax + (1 - alpha) * kmin
    bytes_read: dict = field(default_factory=dict, init=False, repr=False)

    # ---- declarations -----------------------------------------------------------------------
    def stats_layers(self, n_layers: int) -> list[int]:
        """Layers whose cold groups keep statistics in RAM."""
        return []

    @property
    def minmax(self) -> bool:
        """Statistics also keep each group's kmax and kmin (3 vectors per group instead of 1)."""
        return False

    @property
    def token_granular(self) -> bool:
        """The selection reads single tokens: an area smaller than a group still works."""
        return False

    def scratch_bytes(self, kv_heads: int, n_tokens: int) -> int:
        """Preallocated selection scratch (counted in ``fixed_bytes``)."""
        return 0

    # ---- planning ---------------------------------------------------------------------------
    def fetch_tokens(self, cap, suffix, whole, room):
        G = self.group
        if self.fetch is not None:
            want = -(-int(self.fetch) // G) * G
        elif cap >= whole:
            return 0  # everything fits: nothing is evicted, nothing to recall
        else:
            want = max(G, int(self.fetch_frac * (cap - suffix)) // G * G, -(-self.fetch_min // G) * G)
        got = min(want, room // G * G)  # never below the resident minimum: a small budget runs without recall
        if got == 0 and self.token_granular and self.fetch is None and room >= 8:
            got = min(int(self.fetch_frac * (cap - suffix)), room)
        if got == 0 and cap < whole:
            log.warning("kv_budget leaves no room for %s's recall fetch area beside the %d resident tokens it needs: "
                        "running without recall", self.name, cap - room)
        return got

    def fixed_bytes(self, n_layers, kv_heads, head_dim, n_tokens):
        groups = -(-int(n_tokens) // self.group) + 1
        stats = len(self.stats_layers(n_layers)) * kv_heads * groups * head_dim * 4 * (3 if self.minmax else 1)
        return stats + self.scratch_bytes(kv_heads, int(n_tokens))

    # ---- lifecycle --------------------------------------------------------------------------
    def begin(self, ctx):
        super().begin(ctx)
        self.store = None
        self.cold_dir = None
        self.bytes_read = {"suffix": 0, "decode": 0}
        if ctx.fetch:
            from ..coldstore import ColdStore

            from ..scratch import owned_tempdir

            self.cold_dir = str(owned_tempdir("cold"))
            self.store = ColdStore(self.cold_dir, ctx.n_layers, ctx.kv_heads, ctx.head_dim,
                                   ctx.prompt_len + ctx.max_new_tokens, self.stats_layers(ctx.n_layers),
                                   alpha=self.alpha, group=self.group, minmax=self.minmax)

    def end(self):
        if getattr(self, "store", None) is not None:
            self.store.close()
        if getattr(self, "cold_dir", None) is not None:
            shutil.rmtree(self.cold_dir, ignore_errors=True)
            self.cold_dir = None

    def held_bytes(self):
        return self.store.stats_bytes if getattr(self, "store", None) is not None else 0

    def report(self, decode_steps):
        st = getattr(self, "store", None)
        if st is None:
            return {}
        return {"cold": {  # evicted K/V on disk: sizes, and bytes read back (the suffix, per decode step)
            "tokens_per_layer_max": max(st.n), "file_bytes": st.file_bytes(), "stats_bytes": st.stats_bytes,
            "bytes_written": st.bytes_written, "bytes_read_suffix": self.bytes_read["suffix"],
            "bytes_read_per_decode_step": self.bytes_read["decode"] / decode_steps if decode_steps else 0.0}}

    # ---- eviction -> disk -------------------------------------------------------------------
    def evicted(self, layer, cache, keep):
        if self.store is None:
            return
        n, kv = cache.n, cache.kv_heads
        keep = np.asarray(keep, dtype=np.int64)
        gone = np.ones((kv, n), dtype=bool)
        if keep.ndim == 1:
            gone[:, keep] = False
        else:
            np.put_along_axis(gone, keep, False, axis=1)
        E = int(gone[0].sum())
        if E == 0:
            return
        slots = np.nonzero(gone)[1].reshape(kv, E)  # per head, ascending (position order)
        k, v, p = cache.take(slots)
        self.store.add(layer, k, v, p)

    # ---- the protected suffix ---------------------------------------------------------------
    def suffix_step(self, chunk, cache):
        return min(chunk, self.SUFFIX_BLOCK) if cache.fetch > 0 and self.ctx.stream_suffix else chunk

    def before_suffix_chunk(self, layer, cache, i, queries, q_ctx):
        """A question (all known up front) selects once with all its queries; text being scored selects
        per block with the queries before it (the context's last query for the first block), so no
        token's prediction depends on a later token."""
        if cache.fetch == 0:
            return
        if not self.ctx.stream_suffix:
            if i == 0:
                self.recall(layer, np.concatenate(queries, axis=2), cache, "suffix")
            return
        prev = queries[i - 1] if i else (q_ctx[:, :, -1:] if q_ctx is not None else None)
        if prev is not None:
            self.recall(layer, prev, cache, "suffix")
        else:
            cache.set_fetched(0)
