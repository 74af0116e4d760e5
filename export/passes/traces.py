"""Calibration traces: calibration queries through the full bundle, and every layer's early scores per method.

A :class:`Trace` holds, for one query, every candidate's pooled state after every layer (recorded through
:meth:`Reranker.trace <edge_sel.runtime.rerank.Reranker.trace>`), the final scores and each layer's block
influence — the mean over tokens of ``1 - cos(layer input, layer output)`` (ShortGPT, Men et al. 2024).
From traces, :func:`method_scores` gives every layer's early scores with each method: ``probe`` — a per-layer
linear probe fitted in closed form (ridge) to the final score, cross-fitted so that each query is scored by
probes fitted on the other queries; ``head`` / ``cosine`` — the scoring strategy's own intermediate score.
Runtime side only (numpy + onnxruntime).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edge_sel.runtime.rerank import LayerObservation, Scoring
from edge_sel.runtime.rerank.scoring import cosine_scores


@dataclass
class Trace:
    """One calibration query through the full bundle."""

    final: np.ndarray                  # [N] final scores
    pooled: np.ndarray                 # [L, N, H] pooled state of every candidate after every layer
    query_pooled: np.ndarray | None    # [L, H] (bi-encoders)
    influence: np.ndarray              # [L] mean over tokens of 1 - cos(layer input, layer output)
    extra: dict = field(default_factory=dict)


class TraceRecorder:
    """An observer for :meth:`Reranker.trace`: records one query's pooled states and block influence."""

    def __init__(self, n_layers: int, n_docs: int):
        self.n_layers, self.n_docs = n_layers, n_docs
        self.pooled: np.ndarray | None = None
        self.query: np.ndarray | None = None
        self.infl = np.zeros(n_layers)
        self.tok = np.zeros(n_layers)

    def __call__(self, obs: LayerObservation) -> None:
        p = obs.pooled
        if self.pooled is None:
            self.pooled = np.zeros((self.n_layers, self.n_docs, p.shape[1]), dtype=np.float32)
            self.query = np.zeros((self.n_layers, p.shape[1]), dtype=np.float32)
        docs = obs.items < self.n_docs
        self.pooled[obs.layer, obs.items[docs]] = p[docs]
        if not docs.all():
            self.query[obs.layer] = p[~docs][0]
        a, b, m = obs.hidden_in.astype(np.float64), obs.hidden_out.astype(np.float64), obs.mask > 0.5
        if b.shape[1] != a.shape[1]:  # a first-token-only final layer (cross-encoders): its influence on that token
            a, m = a[:, :b.shape[1]], m[:, :b.shape[1]]
        cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
        self.infl[obs.layer] += float((1.0 - cos)[m].sum())
        self.tok[obs.layer] += float(m.sum())

    def trace(self, final: np.ndarray, query_item: bool) -> Trace:
        return Trace(final.astype(np.float64), self.pooled, self.query if query_item else None,
                     self.infl / np.maximum(self.tok, 1))


def collect_traces(rr, data: list[tuple[str, list[str]]], progress: Callable[[int, int], None] | None = None) -> list[Trace]:
    """Trace every ``(query, documents)`` of ``data`` through the reranker ``rr`` (unpruned)."""
    L = len(rr.bundle.spec.layers)
    traces = []
    for qn, (query, docs) in enumerate(data):
        recorder = TraceRecorder(L, len(docs))
        final = rr.trace(query, docs, recorder)
        traces.append(recorder.trace(final, rr.scoring.query_item))
        if progress:
            progress(qn + 1, len(data))
    return traces


# ---- per-layer early scores for each method ----------------------------------------------------
def head_scores(scoring: Scoring, trace: Trace, layer: int) -> np.ndarray:
    """The strategy's own intermediate score at ``layer``: the head (logit lens), or cosine for bi-encoders."""
    return scoring.layer_scores(trace.pooled[layer], None if trace.query_pooled is None else trace.query_pooled[layer])


def final_query_cosine(trace: Trace, layer: int) -> np.ndarray:
    """Bi-encoders, method (a): the document at layer l against the query's *final* embedding."""
    return cosine_scores(trace.pooled[layer], trace.query_pooled[-1]).astype(np.float64)


