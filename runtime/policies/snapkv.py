from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Policy


def max_pool(x: np.ndarray, kernel: int) -> np.ndarray:
    """1-D max pooling along the last axis, same length (SnapKV clusters neighbouring votes)."""
    r = kernel // 2
    out = x.copy()
    for s in range(1, r + 1):
        out[..., s:] = np.maximum(out[..., s:], x[..., :-s])
        out[..., :-s] = np.maximum(out[..., :-s], x[..., s:])
    return out


@dataclass
class SnapKV(Policy):
    """Observation-window voting at prefill.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
    (arXiv:2404.14469): the last ``window`` prompt queries vote (attention summed over the window,
    max-pooled with ``kernel``) per KV head; keep the top-voted prefix tokens plus the window itself.
    Chunks before the window (prompts longer than the budget) accumulate votes the same way.
    """

    name: ClassVar[str] = "snapkv"
    window_reset: ClassVar[bool] = True   # scores come from the observation window only
    window: int = 32
    kernel: int = 7

    def observation_window(self, prompt_len):
        return min(self.window, max(1, prompt_len // 2))

    def observe(self, layer, cache, attn_sum, attn_max, slots, phase):
        if phase == "decode":
            return
        a = attn_sum[0]
        n = a.shape[1]
        pooled = max_pool(a, self.kernel)
        self.count(comparisons=cache.kv_heads * n * (self.kernel - 1))
        cache.score[:, :n] += pooled

    def keep(self, layer, cache, target, phase):
        return self.keep_top(cache, cache.score, target, recent=min(self.window, target // 2))
