"""Early ranking: score candidates at an intermediate layer and drop the ones that cannot make the top-K.

GRATING (EuroSys'26, "monolithic forwarding") observed that the relative order of candidates settles
in intermediate layers of a reranker. A *schedule* (calibrated by :mod:`edge_sel.export.passes.calibrate`,
stored in the bundle manifest) names the layers at which the runtime scores the live candidates and,
per layer, a margin in score units. At a schedule layer the live scores are grouped into clusters of
similar score (1-D: split at gaps wider than ``cluster_gap``) and every cluster whose best member is
below ``s_K - margin`` (``s_K`` = the K-th best live score) is dropped; never fewer than ``floor``
candidates stay live.

Two rules turn early scores into a keep-set (``rule``; calibrated and chosen by measured saving):

* ``margin`` — the cluster rule above, margins in score units.
* ``rank``   — keep the best ``ceil(keep_l * N)`` candidates by early score (``N`` = the call's candidate
  count), ``keep_l`` = a safety factor times the deepest early rank (as a fraction of N) that a final
  top-K member reached on the calibration queries. Measured on SmolLM2-135M (96 calibration queries,
  benchmarks/EARLY_RANK.md): the probe's error is heavy-tailed in score units but not in rank, so at the
  same held-out safety the rank rule saves about twice the layer-work of the margin rule.

How a layer is scored (``method``; measured per model by ``edge-sel calibrate``, see the README):

* ``probe``  — a per-layer linear probe ``w_l . f(pooled_l) + b_l`` fitted in closed form (ridge) at
  calibration time to the *final* score. ``f`` = the pooled state divided by its RMS for
  cross-encoders / yes-no rerankers (decoder residual streams grow with depth); for bi-encoders
  ``f = normalize(doc_l) * normalize(query_l)`` (element-wise), so the probe is a learned weighted
  cosine. Stored as one raw float32 array ``[n_layers, F + 1]`` in the bundle (no pickle).
* ``head``   — the bundle's own head applied to intermediate pooled states ("logit lens").
* ``cosine`` — bi-encoders: cosine between the document and the query pooled at the same layer.

Everything here is numpy-only (runtime side).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_sel.runtime.errors import BundleError, InputError

SCHEDULE_VERSION = 1
METHODS = ("probe", "head", "cosine")
RULES = ("margin", "rank")
PROBE_ARRAY = "early_probe"


# ---- pruning (pure function; property-tested) ---------------------------------------------------
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


# ---- features and scores ------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def probe_features(scoring: str, pooled: np.ndarray, query_pooled: np.ndarray | None = None) -> np.ndarray:
    """The probe's input features for one layer (see module docstring)."""
    pooled = np.asarray(pooled, dtype=np.float32)
    if scoring == "bi_encoder":
        if query_pooled is None:
            raise ValueError("bi-encoder probe features need the query's pooled state at the same layer")
        return _unit(pooled) * _unit(query_pooled)[None, :]
    rms = np.sqrt(np.mean(pooled.astype(np.float64) ** 2, axis=-1, keepdims=True))
    return (pooled / np.maximum(rms, 1e-12)).astype(np.float32)


def cosine_scores(pooled: np.ndarray, query_pooled: np.ndarray) -> np.ndarray:
    return _unit(pooled) @ _unit(query_pooled)


# ---- ridge probe (closed form) -------------------------------------------------------------------
def _spearman(a: np.ndarray, b: np.ndarray) -> float:
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
                    rhos.append(_spearman((Xc[i] / sd) @ w, yc[i]))
            cv_table[lam] = float(np.mean(rhos))
            if cv_table[lam] > best_cv:
                best_lam, best_cv = lam, cv_table[lam]
    w = solve(np.arange(g), best_lam) / sd
    allX = np.concatenate([x.astype(np.float64) for x in X])
    ally = np.concatenate([t.astype(np.float64) for t in y])
    b = float(ally.mean() - allX.mean(0) @ w)
    return np.concatenate([w, [b]]).astype(np.float32), {"lambda": best_lam, "cv_spearman": best_cv, "cv": cv_table}


