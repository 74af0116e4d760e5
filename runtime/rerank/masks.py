"""Keep-masks over one layer's early scores (pure functions; property-tested): the building blocks of the rules."""

from __future__ import annotations

import numpy as np


def clusters_1d(scores: np.ndarray, gap: float) -> list[np.ndarray]:
    """Group candidates into runs of similar score: sort descending, split where the gap exceeds ``gap``.

    Returns index arrays (into ``scores``), best cluster first.
    """
    order = np.argsort(-scores, kind="stable")
    if len(order) == 0:
        return []
    s = scores[order]
    cuts = np.nonzero((s[:-1] - s[1:]) > gap)[0] + 1
    return np.split(order, cuts)


def prune_mask(scores: np.ndarray, k: int, margin: float, floor: int | None = None, cluster_gap: float = 0.0) -> np.ndarray:
    """Boolean keep-mask over ``scores`` (the live candidates' scores at one layer).

    A cluster survives when its best member reaches ``s_k - margin``; hence every candidate whose
    score is at least ``s_k - margin`` survives. Never fewer than ``max(k, floor)`` survivors (the
    best-scoring dropped candidates are taken back when needed).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    keep_at_least = min(n, max(int(k), int(floor or 0)))
    if n <= keep_at_least:
        return np.ones(n, dtype=bool)
    if not np.all(np.isfinite(scores)):
        return np.ones(n, dtype=bool)  # never prune on a broken score
    kth = np.partition(scores, n - k)[n - k]  # k-th best
    # tiny slack so that a margin calibrated to exactly reach a score keeps it despite float rounding
    threshold = kth - max(float(margin), 0.0) - 1e-9 * max(1.0, abs(kth))
    keep = np.zeros(n, dtype=bool)
    for members in clusters_1d(scores, max(float(cluster_gap), 0.0)):
        if scores[members].max() >= threshold:
            keep[members] = True
    short = keep_at_least - int(keep.sum())
    if short > 0:
        dropped = np.nonzero(~keep)[0]
        best = dropped[np.argsort(-scores[dropped], kind="stable")[:short]]
        keep[best] = True
    return keep


def prune_rank_mask(scores: np.ndarray, keep_n: int, k: int, floor: int | None = None) -> np.ndarray:
    """Keep-mask for the ``rank`` rule: the best ``max(keep_n, k, floor)`` live candidates by early score
    (ties at the cut are kept). Non-finite scores prune nothing."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    keep_n = min(n, max(int(keep_n), int(k), int(floor or 0)))
    if keep_n >= n or not np.all(np.isfinite(scores)):
        return np.ones(n, dtype=bool)
    cut = np.partition(scores, n - keep_n)[n - keep_n]  # keep_n-th best
    return scores >= cut
