"""Next-token choice: greedy, or seeded temperature / nucleus (top-p) sampling."""

from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        cut = int(np.searchsorted(cum, top_p)) + 1
        keep = order[:cut]
        q = p[keep] / p[keep].sum()
        return int(keep[rng.choice(len(keep), p=q)])
    return int(rng.choice(len(p), p=p))


def log_softmax_nll(logits: np.ndarray, targets) -> np.ndarray:
    """Negative log-likelihood of ``targets`` under each row of ``logits`` ``[T, vocab]`` (float64)."""
    z = logits.astype(np.float64)
    m = z.max(axis=-1)
    lse = m + np.log(np.exp(z - m[..., None]).sum(axis=-1))
    return lse - np.take_along_axis(z, np.asarray(targets)[..., None], axis=-1)[..., 0]
