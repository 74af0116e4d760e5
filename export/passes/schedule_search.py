"""Choosing the early-ranking schedule from recorded calibration trajectories (no model runs here).

* per layer ``l`` and query ``q``: the rule's *need* (:mod:`edge_sel.runtime.rerank.rules`) — for ``margin``
  ``s_K(l) - min over the final top-K of s_i(l)``, how far below the K-th best early score a final top-K member
  can sit; for ``rank`` the deepest early rank a final top-K member reached; for ``spread`` the margin's need in
  units of the query's spread near ``s_K``. The layer's parameter is ``safety * max_q need_q(l)``, so on the
  calibration set the final top-K always survives (pruning with the live subset only lowers ``s_K``);
* layers are added greedily by simulated layer-work saved (progressive pruning on the calibration
  trajectories, clusters and floor included) until another layer saves < ``min_gain``;
* a split-half check guards against margins that do not transfer to unseen queries.
"""

from __future__ import annotations

import numpy as np

from edge_sel.runtime.rerank.pruning import replay
from edge_sel.runtime.rerank.rules import rule_for

from .traces import Trace

DEFAULT_SAFETY = 3.0          # rule "margin": margin = safety x the worst calibration gap (lower lost top-10 members off-domain)
DEFAULT_RANK_SAFETY = 1.0     # rule "rank": keep fraction = safety x the deepest calibration rank (split-half validation raises it)
DEFAULT_SPREAD_SAFETY = 1.25  # rule "spread": margin = safety x the worst calibration gap in units of the query's spread
SAFETY_STEP = {"margin": 1.5, "rank": 1.25, "spread": 1.25}
DEFAULT_SAFETIES = {"margin": DEFAULT_SAFETY, "rank": DEFAULT_RANK_SAFETY, "spread": DEFAULT_SPREAD_SAFETY}
DEFAULT_CLUSTER_GAP = 0.25   # clusters split at gaps wider than this fraction of the layer's margin
DEFAULT_MAX_LAYERS = 4
MIN_GAIN = 0.02              # a schedule layer must save >= 2% of the layer-work on calibration
MAX_SAFETY_STEPS = 4         # split-half validation: raise safety up to this many times, else no schedule


def rule_needs(scores: list[np.ndarray], traces: list[Trace], k: int, rule: str) -> np.ndarray:
    """``[Q, L]``: per query and layer, the smallest parameter of ``rule`` that keeps the final top-K (all candidates live)."""
    r = rule_for(rule)
    D = np.zeros((len(traces), scores[0].shape[0]))
    for qi, (s, t) in enumerate(zip(scores, traces)):
        top = np.argsort(-t.final, kind="stable")[:k]
        for l in range(s.shape[0]):
            D[qi, l] = r.need(s[l], top, k)
    return D


def layer_params(scores: list[np.ndarray], traces: list[Trace], k: int, safety: float, rule: str) -> np.ndarray:
    """Per-layer pruning parameter from the calibration worst case (margins, keep fractions, spread units)."""
    r = rule_for(rule)
    return np.array([r.param(w, safety) for w in rule_needs(scores, traces, k, rule).max(0)])


def simulate(scores: list[np.ndarray], traces: list[Trace], k: int, layers: list[int], margins: list[float],
             floor: int | None = None, cluster_gap: float = DEFAULT_CLUSTER_GAP, rule: str = "margin") -> dict:
    """Run progressive pruning on recorded trajectories: work saved and whether the final top-K survived.
    ``margins`` are the per-layer parameters of ``rule`` (keep fractions for ``rank``)."""
    L = scores[0].shape[0]
    work, full, kept_topk, identical, overlap = 0, 0, [], [], []
    for s, t in zip(scores, traces):
        n = len(t.final)
        live, counts = replay(rule, s, list(layers), list(margins), k, n, floor, cluster_gap, last_layer=L - 1)
        if layers:  # layer l computes what was live before pruning at l
            work += n * (layers[0] + 1) + len(live) * (L - 1 - layers[-1])
            work += sum(counts[i + 1] * (layers[i + 1] - layers[i]) for i in range(len(layers) - 1))
        else:
            work += n * L
        full += n * L
        top = set(np.argsort(-t.final, kind="stable")[:k])
        # what rank() returns: survivors by final score, then the dropped (none of them can displace a survivor
        # when at least K survive, which every rule guarantees)
        got = set(live[np.argsort(-t.final[live], kind="stable")[:k]])
        kept_topk.append(len(top & set(live)) / k)
        overlap.append(len(top & got) / k)
        identical.append(got == top)
    return {"layer_work_saved": 1.0 - work / full, "topk_recall": float(np.mean(kept_topk)),
            "topk_identical": float(np.mean(identical)), "overlap": float(np.mean(overlap))}


