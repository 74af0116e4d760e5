"""Pruned layers at export (``edge-sel export ... --drop-layers N|auto``).

Layers are ranked by how little they change the hidden state on calibration text — block influence,
the mean over tokens of ``1 - cos(layer input, layer output)`` (ShortGPT, Men et al. 2024) — and by
their *measured* effect on the ranking: the bundle is run with each low-influence layer skipped and
the top-10 is compared with the full model's. The cheapest layers are dropped: N of them, or with
``auto`` as many as keep the mean top-10 overlap with the full model >= ``threshold`` (added one at a
time, each step measured cumulatively). The manifest records ``dropped_layers`` (source indices) and
``drop_cost`` (what was measured).

Works on an exported bundle with the runtime only (no torch): layer files are hard-linked (copied
when linking is impossible) into a staged bundle without the dropped layers, which is renamed into
place (:mod:`.rewrite`). Calibration text: the builtin calibration data of
:mod:`edge_sel.export.passes.calibrate` (never the benchmark text). A calibrated early-ranking schedule is
invalidated by dropping layers and removed (calibrate again afterwards; ``export --calibrate`` does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.manifest import without_layers
from edge_sel.runtime.rerank import Reranker
from edge_sel.runtime.rerank.schedule import PROBE_ARRAY

from .calibrate import builtin_data
from .rewrite import editable_manifest, rewriting
from .traces import collect_traces

DEFAULT_THRESHOLD = 0.9
TOP = 10


def agreement(rr, data, refs, skip) -> dict:
    """Top-10 agreement with the full model's rankings ``refs`` when the layers at positions ``skip`` are left out."""
    over, ident = [], []
    with rr.skipping(skip):
        for (q, docs), ref in zip(data, refs):
            s = rr.predict(q, docs)
            k = min(TOP, len(docs))
            a, b = set(np.argsort(-s, kind="stable")[:k]), set(ref[:k])
            over.append(len(a & b) / k)
            ident.append(a == b)
    return {"top10_overlap": float(np.mean(over)), "top10_identical": float(np.mean(ident))}


def choose_layers(bundle: Bundle, n: int | str, threshold: float = DEFAULT_THRESHOLD, n_queries: int = 8,
                  n_candidates: int = 32, say: Callable[[str, int, int], None] | None = None) -> dict:
    """Measure and pick the layers to drop; returns ``{"drop": [positions], "influence", "individual", "cost"}``."""
    say = say or (lambda *a: None)
    L = len(bundle.spec.layers)
    if n != "auto":
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise InputError(f"--drop-layers takes a non-negative number or 'auto', got {n!r}")
        if n >= L:
            raise InputError(f"--drop-layers {n}: the model has {L} layers; at most {L - 1} can be dropped (at least one must stay)")
    data = builtin_data(n_queries, n_candidates, seed=1)
    rr = Reranker(bundle, pruning="off")
    rr.warn_truncated = False  # the calibration text's long passages: not the user's documents, no warning per call
    try:
        traces = collect_traces(rr, data)
        refs = [np.argsort(-t.final, kind="stable") for t in traces]
        influence = np.mean([t.influence for t in traces], 0)
        order = [int(i) for i in np.argsort(influence, kind="stable")]
        n_eval = min(L, max(6, 2 * (n if n != "auto" else 4)))
        individual = {}
        for j, l in enumerate(order[:n_eval]):
            say("drop: measure", j, n_eval)
            individual[l] = agreement(rr, data, refs, [l])
        say("drop: measure", n_eval, n_eval)
        ranked = sorted(individual, key=lambda l: (-individual[l]["top10_overlap"], influence[l]))
        ranked += [l for l in order if l not in individual]
        if n == "auto":
            chosen, cost = [], {"top10_overlap": 1.0, "top10_identical": 1.0}
            for l in ranked[: L - 1]:
                trial = agreement(rr, data, refs, chosen + [l])
                if trial["top10_overlap"] < threshold:
                    break
                chosen.append(l)
                cost = trial
        else:
            chosen = ranked[:n]
            cost = agreement(rr, data, refs, chosen) if chosen else {"top10_overlap": 1.0, "top10_identical": 1.0}
    finally:
        rr.close()
    return {"drop": sorted(chosen), "influence": influence.tolist(),
            "individual": {int(k): v for k, v in individual.items()}, "cost": cost,
            "calibration": {"data": "builtin", "queries": n_queries, "candidates": n_candidates, "seed": 1}}


def rewrite_without(bundle: Bundle, drop: list[int], cost: dict) -> Path:
    """Rewrite ``bundle`` without the layers at positions ``drop`` (atomic; files hard-linked)."""
    L = len(bundle.spec.layers)
    if any(not 0 <= d < L for d in drop) or len(set(drop)) >= L:
        raise InputError(f"cannot drop layers {drop} from a bundle with {L} layers")
    manifest, dropped_files = without_layers(editable_manifest(bundle), set(drop), cost, PROBE_ARRAY, bundle.spec.files)
    with rewriting(bundle, leave_out=dropped_files) as w:
        return w.commit(manifest)


def drop_layers(path: str | os.PathLike, n: int | str, threshold: float = DEFAULT_THRESHOLD, n_queries: int = 8,
                n_candidates: int = 32, say=None) -> dict:
    """Choose and drop layers from the bundle at ``path`` in place; returns what was measured."""
    bundle = Bundle.open(path)
    if n == 0:
        return {"drop": [], "cost": None}
    res = choose_layers(bundle, n, threshold, n_queries, n_candidates, say)
    cost = {**res["cost"], "threshold": threshold if n == "auto" else None, "requested": n,
            "block_influence": {bundle.spec.layers[p].source_index: round(res["influence"][p], 5) for p in res["drop"]},
            "calibration": res["calibration"]}
    if res["drop"]:
        rewrite_without(bundle, res["drop"], cost)
    return {**res, "cost": cost}
