"""``mpcache_ea_alloc``: ``mpcache_ea`` with the KV budget split across layers by a global top-k, calibrated once.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation" (2024) let a layer's heads compete
in one top-k over their scores instead of giving each the same share; KVzip (Kim et al., 2025) runs that top-k over
every layer and head at once. A look-once, layer-by-layer prefill compresses layer ``L`` before layer ``L + 1`` has
run, so no top-k over all layers can run at run time. Instead the allocation is measured once on calibration text:
each prompt key is scored by the largest attention it gets from a prompt query at least ``distance`` positions after
it (:class:`LongRangeAttention`: the attention a continuation past a compressed context would pay; a layer that
mostly attends to its neighbours needs few context tokens), every layer's and KV head's scores go into one top-k at
the kept fraction (:func:`global_shares`), and each layer's count over the mean is its share. The planner turns the
shares into per-layer capacities with the same total as equal layers, so the KV bytes are the same and the budget
stays a hard bound (:func:`edge_sel.runtime.planning.kv.split_layers`). Inside each layer everything is
``mpcache_ea``'s: the expected-attention static eviction and MPCache's dynamic group selection (MPC costs counted).

The shares depend on the model: :data:`CALIBRATED` holds them per model geometry (layers, query heads, KV heads,
head size) at a few kept fractions, measured by ``python -m benchmarks.layer_shares`` on the perplexity benchmark's
tuning windows only. A model without a calibration keeps equal layers unless ``shares`` is given. The top-k's own
split starves some layers at small budgets, so the shares are tempered (raised to ``temper``): chosen on the tuning
windows, 0.75 at 10 % kept or more (better than 0.5 on every tuning window at 10 %) and 0.5 at 5 % or less (0.75 and
the full split lost there, as did a floor under each layer's share) (:data:`TEMPER`). Splits from the eviction's own
scores (normalised per head) lost to equal layers.
Per-head budgets (AdaKV's own split) are not offered: every KV head of a layer's cache holds the same number of slots,
so unequal heads would keep the bytes of the largest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edge_sel.runtime.errors import InputError

from .base import SINKS
from .expected_attention import MPCacheEA
from .full import Full
from .mpcache import with_dynamic_selection

log = logging.getLogger("edge_sel")

# (layers, query heads, KV heads, head size) -> {kept fraction: per-layer shares (mean 1)}, from
# ``python -m benchmarks.layer_shares --split tune`` (the six tuning windows of the perplexity benchmark)
CALIBRATED: dict[tuple, dict[float, tuple]] = {
    (30, 9, 3, 64): {  # SmolLM2-135M(-Instruct)
        0.2: (
            0.623, 0.817, 1.379, 0.315, 0.449, 1.089, 0.800, 1.163, 1.745, 1.145,
            0.307, 0.473, 0.705, 0.455, 1.950, 1.164, 0.639, 1.804, 1.149, 0.519,
            2.574, 1.490, 0.953, 1.257, 1.523, 0.395, 0.855, 0.652, 0.841, 0.771,
        ),
        0.1: (
            0.437, 0.528, 1.417, 0.171, 0.400, 1.057, 0.603, 1.483, 2.120, 0.980,
            0.197, 0.202, 0.528, 0.308, 2.159, 1.162, 0.524, 2.331, 1.311, 0.365,
            2.964, 1.465, 0.940, 1.536, 1.605, 0.326, 0.855, 0.529, 0.874, 0.627,
        ),
        0.05: (
            0.318, 0.288, 1.438, 0.181, 0.366, 1.093, 0.472, 1.775, 2.476, 0.991,
            0.182, 0.102, 0.348, 0.212, 2.233, 1.137, 0.424, 2.972, 1.499, 0.251,
            2.966, 1.305, 0.903, 1.714, 1.512, 0.291, 0.747, 0.391, 0.895, 0.516,
        ),
    },
}


# the exponent on the shares by kept fraction (log-linear between, the nearest outside), chosen on the tuning windows
TEMPER: dict[float, float] = {0.05: 0.5, 0.1: 0.75}


def temper_at(kept: float) -> float:
    fr = sorted(TEMPER)
    return float(np.interp(np.log(max(kept, 1e-9)), np.log(fr), [TEMPER[f] for f in fr]))


def global_shares(scores: np.ndarray, kept: float, sinks: int = SINKS, head_reduce: str = "sum") -> np.ndarray:
    """Per-layer shares (mean 1) of one top-k at ``kept`` over ``scores`` ``[layers, kv, n]`` (sinks always in): a
    layer's count is its KV heads' total (``head_reduce="sum"``) or its hungriest head's (``"max"``: every KV head of a
    layer holds the same number of slots, so the top-k's per-head split costs the bytes of its largest head); ``"rank"``:
    the top-k runs over layer slots instead, slot ``j`` of a layer worth the sum of its heads' ``j``-th best scores
    (the split that maximises the kept score when every head of a layer keeps as many keys)."""
    s = np.array(scores, dtype=np.float64, copy=True)
    if s.ndim != 3 or not 0 < kept <= 1:
        raise ValueError(f"scores must be [layers, kv, n] and kept in (0, 1], got {s.shape} and {kept}")
    s[..., :sinks] = np.inf
    k = max(1, int(round(kept * s.size)))
    flat = s.reshape(-1)
    pick = np.argpartition(-flat, k - 1)[:k]  # exactly k kept, ties broken by position
    if head_reduce == "rank":  # a layer slot holds one key per KV head: its worth is the heads' j-th best scores summed
        ranked = -np.sort(-s, axis=-1).sum(axis=1)                            # [layers, n], descending in j
        ranked[~np.isfinite(ranked)] = np.inf
        k = max(1, int(round(kept * ranked.size)))
        pick = np.argpartition(-ranked.reshape(-1), k - 1)[:k]
        counts = np.bincount(pick // ranked.shape[1], minlength=s.shape[0]).astype(np.float64)
        return counts / counts.mean()
    if head_reduce == "max":
        per_head = np.bincount(pick // s.shape[2], minlength=s.shape[0] * s.shape[1]).reshape(s.shape[:2])
        counts = per_head.max(axis=1).astype(np.float64)
        return counts / counts.mean()
    counts = np.bincount(pick // (s.shape[1] * s.shape[2]), minlength=s.shape[0]).astype(np.float64)
    return counts / counts.mean()


def shares_at(table: dict[float, tuple], kept: float) -> np.ndarray:
    """The shares for the fraction ``kept``: interpolated in log(fraction) between the calibrated ones, the smallest's
    below them, and above the largest blended towards equal layers (at 1 everything is kept)."""
    fr = sorted(table)
    rows = [np.asarray(table[f], dtype=np.float64) for f in fr]
    if kept <= fr[0]:
        return rows[0]
    if kept >= fr[-1]:
        w = min(1.0, (kept - fr[-1]) / max(1e-9, 1.0 - fr[-1]))
        return (1 - w) * rows[-1] + w
    i = int(np.searchsorted(fr, kept))
    t = (np.log(kept) - np.log(fr[i - 1])) / (np.log(fr[i]) - np.log(fr[i - 1]))
    return (1 - t) * rows[i - 1] + t * rows[i]


@dataclass
class MPCacheEAAlloc(MPCacheEA):
    """:class:`MPCacheEA` with the layers' shares of the budget from a calibrated global top-k (module docstring)."""

    name: ClassVar[str] = "mpcache_ea_alloc_static"
    shares: tuple | None = None   # one positive number per layer (any scale); None: the calibration for the model
    temper: float | None = None   # shares ** temper (0: equal layers, 1: the top-k's own split); None: TEMPER's

    def __post_init__(self):
        super().__post_init__()
        if self.temper is not None and not (_numbers((self.temper,)) and 0.0 <= self.temper <= 1.0):
            raise ValueError(f"temper must be in [0, 1] or None, got {self.temper!r}")
        if self.shares is not None:
            s = np.asarray(self.shares, dtype=np.float64) if _numbers(self.shares) else None
            if s is None or s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)) or s.min() <= 0:
                raise ValueError(f"shares must be positive numbers, one per layer, got {self.shares!r}")

    def layer_shares(self, n_layers, kept=1.0, model=()):
        if self.shares is not None:
            if len(self.shares) != n_layers:
                raise InputError(f"mpcache_ea_alloc: shares has {len(self.shares)} values but the model has {n_layers} layers")
            s = np.asarray(self.shares, dtype=np.float64)
        else:
            table = CALIBRATED.get(tuple(model))
            if table is None:
                log.info("mpcache_ea_alloc: no layer calibration for a model of geometry %s; equal layers", tuple(model))
                return None
            s = shares_at(table, kept)
        s = s ** (self.temper if self.temper is not None else temper_at(kept))
        return s / s.mean()


