"""Rule ``rank``: keep the best ``ceil(keep * N)`` candidates of the call (``N`` = its number of documents)."""

from __future__ import annotations

import numpy as np

from ..masks import prune_rank_mask
from .base import Rule


class RankRule(Rule):
    name = "rank"
    param_key = "keep"
    max_param = 1.0

    def keep_mask(self, scores, param, k, n_call, floor, cluster_gap):
        return prune_rank_mask(scores, int(np.ceil(param * n_call - 1e-9)), k, floor)

    def need(self, scores, top, k):
        rank = np.empty(len(scores), dtype=np.int64)
        rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
        return (int(rank[top].max()) + 1) / len(scores)
