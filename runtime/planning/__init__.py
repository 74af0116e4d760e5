"""Memory planning for both engines, before any work: a budget becomes a plan or a :class:`BudgetError`
naming the minimum that would work.

* :mod:`.rerank` — the reranker's layer window, chunk size and spill decision (:class:`Planner`);
* :mod:`.kv` — the generator's KV cache capacity, recall fetch area and prefill scratch (:class:`KVPlanner`).
"""

from __future__ import annotations

from .kv import KVPlan, KVPlanner, parse_budget
from .rerank import CallSize, Plan, Planner

__all__ = ["CallSize", "Plan", "Planner", "KVPlan", "KVPlanner", "parse_budget"]
