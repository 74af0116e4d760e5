from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .base import Policy, ScorePolicy, log2c, topk_sorted
from .sharing import LayerSharing


@dataclass
class MPCacheStatic(ScorePolicy):
    """MPCache's look-once static eviction.

    Zeng et al., "MPCache: MPC-Friendly KV Cache Eviction for Efficient Private LLM Inference",
    NeurIPS 2025 (arXiv:2501.06807): once, after prefill, evict the tokens the prompt's queries paid
    little attention to; they stay evicted (the dynamic selection then works on what is left). The
    paper's rule (``window="last", reduce="max", per_head=False, pool=1``): keep a token if any of the last
    ``window_frac`` (~20%) of the prompt's queries attends to it above ``threshold``; the score is the
    max attention over those queries and all heads of the layer (one comparison per probability), so the
    kept set is shared by the layer's heads. With a budget, the best-scored tokens fill it
    (``threshold=None``); with a threshold, fewer may be kept. Around the scored tokens the first
    ``sinks`` (attention sinks, Xiao et al. 2024) and the last ``max(recent, recent_frac * kept)``
    prompt tokens are always kept. ``pool`` > 1 max-pools the scores over neighbouring slots (SnapKV's
    clustering); evictions are replayed in groups of ``share`` layers.

    Defaults, chosen by perplexity of a compressed prefix with the continuation uncompressed
    (``benchmarks/RESULTS.md``, "MPCache perplexity"): every prompt query's attention **accumulated**
    (``window="all", reduce="sum"``: additions only, H2O's heavy-hitter score, Zhang et al. 2023),
    **per KV head** (``per_head``), half the kept tokens a recent window (``recent_frac=0.5``), 4 sinks,
    no pooling, no cross-layer sharing of the eviction (``share=1``); each beat the paper's rule and
    StreamingLLM there.
    """

    name: ClassVar[str] = "mpcache_static"
    needs_decode_attention: ClassVar[bool] = True
    align: ClassVar[int] = 32
    # smallest cache it works with (a 64-token resident minimum with align 32): a larger minimum leaves
    # mpcache_recall too small a fetch area at small budgets to bring back what a question needs
    min_tokens: ClassVar[int] = 32
    window_frac: float = 0.2
    threshold: float | None = None
    recent: int = 32
    sinks: int = 4
    share: int = 1
    pool: int = 1
    recent_frac: float = 0.5   # recent window = max(recent, recent_frac * kept tokens)
    reduce: str = "sum"        # the window queries' attention per token: "max" (any query above a threshold) or "sum"
    per_head: bool = True      # one kept set per KV head (scored by the head's own queries) instead of one per layer
    window: str = "all"        # whose attention scores: the "last" window_frac of the prompt, or "all" its queries

    def __post_init__(self):
        if self.reduce not in ("max", "sum") or self.window not in ("last", "all"):
            raise ValueError(f"reduce must be 'max' or 'sum' and window 'last' or 'all', got {self.reduce!r}, {self.window!r}")
        if not 0.0 <= self.recent_frac <= 1.0:
            raise ValueError(f"recent_frac must be in [0, 1], got {self.recent_frac}")

    @property
    def window_reset(self):  # type: ignore[override]  # "last": scores come from the observation window only
        return self.window == "last"

    @property
    def votes(self):  # type: ignore[override]
        return self.reduce

    @property
    def heads(self):  # type: ignore[override]  # a max over the layer's heads is one shared row
        return "each" if self.per_head or self.reduce == "sum" else "shared"

    def observation_window(self, prompt_len):
        # the last ~20% of the prompt, but at most a quarter of the budget: every window query attends
        # strongly to its own neighbours, so a window as large as the budget would only keep itself
        w = max(1, int(np.ceil(self.window_frac * prompt_len)))
        cap = getattr(getattr(self, "ctx", None), "capacity", None)
        return min(w, max(32, cap // 4)) if cap else w

    def score(self, layer, keys, votes):
        if self.per_head:
            return votes.copy()                  # [kv, n]: one kept set per KV head
        if self.reduce == "sum":
            return votes.sum(axis=0)             # the layer's heads summed
        return votes[0].copy()                   # rows are equal (maxed over heads)

    def sinks_kept(self, target):
        return min(self.sinks, target // 4)

    def recent_kept(self, target):
        first = self.sinks_kept(target)
        return min(max(min(self.recent, target // 4), int(self.recent_frac * target)), target - first)

    def choose(self, n, kv_heads, score, target):
        if self.threshold is not None:
            rows = score.shape[0] if score.ndim > 1 else 1
            score[score <= self.threshold] = -1.0  # below threshold: evicted first (kept only to fill sinks/recent)
            self.count(comparisons=rows * n)
        idx = super().choose(n, kv_heads, score, target)
        if self.threshold is not None and idx.ndim == 1:
            ok = (score[idx] > self.threshold) | (idx < self.sinks) | (idx >= n - self.recent)
            idx = idx[ok] if ok.sum() >= self.min_tokens else idx
        return idx


@dataclass
class MPCacheDynamic(Policy):
    """MPCache's query-aware dynamic selection over a hierarchy of key groups.

    Zeng et al., NeurIPS 2025 (arXiv:2501.06807): the cache is cut into groups of ``group`` (32) slots,
    each split in two sub-groups of 16; per KV head and group the per-channel max and min of its keys
    are kept (updated incrementally as tokens arrive, recomputed after an eviction). Each decode step
    scores groups with the MPC-friendly linear similarity ``sum_d q_d * (alpha*kmax_d + (1-alpha)*kmin_d)``
    (no exponentials), keeps the top ``keep_groups`` fraction of 32-groups, then the top ``keep_sub``
    of their 16-groups; the first and the most recent group are always read. Adjacent layers (``share``)
    reuse the leader's selection (cross-layer index sharing). Below ``min_tokens_to_select`` cached
    tokens the whole cache is read; a cache whose capacity is below it never selects, so it keeps no
    statistics at all (updating them would cost every decode step for nothing).

    Sharing a selection is only right when the layers of a group hold the same tokens slot for slot,
    i.e. with a static eviction replayed the same way: ``mpcache(share=2)`` (the paper's setting) shares
    both. The default static eviction is per layer (``MPCacheStatic.share=1``, better perplexity
    than share 2), so the default here is 1 as well (each layer selects for itself;
    twice the selection cost of ``share=2``, counted).
    """

    name: ClassVar[str] = "mpcache_dynamic"
    align: ClassVar[int] = 32
    alpha: float = 0.6
    group: int = 32
    sub: int = 16
    keep_groups: float = 0.5
    keep_sub: float = 0.75
    min_tokens_to_select: int = 512
    share: int = 1  # 2 = the paper's cross-layer sharing; needs MPCacheStatic.share=2 too (mpcache(share=2))
    stats: dict = field(default_factory=dict, init=False, repr=False)

    def bytes_per_token(self, kv_heads, head_dim):
        # max, min and their alpha-mix at both levels: 3 x (1/16 + 1/32) x 4 bytes per key element
        return int(np.ceil(kv_heads * head_dim * 4 * 3 * (1 / self.sub + 1 / self.group)))

    def begin(self, ctx):
        super().begin(ctx)
        self.sharing = LayerSharing(self.share, ctx.n_layers)
        self.stats = {}
        self.last: dict[int, np.ndarray] = {}
        self.active = max(ctx.layer_capacity(L) for L in range(ctx.n_layers)) >= self.min_tokens_to_select
        if not self.active:  # the cache can never hold enough tokens to select from: no statistics to keep
            return
        D, kv = ctx.head_dim, ctx.kv_heads
        for L in range(ctx.n_layers):  # sized by each layer's own capacity (what bytes_per_token counted)
            g16 = -(-ctx.layer_capacity(L) // self.sub)
            g32 = -(-ctx.layer_capacity(L) // self.group)
            self.stats[L] = {
                "max16": np.full((kv, g16, D), -np.inf, np.float32), "min16": np.full((kv, g16, D), np.inf, np.float32),
                "mix16": np.zeros((kv, g16, D), np.float32), "max32": np.full((kv, g32, D), -np.inf, np.float32),
                "min32": np.full((kv, g32, D), np.inf, np.float32), "mix32": np.zeros((kv, g32, D), np.float32),
            }

    # ---- group statistics -------------------------------------------------------------------
    def _refresh(self, layer, cache, g_from: int, g_to: int) -> None:
        """Recompute 16-groups [g_from, g_to) and the 32-groups above them from the keys."""
        st, n, k = self.stats[layer], cache.n, cache.k[0]
        kv, D = cache.kv_heads, cache.head_dim
        for g in range(g_from, g_to):
            a, b = g * self.sub, min((g + 1) * self.sub, n)
            if a >= b:
                st["max16"][:, g], st["min16"][:, g] = -np.inf, np.inf
                st["mix16"][:, g] = 0.0
                continue
            st["max16"][:, g] = k[:, a:b].max(axis=1)
            st["min16"][:, g] = k[:, a:b].min(axis=1)
        r = self.group // self.sub
        for G in range(g_from // r, -(-g_to // r)):
            st["max32"][:, G] = st["max16"][:, G * r:(G + 1) * r].max(axis=1)
            st["min32"][:, G] = st["min16"][:, G * r:(G + 1) * r].min(axis=1)
        s16 = slice(g_from, g_to)
        s32 = slice(g_from // r, -(-g_to // r))
        for lvl, s in (("16", s16), ("32", s32)):
            mx, mn = st["max" + lvl][:, s], st["min" + lvl][:, s]
            finite = np.isfinite(mx)
            st["mix" + lvl][:, s] = np.where(finite, self.alpha * mx + (1 - self.alpha) * mn, 0.0)
        ng16, ng32 = g_to - g_from, s32.stop - s32.start
        self.count(comparisons=2 * kv * D * (min(n, g_to * self.sub) - g_from * self.sub) + 2 * kv * D * ng32 * (r - 1),
                   multiplications=2 * kv * D * (ng16 + ng32))

    def appended(self, layer, cache, s):
        if not self.active or not self.sharing.is_leader(layer):
            return  # followers read the leader's selection; they keep no statistics
        if s.stop - s.start != 1:
            self._refresh(layer, cache, s.start // self.sub, -(-s.stop // self.sub))
            return
        # one new key (decode): fold it into its 16-group and 32-group, 2 comparisons per channel per level
        st, k = self.stats[layer], cache.k[0, :, s.start]
        g, G = s.start // self.sub, s.start // self.group
        if s.start % self.sub == 0:
            st["max16"][:, g], st["min16"][:, g] = k, k
        else:
            np.maximum(st["max16"][:, g], k, out=st["max16"][:, g])
            np.minimum(st["min16"][:, g], k, out=st["min16"][:, g])
        if s.start % self.group == 0:
            st["max32"][:, G], st["min32"][:, G] = k, k
        else:
            np.maximum(st["max32"][:, G], k, out=st["max32"][:, G])
            np.minimum(st["min32"][:, G], k, out=st["min32"][:, G])
        st["mix16"][:, g] = self.alpha * st["max16"][:, g] + (1 - self.alpha) * st["min16"][:, g]
        st["mix32"][:, G] = self.alpha * st["max32"][:, G] + (1 - self.alpha) * st["min32"][:, G]
        self.count(comparisons=4 * k.size, multiplications=4 * k.size)

    def compacted(self, layer, cache):
        if not self.active or not self.sharing.is_leader(layer):
            return
        st = self.stats[layer]
        for key in ("max16", "max32"):
            st[key][:] = -np.inf
        for key in ("min16", "min32"):
            st[key][:] = np.inf
        self._refresh(layer, cache, 0, -(-cache.n // self.sub))

    # ---- selection ----------------------------------------------------------------------------
    def select(self, layer, q, cache):
        n = cache.n
        if not self.sharing.is_leader(layer):
            sel = self.last.get(self.sharing.leader(layer))
            if sel is not None:
                self.count(gathers=sel.size)
            return sel
        if not self.active or n < self.min_tokens_to_select:
            self.last[layer] = None
            return None
        st = self.stats[layer]
        kv, D = cache.kv_heads, cache.head_dim
        qs = q[0, :, -1, :].reshape(kv, -1, D).sum(axis=1)                       # [kv, D]: the query group
        g16, g32 = -(-n // self.sub), -(-n // self.group)
        s32 = np.einsum("hd,hgd->hg", qs, st["mix32"][:, :g32])
        s32[:, 0] = s32[:, g32 - 1] = np.inf
        k1 = max(2, int(np.ceil(self.keep_groups * g32)))
        top32 = topk_sorted(s32, k1)                                               # [kv, k1]
        r = self.group // self.sub
        cand = (top32[..., None] * r + np.arange(r)).reshape(kv, -1)              # [kv, r*k1]
        valid = cand < g16
        cand_c = np.minimum(cand, g16 - 1)
        mix = np.take_along_axis(st["mix16"][:, :g16], cand_c[..., None], axis=1)
        s16 = np.einsum("hd,hcd->hc", qs, mix)
        s16[~valid] = -np.inf
        s16[cand == 0] = np.inf
        s16[cand == g16 - 1] = np.inf
        k2 = max(2, min(int(valid[0].sum()), int(np.ceil(self.keep_sub * cand.shape[1]))))
        pick = topk_sorted(s16, k2)
        groups = np.take_along_axis(cand_c, pick, axis=1)                          # [kv, k2] 16-groups
        slots = (groups[..., None] * self.sub + np.arange(self.sub)).reshape(kv, -1)
        if slots.max() >= cache.capacity:  # the last 16-group of a capacity that is no multiple of 16 runs past it:
            slots = np.where(slots < cache.capacity, slots, -1)  # -1 is no slot (masked by the attention, never scored)
        self.count(multiplications=kv * D * (g32 + cand.shape[1]),
                   comparisons=kv * (g32 * log2c(k1) + cand.shape[1] * log2c(k2)),
                   gathers=slots.size)
        self.last[layer] = slots
        return slots


def with_dynamic_selection(static_cls: type, kw: dict, title: str) -> "Policy":
    """``static_cls + MPCacheDynamic`` as one policy: each part takes the options that are its fields (an option both
    have goes to both); an option neither has is refused, so a misspelt knob is not silently ignored."""
    from .composite import Composite

    static_kw = {k: v for k, v in kw.items() if k in static_cls.__dataclass_fields__}
    dyn_kw = {k: v for k, v in kw.items() if k in MPCacheDynamic.__dataclass_fields__}
    unknown = sorted(set(kw) - set(static_kw) - set(dyn_kw))
    if unknown:
        raise ValueError(f"{title} has no option {unknown[0]!r}")
    return Composite(parts=(static_cls(**static_kw), MPCacheDynamic(**dyn_kw)), title=title)


def mpcache(**kw) -> "Policy":
    return with_dynamic_selection(MPCacheStatic, kw, "mpcache")
