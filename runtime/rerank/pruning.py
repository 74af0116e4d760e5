"""Progressive cluster pruning: at the schedule's layers, drop the candidates that cannot reach the top-K.

GRATING (EuroSys'26) prunes between layers of monolithic forwarding. At a schedule layer the live candidates
are scored (:class:`.scoring.LayerScorer`) and the schedule's rule (:mod:`.rules`) turns the scores into a
keep-set: ``margin`` groups the scores into clusters of similar score (1-D: split at gaps wider than
``cluster_gap``) and drops every cluster whose best member is below ``s_K - margin`` (``s_K`` = the K-th best live
score); ``rank`` keeps a calibrated fraction of the call's candidates; ``spread`` is ``margin`` with the margin in
units of the query's own score spread near ``s_K``. Never fewer than ``floor`` (and K) candidates stay live. The survivors are re-packed into
chunks (:meth:`.chunks.ChunkStore.compact`); a dropped candidate keeps its last early score and the layer it
was dropped at.
"""

from __future__ import annotations

import numpy as np

from edge_sel.runtime import trace

from .chunks import Chunk, ChunkStore, Packing
from .masks import clusters_1d, prune_mask, prune_rank_mask  # noqa: F401  (the rules' building blocks, re-exported)
from .rules import rule_for
from .schedule import Schedule
from .scoring import LayerScorer, Scoring


def replay(rule: str, layer_scores, layers: list[int], params: list[float], k: int, n: int, floor: int | None = None,
           cluster_gap: float = 0.0, last_layer: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Progressive pruning replayed on recorded early scores (``layer_scores[l]``: every candidate's score after
    layer ``l``; only the schedule's layers are read): the candidates still live at the end, and how many were live
    at each schedule layer. Pruning never changes a survivor's computation, so this is what a pruned call does."""
    r = rule_for(rule)
    live = np.arange(n)
    counts = []
    for l, p in zip(layers, params):
        counts.append(len(live))
        if (last_layer is not None and l >= last_layer) or len(live) <= k:
            continue
        live = live[r.keep_mask(np.asarray(layer_scores[l])[live], p, k, n, floor, cluster_gap)]
    return live, counts


class Pruner:
    """One call's pruning: where to prune, what was dropped at which layer, and the dropped candidates' last scores.

    ``k`` is the schedule's calibrated K: protecting it protects any smaller ``top_k`` (the final top-``top_k``
    is a subset of the final top-K)."""

    def __init__(self, schedule: Schedule, scorer: LayerScorer, scoring: Scoring, n_docs: int, n_items: int,
                 n_layers: int, packing: Packing, hidden_size: int):
        self.schedule = schedule
        self.scorer = scorer
        self.scoring = scoring
        self.rule = rule_for(schedule.rule)
        self.layers = set(schedule.layers)
        self.k = int(schedule.top_k)
        self.n_docs, self.n_items, self.n_layers = n_docs, n_items, n_layers
        self.packing = packing
        self.hidden_size = hidden_size
        self.dropped_at = np.full(n_docs, -1, dtype=np.int64)
        self.last_score = np.zeros(n_docs, dtype=np.float32)

    @property
    def prunes_anything(self) -> bool:
        """False when no schedule layer can prune (the last layer never does; e.g. an empty schedule)."""
        return bool(self.layers - {self.n_layers - 1})

    @property
    def n_pruned(self) -> int:
        return int((self.dropped_at >= 0).sum())

    def after_layer(self, layer: int, chunks: list[Chunk], store: ChunkStore) -> list[Chunk]:
        """Prune at the schedule's layers; elsewhere keep all."""
        if layer not in self.layers or layer >= self.n_layers - 1:
            return chunks
        sched = self.schedule
        items, pooled = [], []
        q_pooled = None
        for c in chunks:
            p = self.scoring.pool(store.hidden(c), c.lengths, c.mask)
            docs = c.items < self.n_docs
            if not docs.all():  # bi-encoder query item
                q_pooled = p[~docs][0]
            items.append(c.items[docs])
            pooled.append(p[docs])
        items = np.concatenate(items)
        if len(items) <= self.k:
            return chunks
        est = self.scorer(layer, np.concatenate(pooled), q_pooled)
        keep = self.rule.keep_mask(est, sched.param_at(layer), self.k, self.n_docs, sched.floor, sched.cluster_gap)
        trace.instant("prune", layer=layer, live=len(items), kept=int(keep.sum()))
        if keep.all():
            return chunks
        gone = items[~keep]
        self.dropped_at[gone] = layer
        self.last_score[gone] = est[~keep]
        keep_items = np.ones(self.n_items, dtype=bool)
        keep_items[gone] = False
        return store.compact(chunks, keep_items, self.packing, self.hidden_size)

    def finish(self, scores: np.ndarray) -> np.ndarray:
        """Dropped candidates keep their last (early) score."""
        dropped = self.dropped_at >= 0
        scores[dropped] = self.last_score[dropped]
        return scores
