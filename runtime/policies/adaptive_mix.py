"""``mpcache_ea`` whose mix of expected attention and accumulated votes is chosen per head by the prompt itself
(``mpcache_ea_mix``).

Expected attention (Devoto et al. 2025, :mod:`.expected_attention`) and the prompt's accumulated attention (H2O's
votes, Zhang et al. 2023; MPCache's static score) each predict the attention of the queries still to come, and which
predicts it better depends on the text and the head. The prompt holds its own test: its last queries (the
observation window) come after the rest. So, per KV head, every candidate weight of the mix (``mix_weights``) scores
the keys *before* the window from what was known there (the query statistics and the votes of the queries before
the window), keeps as many of them as the final eviction will keep by score, and is judged by the window's attention
mass on what it kept; the weight that kept the most is used for the final eviction, with every query's statistics and
votes. The window's attention row (``[kv, prompt]`` f32) and a copy of the query statistics at the window's start are
the extra RAM, both counted against a byte budget and dropped with the layer's compression. Everything else is
``mpcache_ea``'s (sinks, recent window, one kept set per KV head, MPCache's dynamic group selection).
``mix_value_norm`` and ``mix_recent`` add the value-norm scaling and the recent fraction to the candidates.

On the perplexity benchmark's tuning windows the window's choice did not beat ``mpcache_ea``'s fixed mix (per
head: 1.054 vs 1.051 at 20 % kept on four windows; per layer 1.061), so it is an option, not the default: the
window's attention is a weak proxy for the continuation's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .base import log2c, topk_sorted
from .expected_attention import MPCacheEA
from .mpcache import with_dynamic_selection


@dataclass
class MPCacheEAMix(MPCacheEA):
    """:class:`MPCacheEA` with the vote weight chosen per head by the observation window (module docstring)."""

    name: ClassVar[str] = "mpcache_ea_mix_static"
    mix_weights: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)  # candidate shares of the votes in the score
    mix_value_norm: tuple = (False,)  # candidate value-norm scalings of the expected attention (kvpress's ||v||)
    mix_recent: tuple = ()  # candidate recent fractions (empty: ``recent_frac`` only)
    mix_per: str = "head"  # "head": one choice per KV head; "layer": one per layer (the heads' masses summed)
    pre: dict = field(default_factory=dict, init=False, repr=False)
    chosen: dict = field(default_factory=dict, init=False, repr=False)      # layer -> each head's vote weight
    chosen_full: dict = field(default_factory=dict, init=False, repr=False)  # layer -> each head's whole candidate

    def __post_init__(self):
        super().__post_init__()
        self.mix_weights = tuple(float(w) for w in self.mix_weights)
        self.mix_value_norm = tuple(bool(v) for v in self.mix_value_norm) or (self.value_norm,)
        self.mix_recent = tuple(float(r) for r in self.mix_recent)
        if any(not 0.0 <= r <= 1.0 for r in self.mix_recent):
            raise ValueError(f"mix_recent must be fractions in [0, 1], got {self.mix_recent}")
        if not self.mix_weights or any(not 0.0 <= w <= 1.0 for w in self.mix_weights):
            raise ValueError(f"mix_weights must be in [0, 1], got {self.mix_weights}")
        if self.mix_per not in ("head", "layer"):
            raise ValueError(f"mix_per must be 'head' or 'layer', got {self.mix_per!r}")

    def begin(self, ctx):
        super().begin(ctx)
        self.pre, self.chosen, self.chosen_full = {}, {}, {}
        self.win = None  # the observation window's attention per key, one layer at a time

    def prefill_bytes(self, heads, head_dim):
        return 2 * super().prefill_bytes(heads, head_dim)  # the statistics and their copy at the window's start

    def fixed_bytes(self, n_layers, kv_heads, head_dim, n_tokens):
        return super().fixed_bytes(n_layers, kv_heads, head_dim, n_tokens) + kv_heads * int(n_tokens) * 4

    def held_bytes(self):
        own = sum(st["sum"].nbytes + st["outer"].nbytes for st, _ in self.pre.values())
        return super().held_bytes() + own + (0 if self.win is None else self.win.nbytes)

    def queries(self, layer, q, positions, phase):
        if phase == "window" and layer not in self.pre and layer in self.qstats:
            st = self.qstats[layer]
            copy = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
            self.pre[layer] = (copy, int(positions[0]))
        super().queries(layer, q, positions, phase)

    def accumulate(self, layer, cache, attn_sum, attn_max, slots, phase):
        super().accumulate(layer, cache, attn_sum, attn_max, slots, phase)
        if phase == "window" and slots is None and layer in self.pre:
            a = attn_sum[0]
            if self.win is None or self.win.shape[1] < a.shape[1]:
                n = self.ctx.prompt_len + self.ctx.max_new_tokens
                self.win = np.zeros((a.shape[0], max(n, a.shape[1])), np.float32)
            if getattr(self, "_win_layer", None) != layer:
                self.win[:] = 0.0
                self._win_layer = layer
            self.win[:, :a.shape[1]] += a
            self.stats_peak = max(self.stats_peak, self.held_bytes())

    def after_layer(self, layer, h_in, h_out, q_last, cache, positions):
        self._drop(layer)
        return super().after_layer(layer, h_in, h_out, q_last, cache, positions)

    def _drop(self, layer):
        self.pre.pop(layer, None)
        if getattr(self, "_win_layer", None) == layer:
            self.win, self._win_layer = None, None

    def keep(self, layer, cache, target, phase):
        try:
            self._weights = self._choose(layer, cache, target) if phase == "final" else None
            return super().keep(layer, cache, target, phase)
        finally:
            self._weights = None
            if phase == "final":
                self._drop(layer)

    @staticmethod
    def _normalized(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x / np.maximum(x.sum(axis=-1, keepdims=True), 1e-30)

    def _recent_for(self, target: int, frac: float) -> int:
        first = self.sinks_kept(target)
        return min(max(min(self.recent, target // 4), int(frac * target)), target - first)

    def candidates(self) -> list[tuple[float, bool, float]]:
        """(vote weight, value-norm scaling, recent fraction) of every candidate score."""
        return [(w, bool(vn), rf) for w in self.mix_weights for vn in self.mix_value_norm
                for rf in (self.mix_recent or (self.recent_frac,))]

    def _choose(self, layer, cache, target):
        """Per KV head (or per layer), the candidate whose kept set, built from what was known before the window,
        holds most of the window's attention; None when the prompt gives no such test."""
        got = self.pre.get(layer)
        if got is None or getattr(self, "_win_layer", None) != layer or not self.ctx.look_once:
            return None
        stats, start = got
        first = self.sinks_kept(target)
        cands = self.candidates()
        if stats["n"] == 0 or start <= target:  # the keys before the window would all fit: nothing to choose between
            return None
        keys = cache.k[0, :, :start]
        full_stats = self.qstats.get(layer)
        self.qstats[layer] = stats
        try:
            ea = self.expected(layer, keys)
        finally:
            self.qstats[layer] = full_stats
        vnorm = np.linalg.norm(cache.v[0, :, :start], axis=-1)
        eas = {False: self._normalized(ea), True: self._normalized(ea * vnorm)}
        votes = self._normalized(cache.score[:, :start] - self.win[:, :start])
        win = self.win[:, :start]
        mass = np.zeros((len(cands), cache.kv_heads))
        for i, (w, vn, rf) in enumerate(cands):
            rc = self._recent_for(target, rf)
            k, stop = target - first - rc, start - rc  # scored slots, and where the recent window begins
            mix = ((1 - w) * eas[vn] + w * votes)[:, first:stop]
            top = topk_sorted(mix, k) + first
            mass[i] = np.take_along_axis(win, top, axis=1).sum(axis=1) + win[:, stop:start].sum(axis=1)
            self.count(comparisons=mix.size * log2c(k), multiplications=2 * mix.size)
        if self.mix_per == "layer":
            mass = np.broadcast_to(mass.sum(axis=1, keepdims=True), mass.shape)
        # ties go to the candidate listed first among the best (the order puts the plain mpcache_ea choice first)
        plain = (self.vote_weight, self.value_norm, self.recent_frac)
        order = sorted(range(len(cands)), key=lambda i: cands[i] != plain)
        best = [max(order, key=lambda i: mass[i, h]) for h in range(cache.kv_heads)]
        chosen = [cands[i] for i in best]
        self.chosen[layer] = np.array([c[0] for c in chosen])
        self.chosen_full[layer] = chosen
        return chosen

    def score(self, layer, keys, votes):
        chosen = getattr(self, "_weights", None)
        if chosen is None:
            return super().score(layer, keys, votes)
        ea = self.expected(layer, keys)
        if ea is None:
            return super().score(layer, keys, votes)
        w = np.array([c[0] for c in chosen])[:, None]
        vn = np.array([c[1] for c in chosen])[:, None]
        vals = getattr(self, "_values", None)
        scaled = ea * np.linalg.norm(vals[:, :ea.shape[1]], axis=-1) if vals is not None else ea
        ea = np.where(vn, self._normalized(scaled), self._normalized(ea))
        return ((1 - w) * ea + w * self._normalized(votes)).astype(np.float32)

    def choose(self, n, kv_heads, score, target):
        chosen = getattr(self, "_weights", None)
        if chosen is None:
            return super().choose(n, kv_heads, score, target)
        s = np.array(score[..., :n], dtype=np.float32, copy=True)
        s[:, :self.sinks_kept(target)] = np.inf
        for h, (_, _, rf) in enumerate(chosen):  # each head its own recent window
            s[h, n - self._recent_for(target, rf):] = np.inf
        self.count(comparisons=s.size * log2c(target), gathers=s.shape[0] * target)
        return topk_sorted(s, target)


def mpcache_ea_mix(**kw):
    """``mpcache_ea`` with the vote weight chosen per head by the window (:class:`MPCacheEAMix`) + MPCache's dynamic selection."""
    return with_dynamic_selection(MPCacheEAMix, kw, "mpcache_ea_mix")