def choose_schedule(scores: list[np.ndarray], traces: list[Trace], k: int, safety: float = DEFAULT_SAFETY,
                    max_layers: int = DEFAULT_MAX_LAYERS, min_gain: float = MIN_GAIN, floor: int | None = None,
                    cluster_gap: float = DEFAULT_CLUSTER_GAP, rule: str = "margin") -> tuple[list[int], list[float], dict]:
    """Greedy: add the layer that saves the most simulated work until the gain drops below ``min_gain``."""
    L = scores[0].shape[0]
    margins_all = layer_params(scores, traces, k, safety, rule)
    chosen: list[int] = []
    best = simulate(scores, traces, k, [], [], floor, cluster_gap, rule)
    while len(chosen) < max_layers:
        cand = []
        for l in range(L - 1):
            if l in chosen:
                continue
            ls = sorted(chosen + [l])
            r = simulate(scores, traces, k, ls, [float(margins_all[x]) for x in ls], floor, cluster_gap, rule)
            cand.append((r["layer_work_saved"], -l, l, r))
        if not cand:
            break
        gain, _, l, r = max(cand)
        if gain - best["layer_work_saved"] < min_gain:
            break
        chosen = sorted(chosen + [l])
        best = r
    return chosen, [float(margins_all[l]) for l in chosen], {"simulated": best, "params_all": margins_all.tolist()}


def validated_schedule(scores: list[np.ndarray], traces: list[Trace], k: int, safety: float | None = None,
                       max_layers: int = DEFAULT_MAX_LAYERS, min_gain: float = MIN_GAIN,
                       rule: str = "margin") -> tuple[list[int], list[float], dict]:
    """:func:`choose_schedule`, then a split-half check: margins taken from one half of the calibration
    queries must keep the other half's final top-K on the chosen layers (both ways). If not, the safety
    factor grows x1.5 (up to MAX_SAFETY_STEPS times); if it never passes, no layer is scheduled.
    Worst-case margins from one query set do not always transfer to another; this keeps calibration from
    storing a schedule that loses top-K members."""
    s = float(safety if safety is not None else DEFAULT_SAFETIES[rule])
    Q = len(traces)
    info: dict = {}
    for _ in range(MAX_SAFETY_STEPS):
        layers, margins, info = choose_schedule(scores, traces, k, s, max_layers, min_gain, rule=rule)
        if not layers:
            break
        ok = Q < 4  # too few queries to split: trust the full-set margins
        if not ok:
            ok = True
            for f in (0, 1):
                A = [i for i in range(Q) if i % 2 == f]
                B = [i for i in range(Q) if i % 2 != f]
                pA = layer_params([scores[i] for i in A], [traces[i] for i in A], k, s, rule)
                r = simulate([scores[i] for i in B], [traces[i] for i in B], k, layers, [float(pA[l]) for l in layers], rule=rule)
                ok &= r["topk_recall"] == 1.0
        if ok:
            info["safety_used"] = s
            return layers, margins, info
        s *= SAFETY_STEP[rule]
    info["safety_used"] = s
    info["note"] = "no schedule passed split-half validation" if info.get("simulated", {}).get("layer_work_saved", 0) else info.get("note")
    return [], [], {**info, "simulated": simulate(scores, traces, k, [], [], rule=rule)}