def features(scoring: type[Scoring] | Scoring, trace: Trace, layer: int) -> np.ndarray:
    return scoring.probe_features(trace.pooled[layer], None if trace.query_pooled is None else trace.query_pooled[layer])


def fit_probes(scoring: type[Scoring] | Scoring, traces: list[Trace]) -> tuple[np.ndarray, list[dict]]:
    """Per-layer ridge probes ``[L, F+1]`` fitted on all ``traces``, and each layer's fit info."""
    W, infos, _ = probe_fits(scoring, traces)
    return W, infos


def crossfit_probe_scores(scoring: type[Scoring] | Scoring, traces: list[Trace], folds: int = 4) -> list[np.ndarray]:
    """Probe scores [L, N] per query, each from probes fitted on the other folds of queries."""
    return probe_fits(scoring, traces, folds)[2]


_FITS: dict = {}  # the last fit, keyed by the traces' identities: calibration asks for cross-fitted scores, then the probes


def probe_fits(scoring: type[Scoring] | Scoring, traces: list[Trace], folds: int = 4) -> tuple[np.ndarray, list[dict], list[np.ndarray]]:
    """Probes on all traces ``[L, F+1]``, fit infos, and cross-fitted scores (``[L, N]`` per query, from probes
    fitted on the other folds), from one pass over per-query sufficient statistics (:class:`RidgeStats`)."""
    key = (tuple(id(t) for t in traces), folds, getattr(scoring, "name", ""))
    if key in _FITS:
        return _FITS[key]
    L = traces[0].pooled.shape[0]
    out = [np.zeros((L, len(t.final))) for t in traces]
    W, infos = [], []
    for l in range(L):
        X = [features(scoring, t, l) for t in traces]
        stats = RidgeStats(X, [t.final for t in traces], folds)
        w, info = stats.fit()
        W.append(w)
        infos.append(info)
        for i, s in enumerate(stats.crossfit(info["lambda"])):
            out[i][l] = s
    _FITS.clear()
    _FITS[key] = (np.stack(W), infos, out)
    return _FITS[key]


def method_scores(rr, traces: list[Trace], methods: list[str]) -> dict[str, list[np.ndarray]]:
    """Early scores ``[L, N]`` per query for each method (probes cross-fitted)."""
    L = len(rr.bundle.spec.layers)
    out: dict[str, list[np.ndarray]] = {}
    for m in methods:
        if m == "probe":
            out[m] = crossfit_probe_scores(rr.scoring, traces)
        elif m in ("head", "cosine"):
            out[m] = [np.stack([head_scores(rr.scoring, t, l) for l in range(L)]) for t in traces]
        elif m == "final_query_cosine":
            out[m] = [np.stack([final_query_cosine(t, l) for l in range(L)]) for t in traces]
    return out


def agreement_table(scores: list[np.ndarray], traces: list[Trace], k: int) -> list[dict]:
    """Per layer: mean Spearman with the final score, mean top-K overlap, and how deep (as a fraction
    of N) the early ranking must go to contain the whole final top-K."""
    L = scores[0].shape[0]
    rows = []
    for l in range(L):
        rho, over, depth = [], [], []
        for s, t in zip(scores, traces):
            kk = min(k, len(t.final))
            top = np.argsort(-t.final, kind="stable")[:kk]
            early_rank = np.argsort(np.argsort(-s[l], kind="stable"), kind="stable")
            rho.append(spearman(s[l], t.final))
            over.append(len(set(top) & set(np.argsort(-s[l], kind="stable")[:kk])) / kk)
            depth.append((early_rank[top].max() + 1) / len(t.final))
        rows.append({"layer": l, "spearman": float(np.mean(rho)), "topk_overlap": float(np.mean(over)),
                     "depth_for_topk": float(np.mean(depth))})
    return rows


# ---- ridge probe (closed form) -------------------------------------------------------------------
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    d = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / d) if d > 0 else 0.0


