"""Progressive cluster pruning: at the schedule's layers, drop the candidates that cannot reach the top-K.

GRATING (EuroSys'26) prunes between layers of monolithic forwarding. At a schedule layer the live candidates
are scored (:class:`.scoring.LayerScorer`); the ``margin`` rule groups the scores into clusters of similar score
(1-D: split at gaps wider than ``cluster_gap``) and drops every cluster whose best member is below
``s_K - margin`` (``s_K`` = the K-th best live score); the ``rank`` rule keeps a calibrated fraction of the
call's candidates. Never fewer than ``floor`` (and K) candidates stay live. The survivors are re-packed into
chunks (:meth:`.chunks.ChunkStore.compact`); a dropped candidate keeps its last early score and the layer it
was dropped at.
"""

from __future__ import annotations

import numpy as np

from edge_sel.runtime import trace

from .chunks import Chunk, ChunkStore, Packing
from .schedule import Schedule
from .scoring import LayerScorer, Scoring


# ---- keep-masks (pure functions; property-tested) ---------------------------------------------------
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


class Pruner:
    """One call's pruning: where to prune, what was dropped at which layer, and the dropped candidates' last scores.

    ``k`` is the schedule's calibrated K: protecting it protects any smaller ``top_k`` (the final top-``top_k``
    is a subset of the final top-K)."""

    def __init__(self, schedule: Schedule, scorer: LayerScorer, scoring: Scoring, n_docs: int, n_items: int,
                 n_layers: int, packing: Packing, hidden_size: int):
        self.schedule = schedule
        self.scorer = scorer
        self.scoring = scoring
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
        if sched.rule == "rank":  # keep a calibrated fraction of this call's candidates
            keep = prune_rank_mask(est, sched.keep_count(layer, self.n_docs), self.k, sched.floor)
        else:
            margin = sched.margin_at(layer)
            keep = prune_mask(est, self.k, margin, sched.floor, sched.cluster_gap * margin)
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
