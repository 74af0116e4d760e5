"""Pruning rules: how one schedule layer's early scores become a keep-set, one small module per rule.

A rule has a name (the schedule's ``rule``), the key of its per-layer parameter in the manifest, a keep-mask
(:meth:`Rule.keep_mask`, runtime) and the per-query *need* (:meth:`Rule.need`, calibration): the smallest
parameter that would have kept every final top-K member at that layer. Calibration stores ``safety x`` the worst
need of its queries (:meth:`Rule.param`).

* :mod:`.margin` — fixed score margin below the K-th best (fitted in score units);
* :mod:`.rank`   — fixed fraction of the call's candidates;
* :mod:`.spread` — per query: a margin in units of the spread of the scores near the K-th best (GRATING-style
  clusters; adapts to the query's own score distribution).
"""

from __future__ import annotations

from .base import Rule
from .margin import MarginRule
from .rank import RankRule
from .spread import SpreadRule

RULE_TYPES: dict[str, Rule] = {r.name: r for r in (MarginRule(), RankRule(), SpreadRule())}
RULES = tuple(RULE_TYPES)


def rule_for(name: str) -> Rule:
    """The rule called ``name`` (KeyError for an unknown one; the schedule validates names first)."""
    return RULE_TYPES[name]


__all__ = ["RULES", "RULE_TYPES", "Rule", "rule_for"]