def apply_probe(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    return features @ weights[:-1] + weights[-1]


# ---- the schedule ------------------------------------------------------------------------------
@dataclass
class Schedule:
    """Where and how much to prune. ``layers[i]`` is a position in the bundle's ``layers`` list."""

    method: str
    top_k: int
    layers: list[int]
    margins: list[float]
    floor: int | None = None
    cluster_gap: float = 0.0
    safety: float = 1.0
    probe: str | None = None          # name of the probe array in the manifest's ``arrays``
    source_layers: list[int] | None = None  # ``source_index`` of each schedule layer (guards against re-exported / dropped layers)
    info: dict[str, Any] = field(default_factory=dict)
    rule: str = "margin"
    keep: list[float] | None = None    # rule "rank": fraction of the call's candidates kept at each schedule layer

    def to_manifest(self) -> dict[str, Any]:
        if self.rule == "rank":
            layers = [{"layer": int(l), "keep": float(f)} for l, f in zip(self.layers, self.keep or [])]
        else:
            layers = [{"layer": int(l), "margin": float(m)} for l, m in zip(self.layers, self.margins)]
        return {"version": SCHEDULE_VERSION, "method": self.method, "rule": self.rule, "top_k": int(self.top_k), "layers": layers,
                "floor": self.floor, "cluster_gap": float(self.cluster_gap), "safety": float(self.safety),
                "probe": self.probe, "source_layers": self.source_layers, **self.info}

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> "Schedule":
        if not isinstance(d, dict):
            raise InputError(f"schedule must be a mapping, got {type(d).__name__}")
        try:
            rule = str(d.get("rule", "margin"))
            if rule not in RULES:
                raise InputError(f"unknown pruning rule {rule!r} in the schedule (known: {', '.join(RULES)})")
            layers = [int(e["layer"]) for e in d["layers"]]
            keep = [float(e["keep"]) for e in d["layers"]] if rule == "rank" else None
            margins = [0.0] * len(layers) if rule == "rank" else [float(e["margin"]) for e in d["layers"]]
            known = {"version", "method", "rule", "top_k", "layers", "floor", "cluster_gap", "safety", "probe", "source_layers"}
            return cls(method=str(d.get("method", "head")), top_k=int(d["top_k"]), layers=layers, margins=margins, rule=rule, keep=keep,
                       floor=None if d.get("floor") is None else int(d["floor"]), cluster_gap=float(d.get("cluster_gap", 0.0)),
                       safety=float(d.get("safety", 1.0)), probe=d.get("probe"), source_layers=d.get("source_layers"),
                       info={k: v for k, v in d.items() if k not in known})
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"malformed early-ranking schedule ({type(e).__name__}: {e}); recalibrate with `edge-sel calibrate BUNDLE`") from None

    def validate(self, bundle) -> None:
        """Refuse a schedule that does not fit ``bundle`` (layers it lacks, wrong method, missing probe)."""
        where = bundle.root
        n = len(bundle.layers)
        if int(self.top_k) <= 0:
            raise InputError(f"{where}: schedule top_k must be positive, got {self.top_k}")
        if self.method not in METHODS:
            raise InputError(f"{where}: unknown early-ranking method {self.method!r} (known: {', '.join(METHODS)})")
        if self.method == "cosine" and bundle.scoring != "bi_encoder":
            raise InputError(f"{where}: method 'cosine' needs a bi-encoder bundle, this one scores {bundle.scoring!r}")
        if self.method == "head" and bundle.scoring == "bi_encoder":
            raise InputError(f"{where}: use method 'cosine' (or 'probe') for a bi-encoder bundle")
        if self.rule not in RULES:
            raise InputError(f"{where}: unknown pruning rule {self.rule!r} (known: {', '.join(RULES)})")
        if self.rule == "rank":
            if self.keep is None or len(self.keep) != len(self.layers):
                raise InputError(f"{where}: a rank schedule needs one keep fraction per layer, got {self.keep!r} for layers {self.layers}")
            if any(not (np.isfinite(f) and 0 < f <= 1) for f in self.keep):
                raise InputError(f"{where}: rank schedule keep fractions must be in (0, 1], got {self.keep}")
        if len(self.layers) != len(self.margins):
            raise InputError(f"{where}: schedule has {len(self.layers)} layers but {len(self.margins)} margins")
        for l in self.layers:
            if not 0 <= l < n:
                raise InputError(f"{where}: schedule prunes at layer {l}, but the bundle has layers 0..{n - 1}; "
                                 f"recalibrate with `edge-sel calibrate {where}`")
        if sorted(set(self.layers)) != list(self.layers):
            raise InputError(f"{where}: schedule layers must be strictly increasing, got {self.layers}")
        if any(not np.isfinite(m) or m < 0 for m in self.margins):
            raise InputError(f"{where}: schedule margins must be finite and >= 0, got {self.margins}")
        if self.source_layers is not None:
            actual = [int(bundle.layers[l].get("source_index", l)) for l in self.layers]
            if list(self.source_layers) != actual:
                raise InputError(f"{where}: schedule was calibrated for source layers {self.source_layers} but those positions now hold "
                                 f"{actual} (layers were dropped or re-exported); recalibrate with `edge-sel calibrate {where}`")
        if self.method == "probe":
            if not self.probe or not bundle.has_array(self.probe):
                raise InputError(f"{where}: schedule uses a probe array {self.probe!r} that the bundle does not list; recalibrate")
            shape = bundle.manifest["arrays"][self.probe]["shape"]
            if len(shape) != 2 or shape[0] != n:
                raise BundleError(f"{where}: probe array {self.probe!r} has shape {shape}, expected [{n}, F+1]")

    def keep_count(self, layer: int, n_candidates: int) -> int:
        """Rule ``rank``: how many of the call's ``n_candidates`` stay live after ``layer``."""
        return int(np.ceil(self.keep[self.layers.index(layer)] * n_candidates - 1e-9))

    def margin_at(self, layer: int) -> float | None:
        try:
            return self.margins[self.layers.index(layer)]
        except ValueError:
            return None


class LayerScorer:
    """Scores the live candidates at a layer with a schedule's method (runtime side)."""

    def __init__(self, bundle, schedule: Schedule, head_session=None):
        self.scoring = bundle.scoring
        self.method = schedule.method
        self.head = head_session
        self.weights = np.array(bundle.array(schedule.probe)) if schedule.method == "probe" else None

    def __call__(self, layer: int, pooled: np.ndarray, query_pooled: np.ndarray | None = None) -> np.ndarray:
        if self.method == "probe":
            return apply_probe(self.weights[layer], probe_features(self.scoring, pooled, query_pooled)).astype(np.float64)
        if self.method == "cosine":
            return cosine_scores(pooled, query_pooled).astype(np.float64)
        out = self.head.run(None, {"pooled": np.ascontiguousarray(pooled, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float64).reshape(len(pooled))
