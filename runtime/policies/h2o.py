from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Policy


@dataclass
class H2O(Policy):
    """Heavy hitters: keep the tokens with the largest accumulated attention, plus a recent window.

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models", NeurIPS 2023 (arXiv:2306.14048). Scores are per KV head (attention of the head's query
    group summed over queries and steps), eviction per head; half the budget is the recent window.
    """

    name: ClassVar[str] = "h2o"
    needs_decode_attention: ClassVar[bool] = True
    recent_ratio: float = 0.5

    def observe(self, layer, cache, attn_sum, attn_max, slots, phase):
        a = attn_sum[0]
        if slots is None:
            cache.score[:, : a.shape[1]] += a
        else:  # additions only (free in MPC); the probabilities come from attention itself
            for h in range(cache.kv_heads):
                cache.score[h, slots[h]] += a[h]

    def keep(self, layer, cache, target, phase):
        return self.keep_top(cache, cache.score, target, recent=int(target * self.recent_ratio), first=0)
