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
from edge_sel.runtime.rerank.scoring import apply_probe, cosine_scores


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
    L = traces[0].pooled.shape[0]
    W, infos = [], []
    for l in range(L):
        w, info = fit_ridge_probe([features(scoring, t, l) for t in traces], [t.final for t in traces])
        W.append(w)
        infos.append(info)
    return np.stack(W), infos


def crossfit_probe_scores(scoring: type[Scoring] | Scoring, traces: list[Trace], folds: int = 4) -> list[np.ndarray]:
    """Probe scores [L, N] per query, each from probes fitted on the other folds of queries."""
    L = traces[0].pooled.shape[0]
    nf = max(2, min(folds, len(traces)))
    fold_of = np.arange(len(traces)) % nf
    out = [np.zeros((L, len(t.final))) for t in traces]
    for f in range(nf):
        train = [t for t, g in zip(traces, fold_of) if g != f]
        test = [i for i, g in enumerate(fold_of) if g == f]
        W, _ = fit_probes(scoring, train)
        for i in test:
            for l in range(L):
                out[i][l] = apply_probe(W[l], features(scoring, traces[i], l))
    return out


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


def fit_ridge_probe(X: list[np.ndarray], y: list[np.ndarray], lambdas=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                    folds: int = 4) -> tuple[np.ndarray, dict]:
    """Fit ``y ~ X w + b`` per group (= query) in closed form; return ``(w_with_bias [F+1], info)``.

    Ranking only compares candidates of one query, so features and targets are centred within each
    query before fitting (the per-query offset is irrelevant and would otherwise dominate). Features
    are standardised for the fit and the scaling is folded back into ``w``; the penalty is
    ``lambda * n_samples``. ``lambda`` is chosen by
    leave-queries-out cross-validation on mean within-query Spearman correlation.
    """
    Xc = [x.astype(np.float64) - x.mean(0, keepdims=True) for x in X]
    yc = [t.astype(np.float64) - t.mean() for t in y]
    Z = np.concatenate(Xc)
    sd = Z.std(0)
    sd[sd < 1e-8] = 1.0
    F = Z.shape[1]
    g = len(X)

    def solve(idx, lam):
        A = np.concatenate([Xc[i] for i in idx]) / sd
        t = np.concatenate([yc[i] for i in idx])
        return np.linalg.solve(A.T @ A + lam * len(t) * np.eye(F), A.T @ t)

    best_lam, best_cv, cv_table = lambdas[0], -2.0, {}
    if g >= 2 and len(lambdas) > 1:
        nf = min(folds, g)
        fold_of = np.arange(g) % nf
        for lam in lambdas:
            rhos = []
            for f in range(nf):
                train = np.nonzero(fold_of != f)[0]
                w = solve(train, lam)
                for i in np.nonzero(fold_of == f)[0]:
                    rhos.append(spearman((Xc[i] / sd) @ w, yc[i]))
            cv_table[lam] = float(np.mean(rhos))
            if cv_table[lam] > best_cv:
                best_lam, best_cv = lam, cv_table[lam]
    w = solve(np.arange(g), best_lam) / sd
    allX = np.concatenate([x.astype(np.float64) for x in X])
    ally = np.concatenate([t.astype(np.float64) for t in y])
    b = float(ally.mean() - allX.mean(0) @ w)
    return np.concatenate([w, [b]]).astype(np.float32), {"lambda": best_lam, "cv_spearman": best_cv, "cv": cv_table}