def _numbers(x) -> bool:
    try:
        return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in x)
    except TypeError:
        return False


def mpcache_ea_alloc(**kw):
    """``mpcache_ea`` with calibrated per-layer budgets (:class:`MPCacheEAAlloc`) and MPCache's dynamic selection."""
    return with_dynamic_selection(MPCacheEAAlloc, kw, "mpcache_ea_alloc")


@dataclass
class LongRangeAttention(Full):
    """Calibration only (keeps the whole cache): per layer, each prompt key's largest attention from a query at least
    ``distance`` positions after it, the max over its KV head's query heads (``scores[layer]``: ``[kv, n]``).
    The engine's attention reports per chunk the max over the chunk's queries, so a key is scored by the chunks that
    start ``distance`` or more after it."""

    name: ClassVar[str] = "long_range_attention"
    distance: int = 32

    def begin(self, ctx):
        super().begin(ctx)
        self.scores: dict[int, np.ndarray] = {}
        self._start: dict[int, int] = {}

    def queries(self, layer, q, positions, phase):
        self._start[layer] = int(np.min(positions))

    def accumulate(self, layer, cache, attn_sum, attn_max, slots, phase):
        if phase == "decode" or slots is not None:
            return
        end = self._start.get(layer, 0) - self.distance
        if end <= 0:
            return
        s = self.scores.get(layer)
        if s is None or s.shape[1] < end:
            grown = np.zeros((attn_max.shape[1], max(end, self.ctx.prompt_len)), np.float32)
            if s is not None:
                grown[:, :s.shape[1]] = s
            s = self.scores[layer] = grown
        np.maximum(s[:, :end], attn_max[0][:, :end], out=s[:, :end])

    def stacked(self, n: int) -> np.ndarray:
        """``[layers, kv, n]`` the scores of the first ``n`` prompt keys."""
        empty = np.zeros((self.ctx.kv_heads, n), np.float32)  # a prompt too short for any distant query
        return np.stack([self.scores[L][:, :n] if L in self.scores else empty for L in range(self.ctx.n_layers)])
