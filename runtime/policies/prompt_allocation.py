"""``mpcache_ea_survey``: ``mpcache_ea_alloc`` with the layers' shares measured on the prompt itself, by a survey pass.

KVzip (Kim et al., 2025) and Ada-KV (Feng et al., 2024) split the budget by one top-k over every layer's scores of
the prompt at hand; ``mpcache_ea_alloc`` can only use a split calibrated once per model, because a look-once prefill
compresses each layer before the next has run. Here the engine first runs the context through every layer once,
recording (:mod:`edge_sel.runtime.generate.survey`, nothing cached) each key's score, by default KVzip's
(``statistic="reconstruction"``, :class:`ReconstructionAttention`: the largest attention from a pass that repeats
the context, run inside the survey; the prefill took ~2.4x as long on a 1792-token context) or the long-range
attention of ``mpcache_ea_alloc``'s calibration (``"long_range"``: no pass, ~1.5x). One top-k over all layers at the
kept fraction (:func:`global_shares`) gives this prompt's shares, tempered (raised to ``temper``: the top-k's own
split starves layers at small budgets; :data:`ZIP_TEMPER` for the reconstruction statistic, chosen on the perplexity
benchmark's tuning windows); the planner turns them into per-layer capacities with the same total (the bytes of
equal layers), so the budget stays a hard bound. Inside each layer everything is ``mpcache_ea``'s
(expected-attention static eviction: KVzip's score itself evicts worse there, ``mpcache_zip``; MPCache's dynamic
group selection; MPC costs counted). The recorded scores (``[layers, kv, n]`` float32) are counted against the
budget (``fixed_bytes``), the passes in the scratch (``survey_tokens``). Without a survey (a rolling prefill, or
below ``min_kept``, 7.5 % kept, where the calibrated split did better on the tuning windows) the calibrated shares
apply, exactly as ``mpcache_ea_alloc``. With a survey the recent window and the votes' share follow the kept
fraction (:data:`SURVEY_RECENT_FRAC`, :data:`SURVEY_VOTE_WEIGHT`: 15 % and 0.25 at 20 % kept, ``mpcache_ea``'s 25 %
and 0.5 at 10 %; chosen on the tuning windows).

KVzip's own top-k also splits each layer's budget between its KV heads (kvpress masks the evicted keys of a
full-size cache); here every KV head of a layer holds the same number of slots (the bytes of the largest head
otherwise), so the split is per layer: unequal heads inside a layer would gain at most ~0.004 at 20 % kept on the
tuning windows (``benchmarks.head_split_probe``, padding not charged), too little for a ragged cache layout. Options
measured on the tuning windows and left off: ``head_reduce`` (a layer's count from its hungriest head, or a top-k over
layer slots worth the heads' summed scores) and ``zip_weight`` (the survey's reconstruction score mixed into the
eviction score; it is held anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .expected_attention import MPCacheEA
from .layer_allocation import CALIBRATED, LongRangeAttention, MPCacheEAAlloc, global_shares, shares_at, temper_at
from .mpcache import with_dynamic_selection
from .reconstruction import ReconstructionAttention

# the exponent on the reconstruction statistic's shares: (log kept fractions, tempers), interpolated, the nearest outside
ZIP_TEMPER = (np.log([0.1, 0.2]), [0.5, 1.0])
# with a survey, mpcache_ea's recent window and vote share by kept fraction (same interpolation; at 10 % and below
# mpcache_ea's own defaults), chosen on the tuning windows at 20 % kept
SURVEY_RECENT_FRAC = (np.log([0.1, 0.2]), [0.25, 0.15])
SURVEY_VOTE_WEIGHT = (np.log([0.1, 0.2]), [0.5, 0.25])
EA_DEFAULTS = {k: MPCacheEA.__dataclass_fields__[k].default for k in ("recent_frac", "vote_weight")}  # no survey


@dataclass
class MPCacheEASurvey(MPCacheEAAlloc):
    """:class:`MPCacheEAAlloc` with this prompt's own layer split (module docstring)."""

    name: ClassVar[str] = "mpcache_ea_survey_static"
    statistic: str = "reconstruction"  # the survey's score: KVzip's "reconstruction" or "long_range" attention
    distance: int = 32  # long_range: a query this many positions after a key or more scores it
    repeat_tokens: int = 2048  # reconstruction: tokens of one pass (instruction + a piece of the context)
    blend: float = 1.0  # weight of this prompt's split against the calibrated one (a geometric mix; 1: this prompt's)
    min_kept: float = 0.075  # below this kept fraction no survey: the calibrated split (chosen on the tuning windows)
    head_reduce: str = "sum"  # a layer's count in the top-k: :func:`global_shares`' "sum", "max" or "rank"
    zip_weight: float = 0.0  # share of the survey's reconstruction score in the eviction score (the rest mpcache_ea's)
    recent_frac: float | None = None  # None: with a survey SURVEY_RECENT_FRAC's at the kept fraction, else mpcache_ea's
    vote_weight: float | None = None  # None: with a survey SURVEY_VOTE_WEIGHT's at the kept fraction, else mpcache_ea's
    measured: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.by_kept = {k: getattr(self, k) is None for k in EA_DEFAULTS}  # which knobs follow the kept fraction
        for k, v in EA_DEFAULTS.items():
            if self.by_kept[k]:
                setattr(self, k, v)
        super().__post_init__()
        if self.head_reduce not in ("sum", "max", "rank"):
            raise ValueError(f"head_reduce must be 'sum', 'max' or 'rank', got {self.head_reduce!r}")
        if self.statistic not in ("reconstruction", "long_range"):
            raise ValueError(f"statistic must be 'reconstruction' or 'long_range', got {self.statistic!r}")
        for k in ("blend", "min_kept", "zip_weight"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{k} must be in [0, 1], got {v!r}")
        for k in ("distance", "repeat_tokens"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")

    def surveyor(self, kept=1.0):
        surveys = kept >= self.min_kept  # below: the calibrated split (mpcache_ea_alloc's) does better, no survey
        for k, table in (("recent_frac", SURVEY_RECENT_FRAC), ("vote_weight", SURVEY_VOTE_WEIGHT)):
            if self.by_kept[k]:
                setattr(self, k, float(np.interp(np.log(max(kept, 1e-9)), *table)) if surveys else EA_DEFAULTS[k])
        if not surveys:
            return None
        if self.statistic == "reconstruction":
            return ReconstructionAttention(repeat_tokens=self.repeat_tokens)
        return LongRangeAttention(distance=self.distance)

    def survey_tokens(self, n_ctx, room):  # the survey's passes share the scratch the budget pays for
        if self.statistic != "reconstruction":
            return 0
        return ReconstructionAttention(repeat_tokens=self.repeat_tokens).reconstruction(n_ctx, room)

    def surveyed(self, recorder):
        self.measured = recorder.stacked(recorder.ctx.prompt_len)

    def end(self):
        super().end()
        self.measured = None  # one call's survey: a reused instance must not plan the next prompt with it
        for k, v in EA_DEFAULTS.items():  # nor evict with its knobs
            if self.by_kept[k]:
                setattr(self, k, v)

    def _zip(self, layer, n):
        """The survey's reconstruction score of the ``n`` slots (``[kv, n]``, per head summing to 1), or None."""
        m, pos = self.measured, getattr(self, "_pos", None)
        if self.statistic != "reconstruction" or m is None or pos is None or len(m) != self.ctx.n_layers:
            return None
        p = pos[:, :n]
        if p.max() >= m.shape[2] or p.min() < 0:
            return None  # slots that are not the surveyed context (a later eviction): mpcache_ea's score alone
        z = np.take_along_axis(m[layer].astype(np.float64), p, axis=1)  # by each slot's position
        return z / np.maximum(z.sum(axis=-1, keepdims=True), 1e-30)

    def score(self, layer, keys, votes):
        base = super().score(layer, keys, votes)
        z = self._zip(layer, keys.shape[1]) if self.zip_weight > 0 else None
        if z is None:
            return base
        b = np.asarray(base, np.float64)
        b = b / np.maximum(b.sum(axis=-1, keepdims=True), 1e-30)
        self.count(multiplications=2 * z.size)
        return ((1 - self.zip_weight) * b + self.zip_weight * z).astype(np.float32)

    def fixed_bytes(self, n_layers, kv_heads, head_dim, n_tokens):
        # the survey's scores of every layer, alive from the survey until the cache is planned (with zip_weight, until
        # the prefill is over)
        return super().fixed_bytes(n_layers, kv_heads, head_dim, n_tokens) + n_layers * kv_heads * n_tokens * 4

    def layer_shares(self, n_layers, kept=1.0, model=()):
        if self.measured is None or self.shares is not None or len(self.measured) != n_layers or kept >= 1:
            return super().layer_shares(n_layers, kept, model)
        temper = self.temper if self.temper is not None else (
            temper_at(kept) if self.statistic == "long_range" else float(np.interp(np.log(kept), *ZIP_TEMPER)))
        s = global_shares(self.measured, kept, head_reduce=self.head_reduce) ** temper
        table = CALIBRATED.get(tuple(model))
        if self.blend < 1 and table is not None:  # a geometric mix with the calibrated split (as mpcache_ea_alloc's)
            cal = shares_at(table, kept) ** temper_at(kept)
            s = np.exp(self.blend * np.log(np.maximum(s / max(s.mean(), 1e-30), 1e-3)) + (1 - self.blend) * np.log(cal))
        return s / s.mean() if s.sum() > 0 else None


def mpcache_ea_survey(**kw):
    """``mpcache_ea`` with per-layer budgets measured on the prompt (:class:`MPCacheEASurvey`) and MPCache's dynamic
    selection."""
    return with_dynamic_selection(MPCacheEASurvey, kw, "mpcache_ea_survey")


def mpcache_ea_survey_recall(**kw):
    """``mpcache_ea_survey`` + recall of evicted tokens from disk into a fetch area inside the budget
    (:class:`MPCacheRecall`, as ``mpcache_ea_recall``): the survey splits the resident share between the layers, every
    layer's fetch area is the same size. The survey sees the resident fraction (the budget less the fetch area)."""
    from .composite import Composite
    from .mpcache import MPCacheDynamic
    from .mpcache_recall import MPCacheRecall

    own = set(MPCacheRecall.__dataclass_fields__) - {"alpha", "share"}  # recall's alone
    static_kw = {k: v for k, v in kw.items() if k in MPCacheEASurvey.__dataclass_fields__ and k not in own}
    rec_kw = {k: v for k, v in kw.items() if k in MPCacheRecall.__dataclass_fields__}
    dyn_kw = {k: v for k, v in kw.items() if k in MPCacheDynamic.__dataclass_fields__ and k not in own}
    unknown = sorted(set(kw) - set(static_kw) - set(rec_kw) - set(dyn_kw))
    if unknown:
        raise ValueError(f"mpcache_ea_survey_recall has no option {unknown[0]!r}")
    return Composite(parts=(MPCacheEASurvey(**static_kw), MPCacheRecall(**rec_kw), MPCacheDynamic(**dyn_kw)),
                     title="mpcache_ea_survey_recall")