class RidgeStats:
    """Ridge regression of the final score on one layer's features, from per-query sufficient statistics.

    Ranking only compares candidates of one query, so features and targets are centred within each query (the
    per-query offset is irrelevant and would otherwise dominate). Features are standardised for the fit (the
    scaling folded back into ``w``); the penalty is ``lambda * n_samples``. Queries fall into ``folds`` folds
    (query ``i`` in fold ``i % folds``); every fit on some folds sums their Gram matrices ``X^T X`` and ``X^T y``
    instead of revisiting the rows, so choosing ``lambda`` by leave-folds-out Spearman and cross-fitting cost
    a few ``F x F`` solves, not passes over the data.
    """

    def __init__(self, X: list[np.ndarray], y: list[np.ndarray], folds: int = 4):
        self.means = [x.astype(np.float64).mean(0) for x in X]
        self.Xc = [x.astype(np.float64) - m for x, m in zip(X, self.means)]
        self.yc = [t.astype(np.float64) - t.mean() for t in y]
        self.nf = max(1, min(folds, len(X)))
        self.fold_of = np.arange(len(X)) % self.nf
        F = self.Xc[0].shape[1]
        self.G = np.zeros((self.nf, F, F))
        self.b = np.zeros((self.nf, F))
        self.n = np.zeros(self.nf)
        for x, t, f in zip(self.Xc, self.yc, self.fold_of):
            self.G[f] += x.T @ x
            self.b[f] += x.T @ t
            self.n[f] += len(t)
        self.sum_x = sum(x.astype(np.float64).sum(0) for x in X)
        self.sum_y = float(sum(t.astype(np.float64).sum() for t in y))

    def _solve(self, train: np.ndarray, lam: float) -> np.ndarray:
        """Weights (in raw feature units) fitted on the folds in ``train``."""
        G, b, n = self.G[train].sum(0), self.b[train].sum(0), self.n[train].sum()
        sd = np.sqrt(np.maximum(np.diag(G) / max(n, 1.0), 0.0))
        sd[sd < 1e-8] = 1.0
        A = G / np.outer(sd, sd) + lam * n * np.eye(len(sd))
        return np.linalg.solve(A, b / sd) / sd

    def fit(self, lambdas=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)) -> tuple[np.ndarray, dict]:
        """``(w_with_bias [F+1], info)`` on all queries; ``lambda`` by leave-one-fold-out mean Spearman."""
        folds = np.arange(self.nf)
        best_lam, best_cv, table = lambdas[0], -2.0, {}
        if self.nf >= 2 and len(lambdas) > 1:
            for lam in lambdas:
                rhos = []
                for f in folds:
                    w = self._solve(folds != f, lam)
                    rhos += [spearman(self.Xc[i] @ w, self.yc[i]) for i in np.nonzero(self.fold_of == f)[0]]
                table[lam] = float(np.mean(rhos))
                if table[lam] > best_cv:
                    best_lam, best_cv = lam, table[lam]
        w = self._solve(folds == folds, best_lam)
        bias = (self.sum_y - self.sum_x @ w) / self.n.sum()
        return np.concatenate([w, [bias]]).astype(np.float32), {"lambda": best_lam, "cv_spearman": best_cv, "cv": table}

    def crossfit(self, lam: float) -> list[np.ndarray]:
        """Each query's scores (up to a per-query offset, which no ranking sees) from the weights fitted on the
        other folds (all folds when there is one).
        ``lambda`` is chosen once on all folds: one hyper-parameter, a negligible leak into these scores."""
        folds = np.arange(self.nf)
        out: list[np.ndarray] = [np.zeros(0)] * len(self.Xc)
        for f in folds:
            w = self._solve(folds != f if self.nf > 1 else folds == folds, lam)
            for i in np.nonzero(self.fold_of == f)[0]:
                out[i] = self.Xc[i] @ w + self.means[i] @ w
        return out


def fit_ridge_probe(X: list[np.ndarray], y: list[np.ndarray], lambdas=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                    folds: int = 4) -> tuple[np.ndarray, dict]:
    """Fit ``y ~ X w + b`` per group (= query) in closed form; return ``(w_with_bias [F+1], info)``
    (see :class:`RidgeStats`)."""
    return RidgeStats(X, y, folds).fit(lambdas)
