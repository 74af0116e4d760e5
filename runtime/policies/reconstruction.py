"""``mpcache_zip``: MPCache with the static eviction scored by context reconstruction (KVzip), budgets per layer.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (2025): a context key is worth
keeping when the model attends to it to repeat the context; its score is the largest attention it gets from the
queries of a pass that feeds "repeat the previous context" and then the context again (max over those queries and
over the query heads of its KV head). The look-once prefill runs the passes inside its layer loop
(:mod:`edge_sel.runtime.generate.reconstruct`), so every layer's score is known before that layer is compressed;
KVzip's own top-k over all layers cannot run there, so the layers' shares of the budget stay the calibrated ones of
:class:`MPCacheEAAlloc`. Inside a layer: sinks, a recent window (``recent_frac`` of the kept tokens), one kept set
per KV head by the score (``zip_weight`` of it the reconstruction score, the rest ``mpcache_ea``'s expected
attention and votes, each normalised to sum 1 per head), then MPCache's dynamic group selection (MPC costs counted;
the score is a max over attention probabilities the prefill computes anyway, one comparison each).

On the perplexity benchmark's tuning windows this score evicted worse than ``mpcache_ea``'s inside the same layer
split (``mpcache_ea_alloc``: 1.071 vs 1.028 at 20 % kept; half and half 1.038); KVzip's strength there is its split
across layers, which ``mpcache_ea_survey`` takes from the same passes. The price is the passes: about one more
prefill of the context with longer attention (the prefill took ~1.5x as long on a 1792-token context), and a scratch
that holds the context and one pass (counted against a byte budget). A rolling prefill (no scratch) runs no pass:
the eviction falls back to ``mpcache_ea``'s score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .layer_allocation import LongRangeAttention, MPCacheEAAlloc
from .mpcache import with_dynamic_selection


@dataclass
class MPCacheZip(MPCacheEAAlloc):
    """:class:`MPCacheEAAlloc` whose eviction score is (mostly) the context-reconstruction attention (module doc)."""

    name: ClassVar[str] = "mpcache_zip_static"
    zip_weight: float = 1.0     # share of the reconstruction score in the eviction score (the rest: mpcache_ea's)
    repeat_tokens: int = 2048   # tokens of one reconstruction pass (instruction + a piece of the context; KVzip's chunk)
    zip: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.zip_weight <= 1.0:
            raise ValueError(f"zip_weight must be in [0, 1], got {self.zip_weight!r}")
        if isinstance(self.repeat_tokens, bool) or not isinstance(self.repeat_tokens, int) or self.repeat_tokens < 64:
            raise ValueError(f"repeat_tokens must be an integer >= 64, got {self.repeat_tokens!r}")

    def reconstruction(self, n_ctx, room):
        if self.zip_weight == 0:
            return 0
        return min(self.repeat_tokens, room, n_ctx + 32)  # room for the instruction beside a whole short context

    def begin(self, ctx):
        super().begin(ctx)
        self.zip = {}
        self.zip_peak = 0  # most bytes of reconstruction scores held at once

    def fixed_bytes(self, n_layers, kv_heads, head_dim, n_tokens):
        # one layer's reconstruction scores at a time (float32 per KV head and context token)
        return super().fixed_bytes(n_layers, kv_heads, head_dim, n_tokens) + kv_heads * n_tokens * 4

    def held_bytes(self):
        return super().held_bytes() + sum(z.nbytes for z in self.zip.values())

    def accumulate(self, layer, cache, attn_sum, attn_max, slots, phase):
        if phase != "reconstruct":
            return super().accumulate(layer, cache, attn_sum, attn_max, slots, phase)
        a = attn_max[0]                                                           # [kv, n_ctx]
        z = self.zip.get(layer)
        if z is None:
            z = self.zip[layer] = np.zeros((a.shape[0], self.ctx.prompt_len), np.float32)
            self.zip_peak = max(self.zip_peak, sum(x.nbytes for x in self.zip.values()))
        np.maximum(z[:, :a.shape[1]], a, out=z[:, :a.shape[1]])
        self.count(comparisons=a.size)

    def score(self, layer, keys, votes):
        z = self.zip.pop(layer, None)
        if z is None or self.zip_weight == 0:
            return super().score(layer, keys, votes)
        n = keys.shape[1]
        zs = z[:, :n].astype(np.float64)
        zs = zs / np.maximum(zs.sum(axis=-1, keepdims=True), 1e-30)
        if self.zip_weight >= 1:
            return zs.astype(np.float32)
        base = np.asarray(super().score(layer, keys, votes), np.float64)
        base = base / np.maximum(base.sum(axis=-1, keepdims=True), 1e-30)
        return ((1 - self.zip_weight) * base + self.zip_weight * zs).astype(np.float32)

    def after_layer(self, layer, h_in, h_out, q_last, cache, positions):
        self.zip.pop(layer, None)  # the layer's prompt has run (compressed or kept whole): its scores are done with
        return super().after_layer(layer, h_in, h_out, q_last, cache, positions)


def mpcache_zip(**kw):
    """MPCache with the context-reconstruction static eviction (:class:`MPCacheZip`) and MPCache's dynamic selection."""
    return with_dynamic_selection(MPCacheZip, kw, "mpcache_zip")


@dataclass
class ReconstructionAttention(LongRangeAttention):
    """A recorder (keeps the whole cache): per layer, each context key's largest attention from the
    context-reconstruction passes (phase ``"reconstruct"``), max over its KV head's query heads (``scores[layer]``:
    ``[kv, n]``, :meth:`stacked`); its ``reconstruction`` asks for the passes as :class:`MPCacheZip` does."""

    name: ClassVar[str] = "reconstruction_attention"
    repeat_tokens: int = 2048

    def reconstruction(self, n_ctx, room):
        return min(self.repeat_tokens, room, n_ctx + 32)

    def accumulate(self, layer, cache, attn_sum, attn_max, slots, phase):
        if phase != "reconstruct":
            return
        a = attn_max[0]
        z = self.scores.setdefault(layer, np.zeros((a.shape[0], self.ctx.prompt_len), np.float32))
        np.maximum(z[:, :a.shape[1]], a, out=z[:, :a.shape[1]])
