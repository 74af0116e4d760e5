from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .base import Policy, log2c, topk_sorted
from .sharing import LayerSharing


@dataclass
class MPCacheRecall(Policy):
    """Query-aware recall of evicted key groups from disk: our on-device adaptation of MPCache's
    dynamic selection (Zeng et al., "MPCache: MPC-Friendly KV Cache Eviction for Efficient Private LLM
    Inference", NeurIPS 2025, arXiv:2501.06807).

    MPCache selects, at each step, the key groups whose linear similarity
    ``sum_d q_d * (alpha*kmax_d + (1-alpha)*kmin_d)`` with the current query is highest. On a device RAM
    is the binding constraint, so here the budgeted cache stays in RAM as the static policy left it and
    the tokens it evicts are **not dropped but written to disk** (a per-layer cold store in a temporary
    directory the generator call owns, removed when the call ends; read with ``preadv``, not mmap, so
    it stays out of the process's RSS). RAM keeps only the alpha-mix vector of every ``group`` cold
    tokens per KV head (1/``group`` of the cold keys; counted in the reported KV bytes and against a
    byte budget). When a query arrives -- the protected suffix (the question; ``suffix_query``: its
    ``"last"`` token's query or the ``"max"`` over its queries per group) and every decode step -- the
    leader layer scores the cold groups by that similarity and reads the top ones into a fixed fetch
    area carved out of the budget (``fetch_frac`` of the context's share, whole groups), so resident +
    fetched never exceed the budget; attention reads both (keys are stored after rotary embedding with
    their positions, so positions stay right). Adjacent layers (``share``) reuse the leader's group ids
    (cross-layer sharing; their evictions are replayed from the leader, so their cold stores hold the
    same tokens in the same order). Cost per step: the similarity (``multiplications``), a top-k
    (``comparisons``), the fetched tokens (``gathers``) and the bytes read (``cold_stats``).

    ``fetch`` (tokens) fixes the fetch area explicitly; it is then carved out even when the budget
    would hold everything (tests use it to fetch every evicted group). The area never takes slots the
    resident cache needs for its minimum: a budget without that room runs without recall (a warning,
    ``stats["kv_fetch_tokens"] == 0``).
    """

    name: ClassVar[str] = "mpcache_recall"
    recalls: ClassVar[bool] = True
    align: ClassVar[int] = 32
    alpha: float = 0.6
    group: int = 16      # cold group size (measured on SmolLM2, 1k needles at 20%: 16 -> 3/9, 32 -> 1/9)
    fetch_frac: float = 0.5  # of the context's share (16-groups: 0.5 -> 4/9, 0.25 -> 3/9)
    fetch: int | None = None
    share: int = 2
    suffix_query: str = "last"
    head_reduce: str = "sum"
    score: str = "mix"
    expand: int = 0
    bytes_read: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.suffix_query not in ("last", "max"):
            raise ValueError(f"suffix_query must be 'last' or 'max', got {self.suffix_query!r}")
        if self.head_reduce not in ("sum", "max"):
            raise ValueError(f"head_reduce must be 'sum' or 'max', got {self.head_reduce!r}")
        if self.score not in ("mix", "bound"):
            raise ValueError(f"score must be 'mix' (MPCache) or 'bound' (Quest), got {self.score!r}")
        if not 0.0 < self.fetch_frac < 1.0:
            raise ValueError(f"fetch_frac must be in (0, 1), got {self.fetch_frac}")

    # ---- planning ----------------------------------------------------------------------------
    def fetch_tokens(self, cap, suffix, whole, room):
        G = self.group
        if self.fetch is not None:
            want = -(-int(self.fetch) // G) * G
        elif cap >= whole:
            return 0  # everything fits: nothing is evicted, nothing to recall
        else:
            want = max(G, int(self.fetch_frac * (cap - suffix)) // G * G)
        return min(want, room // G * G)  # never below the resident minimum: a small budget runs without recall

    def _leaders(self, n_layers):
        return [L for L in range(n_layers) if L % max(1, self.share) == 0]

    def fixed_bytes(self, n_layers, kv_heads, head_dim, n_tokens):
        groups = -(-int(n_tokens) // self.group) + 1
        return len(self._leaders(n_layers)) * kv_heads * groups * head_dim * 4 * (3 if self.score == "bound" else 1)

    def begin(self, ctx):
        super().begin(ctx)
        self.sharing = LayerSharing(self.share, ctx.n_layers)
        self.events: dict[int, int] = {}
        self.store = None
        self.bytes_read = {"suffix": 0, "decode": 0}
        if ctx.cold_dir and ctx.fetch:
            from ..coldstore import ColdStore

            self.store = ColdStore(ctx.cold_dir, ctx.n_layers, ctx.kv_heads, ctx.head_dim,
                                   ctx.prompt_len + ctx.max_new_tokens, self._leaders(ctx.n_layers),
                                   alpha=self.alpha, group=self.group, minmax=self.score == "bound")

    def end(self):
        if getattr(self, "store", None) is not None:
            self.store.close()

    def cold_stats(self):
        st = getattr(self, "store", None)
        if st is None:
            return {}
        return {"cold_tokens": list(st.n), "cold_file_bytes": st.file_bytes(), "cold_stats_bytes": st.stats_bytes,
                "cold_bytes_written": st.bytes_written, "cold_bytes_read_suffix": self.bytes_read["suffix"],
                "cold_bytes_read_decode": self.bytes_read["decode"]}

    # ---- eviction -> disk --------------------------------------------------------------------
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
        k = np.take_along_axis(cache.k[0, :, :n], slots[..., None], axis=1)
        v = np.take_along_axis(cache.v[0, :, :n], slots[..., None], axis=1)
        p = np.take_along_axis(cache.pos[:, :n], slots, axis=1)
        self.store.add(layer, k, v, p)

    def _expand(self, s: np.ndarray, m: int) -> np.ndarray:
        """Per head: the best groups each with ``expand`` neighbours on both sides (a sentence cut by a
        group boundary comes back whole), ``m`` groups in all, ascending."""
        out = np.empty((s.shape[0], m), dtype=np.int64)
        n = s.shape[1]
        for h in range(s.shape[0]):
            chosen: list[int] = []
            seen = set()
            for g in np.argsort(-s[h], kind="stable"):
                for x in range(int(g) - self.expand, int(g) + self.expand + 1):
                    if 0 <= x < n and x not in seen and len(chosen) < m:
                        seen.add(x)
                        chosen.append(x)
                if len(chosen) >= m:
                    break
            out[h] = np.sort(chosen)
        return out

    # ---- disk -> fetch area ------------------------------------------------------------------
    def recall(self, layer, q, cache, phase):
        if self.store is None or cache.fetch == 0:
            return
        event = self.events.get(layer, 0)
        self.events[layer] = event + 1
        G, kv = self.group, cache.kv_heads
        n_groups = self.store.groups(layer)
        m = min(n_groups, cache.fetch // G)
        ids = None
        if m and self.sharing.is_leader(layer):
            mix = self.store.mix[layer][:, :n_groups]                                 # [kv, g, D]
            T, D = q.shape[2], q.shape[3]
            if not (phase == "suffix" and self.suffix_query == "max"):
                q, T = q[:, :, -1:], 1
            qg = q[0].reshape(kv, -1, T, D)                                          # [kv, rep, T, D]
            if self.head_reduce == "sum":  # MPCache: the query group's sum (one product per group)
                qg = qg.sum(axis=1, keepdims=True)
            r = qg.shape[1]
            if self.score == "mix":  # MPCache's linear similarity
                s = np.einsum("hrtd,hgd->hrtg", qg, mix)
                self.count(multiplications=kv * r * T * D * n_groups)
            else:  # Quest's upper bound of q.k over the group: sum_d max(q_d kmax_d, q_d kmin_d)
                mx = self.store.kmax[layer][:, None, None, :n_groups]
                mn = self.store.kmin[layer][:, None, None, :n_groups]
                qe = qg[:, :, :, None, :]
                s = np.maximum(qe * mx, qe * mn).sum(axis=-1)
                self.count(multiplications=2 * kv * r * T * D * n_groups, comparisons=kv * r * T * D * n_groups)
            s = s.reshape(kv, r * T, n_groups).max(axis=1)   # best query (head, suffix token) per group
            self.count(comparisons=kv * (r * T - 1) * n_groups)
            if self.expand:
                ids = self._expand(s, m)
                self.count(comparisons=kv * n_groups * log2c(n_groups))
            else:
                ids = topk_sorted(s, m)                                              # [kv, m]
                self.count(comparisons=kv * n_groups * log2c(m))
            self.sharing.record(layer, event, ids)
        elif m:
            ids = self.sharing.replay(layer, event, n_groups, m)
        if ids is None or ids.size == 0:
            cache.set_fetched(0)
            return
        k_out, v_out, p_out = cache.fetch_area()
        got = self.store.read_groups(layer, ids, k_out, v_out, p_out)
        self.bytes_read["suffix" if phase == "suffix" else "decode"] += got
        cache.set_fetched(ids.shape[1] * G)
        self.count(gathers=ids.size * G)


def mpcache_recall(**kw) -> "Policy":
    """``mpcache`` (static eviction + dynamic selection over the resident cache) + recall from disk."""
    from .base import Composite
    from .mpcache import MPCacheDynamic, MPCacheStatic

    own = ("group", "fetch_frac", "fetch", "suffix_query", "head_reduce", "score", "expand")  # recall's alone
    static_kw = {k: v for k, v in kw.items() if k in MPCacheStatic.__dataclass_fields__ and k not in own}
    rec_kw = {k: v for k, v in kw.items() if k in MPCacheRecall.__dataclass_fields__}
    dyn_kw = {k: v for k, v in kw.items() if k in MPCacheDynamic.__dataclass_fields__ and k not in own}
    return Composite(parts=(MPCacheStatic(**static_kw), MPCacheRecall(**rec_kw), MPCacheDynamic(**dyn_kw)),
                     title="mpcache_recall")
