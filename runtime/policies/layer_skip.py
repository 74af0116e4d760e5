from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Policy


@dataclass
class LayerSkip(Policy):
    """Prompt-decided layer skipping for decoding (training-free, FiRST-style).

    Jain et al., "FiRST: Finetuning Router-Selective Transformers for Input-Adaptive Latency
    Reduction", 2024 (arXiv:2410.12513) route each prompt to a set of layers decoding skips, decided
    once at prefill so the KV cache stays consistent. Training-free variant: measure, on the prompt's
    last ``window`` tokens, how little each layer changes the hidden state (cosine of input and output);
    the ``fraction`` most-unchanged layers (never the first/last ``protect``) are skipped at decode —
    no compute and no new KV entries there.
    """

    name: ClassVar[str] = "layer_skip"
    fraction: float = 0.2
    window: int = 16
    protect: int = 2

    def begin(self, ctx):
        super().begin(ctx)
        self.sim = np.full(ctx.n_layers, -np.inf)
        self.skipped: set[int] = set()

    def after_layer(self, layer, h_in, h_out, q_last, cache, positions):
        a, b = h_in[0, -self.window:], h_out[0, -self.window:]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-9)
        self.count(multiplications=3 * a.size, exp_div=a.shape[0])
        if self.protect <= layer < self.ctx.n_layers - self.protect:
            self.sim[layer] = float(cos.mean())
        if layer == self.ctx.n_layers - 1:
            k = int(self.fraction * self.ctx.n_layers)
            order = np.argsort(-self.sim)
            self.skipped = {int(i) for i in order[:k] if np.isfinite(self.sim[i])}
        return None

    def skip_layer(self, layer):
        return layer in self.skipped
