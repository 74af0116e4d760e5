"""The interface every pruning rule implements."""

from __future__ import annotations

import numpy as np


class Rule:
    """How early scores become a keep-set at one schedule layer."""

    name = ""
    param_key = ""           # key of the per-layer parameter in the manifest's schedule layers
    max_param: float | None = None

    def keep_mask(self, scores: np.ndarray, param: float, k: int, n_call: int, floor: int | None,
                  cluster_gap: float) -> np.ndarray:
        """Boolean keep-mask over the live candidates' ``scores``; never fewer than ``max(k, floor)`` kept."""
        raise NotImplementedError

    def need(self, scores: np.ndarray, top: np.ndarray, k: int) -> float:
        """The smallest parameter that keeps every candidate in ``top`` (indices into ``scores``) at this layer."""
        raise NotImplementedError

    def param(self, worst_need: float, safety: float) -> float:
        """The stored parameter for a layer whose worst calibration need is ``worst_need``."""
        p = safety * max(float(worst_need), 0.0)
        return min(p, self.max_param) if self.max_param is not None else p


def kth_best(scores: np.ndarray, k: int) -> float:
    return float(np.partition(scores, len(scores) - k)[len(scores) - k])
