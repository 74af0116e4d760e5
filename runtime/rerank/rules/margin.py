"""Rule ``margin``: drop clusters of similar score whose best member is below ``s_K - margin`` (score units)."""

from __future__ import annotations


from ..masks import prune_mask
from .base import Rule, kth_best


class MarginRule(Rule):
    name = "margin"
    param_key = "margin"

    def keep_mask(self, scores, param, k, n_call, floor, cluster_gap):
        return prune_mask(scores, k, param, floor, cluster_gap * param)

    def need(self, scores, top, k):
        return kth_best(scores, k) - float(scores[top].min())
