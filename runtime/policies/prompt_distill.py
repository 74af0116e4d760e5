from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Policy, log2c, topk_sorted


@dataclass
class PromptDistill(Policy):
    """Prefill-time prompt distillation: later layers see only the prompt tokens that matter.

    Jin et al., "PromptDistill: Query-based Selective Token Retention in Intermediate Layers for
    Efficient Large Language Model Inference", 2025 (arXiv:2503.23274): after layer ``layer`` (default:
    a third of the depth) score the cached prompt tokens by the last token's query . key (summed over
    heads), keep the top ``keep_ratio`` (with the first ``sinks`` and the last ``recent`` tokens) and
    continue the prefill with their hidden states only — deeper layers compute and cache fewer tokens.
    """

    name: ClassVar[str] = "prompt_distill"
    layer: int | None = None
    keep_ratio: float = 0.5
    sinks: int = 4
    recent: int = 32
    min_prompt: int = 128

    def begin(self, ctx):
        super().begin(ctx)
        self.at = self.layer if self.layer is not None else max(0, ctx.n_layers // 3 - 1)
        self.kept_tokens = None

    def after_layer(self, layer, h_in, h_out, q_last, cache, positions):
        T = positions.shape[0]
        if layer != self.at or T < self.min_prompt or layer >= self.ctx.n_layers - 1:
            return None
        n, kv, D = cache.n, cache.kv_heads, cache.head_dim
        qs = q_last.reshape(kv, -1, D).sum(axis=1)                              # [kv, D]
        s = np.einsum("hd,hnd->n", qs, cache.k[0, :, :n])
        k = max(self.sinks + self.recent, int(np.ceil(self.keep_ratio * T)))
        cached_pos = cache.pos[0, :n]
        s[cached_pos < self.sinks] = np.inf
        s[cached_pos >= positions[-1] - self.recent + 1] = np.inf
        keep_pos = cached_pos[topk_sorted(s, min(k, n))]
        self.count(multiplications=kv * n * D, comparisons=n * log2c(k))
        idx = np.nonzero(np.isin(positions, keep_pos))[0]
        self.kept_tokens = int(idx.size)
        return idx
