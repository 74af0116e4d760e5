from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import ObservationWindowPolicy, log2c, topk_sorted


@dataclass
class WindowKV(ObservationWindowPolicy):
    """Selection in windows of consecutive tokens, indices shared inside groups of layers.

    Zuo et al., "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for Efficient LLM
    Inference", 2025 (arXiv:2503.17922): the observation window's attention (summed over its queries
    and the layer's heads) scores windows of ``window`` consecutive cached tokens; whole windows are
    kept, best first, with the most recent tokens; the layers of a group of ``share`` reuse the
    leader's kept indices (intra-group sharing), so followers compute no scores.
    """

    name: ClassVar[str] = "windowkv"
    observed: ClassVar[str] = "obs"
    heads: ClassVar[str] = "shared"
    window: int = 8
    obs: int = 32
    recent: int = 32
    share: int = 4

    @property
    def align(self):  # type: ignore[override]
        return self.window

    def choose(self, n, kv_heads, score, target):
        w = self.window
        recent = min(self.recent, target // 2)
        recent -= recent % w
        n_win_old = (n - recent) // w                 # whole windows before the protected recent part
        old_end = n_win_old * w
        s = score[:old_end].reshape(n_win_old, w).sum(axis=1)
        k = (target - recent) // w
        win = topk_sorted(s, k)
        old = (win[:, None] * w + np.arange(w)).reshape(-1)
        tail = np.arange(old_end, n)[-(target - old.size):] if target > old.size else np.arange(0)
        idx = np.concatenate([old, tail])[:target]
        self.count(comparisons=n_win_old * log2c(k), gathers=kv_heads * idx.size)
        return idx
