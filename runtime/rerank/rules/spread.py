"""Rule ``spread``: a per-query margin in units of the spread of the scores near the K-th best.

GRATING (EuroSys'26) decides per query from the layer's own score distribution: clusters clearly below the K-th
best are dropped, the boundary keeps computing. Here the margin below ``s_K`` is ``spread_l * sigma``, where
``sigma`` is the standard deviation of the best ``min(n, 2K)`` live scores — the query's own scale around the
boundary, which moves with the text's domain where a fixed score margin or keep fraction does not, and which
pruning the bottom does not shrink. Clusters split at gaps wider than ``cluster_gap`` times the margin.
"""

from __future__ import annotations

import numpy as np

from ..masks import prune_mask
from .base import Rule, kth_best


def boundary_spread(scores: np.ndarray, k: int) -> float:
    """Standard deviation of the best ``min(n, 2k)`` scores (1.0 when they are all equal or not finite)."""
    s = np.asarray(scores, dtype=np.float64)
    n = min(len(s), 2 * int(k))
    top = np.partition(s, len(s) - n)[len(s) - n:]
    sd = float(np.std(top))
    return sd if np.isfinite(sd) and sd > 1e-12 else 1.0


class SpreadRule(Rule):
    name = "spread"
    param_key = "spread"

    def keep_mask(self, scores, param, k, n_call, floor, cluster_gap):
        margin = param * boundary_spread(scores, k)
        return prune_mask(scores, k, margin, floor, cluster_gap * margin)

    def need(self, scores, top, k):
        return (kth_best(scores, k) - float(scores[top].min())) / boundary_spread(scores, k)
