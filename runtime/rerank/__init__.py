"""The rerank engine: rank documents for a query by streaming a bundle's layers under a memory budget.

:mod:`.reranker` (the public :class:`Reranker`), :mod:`.execution` (depth-first and monolithic orders, prefix
reuse), :mod:`.chunks` (chunks, re-packing, spill), :mod:`.pruning` (early ranking at the schedule's layers),
:mod:`.schedule` (the calibrated schedule), :mod:`.scoring` (one strategy per scoring mode), :mod:`.stats`,
:mod:`.text` (tokenization), :mod:`.stream` and :mod:`.prefix` (layer sessions).
"""

from __future__ import annotations

from .execution import LayerObservation
from .reranker import Reranker
from .schedule import Schedule
from .scoring import BiEncoderScoring, CrossEncoderScoring, Scoring, YesNoScoring, scoring_class
from .stats import RerankStats

__all__ = ["Reranker", "RerankStats", "Schedule", "LayerObservation", "Scoring", "CrossEncoderScoring",
           "BiEncoderScoring", "YesNoScoring", "scoring_class"]
