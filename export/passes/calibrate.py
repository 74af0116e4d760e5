"""Calibrate early ranking for a bundle (runtime side: numpy + onnxruntime, no torch).

``calibrate(bundle, data="builtin", top_k=10)`` runs calibration queries through the *full* bundle,
records every candidate's pooled state after every layer, fits the per-layer ridge probes, scores
every candidate at every layer with each available method, and chooses the schedule:

* per layer ``l`` and query ``q``: ``gap_q(l) = s_K(l) - min over the final top-K of s_i(l)`` — how far
  below the K-th best early score a final top-K member can sit; the layer's margin is
  ``safety * max_q gap_q(l)``, so on the calibration set the final top-K always survives (pruning
  with the live subset only lowers ``s_K``, which keeps even more);
* layers are added greedily by simulated layer-work saved (progressive pruning on the calibration
  trajectories, clusters and floor included) until another layer saves < ``min_gain``;
* probe scores used for choosing margins are *cross-fitted* (each query scored by a probe fitted on
  the other queries), so the margins account for the probe's error on unseen queries.

Calibration data never overlaps the benchmark text: ``builtin`` draws CPython docstrings from the
modules in :data:`CALIBRATION_MODULES`, which are disjoint from ``edge_sel.export.textdata.MODULES`` (the
benchmark/demo pool); any passage that also appears in the benchmark pool is removed.
``--data FILE`` takes JSONL lines ``{"query": str, "documents": [str, ...]}``.

The bundle is rewritten in place atomically: the probe array is written under a fresh file name and
hashed, then ``manifest.json`` is replaced via a temporary file + ``os.replace`` (readers see the old or
the new manifest, both complete); the previous probe file is removed afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_sel.runtime.bundle import MANIFEST, Bundle, sha256_file
from edge_sel.runtime.errors import InputError

from edge_sel.runtime.early_rank import (PROBE_ARRAY, RULES, Schedule, _spearman, apply_probe, cosine_scores, fit_ridge_probe,
                         probe_features, prune_mask, prune_rank_mask)

log = logging.getLogger("edge_sel")

# Disjoint from edge_sel.export.textdata.MODULES (checked in tests): calibration never sees benchmark text.
CALIBRATION_MODULES = [
    "asyncio", "concurrent.futures", "multiprocessing", "unittest", "unittest.mock", "email.message", "email.parser",
    "email.header", "xml.etree.ElementTree", "http.server", "http.cookies", "http.cookiejar", "urllib.request",
    "ftplib", "smtplib", "imaplib", "poplib", "mailbox", "xmlrpc.client", "wsgiref.util", "optparse", "getopt",
    "pdb", "bdb", "profile", "pstats", "timeit", "trace", "tracemalloc", "doctest", "pydoc", "code", "codeop",
    "importlib", "importlib.util", "pkgutil", "modulefinder", "runpy", "selectors", "signal", "dataclasses",
    "typing", "html.parser", "json.decoder", "netrc", "nntplib", "telnetlib", "imghdr", "sndhdr", "chunk",
    "aifc", "sunau", "encodings", "zipimport", "compileall", "py_compile", "tabnanny", "pyclbr",
    "symtable", "token", "tomllib", "rlcompleter", "fileinput", "smtpd", "asynchat", "socketserver",
]

DEFAULT_SAFETY = 1.5          # rule "margin": margin = safety x the worst calibration gap
DEFAULT_RANK_SAFETY = 1.0     # rule "rank": keep fraction = safety x the deepest calibration rank (split-half validation raises it)
SAFETY_STEP = {"margin": 1.5, "rank": 1.25}
DEFAULT_QUERIES = 64          # measured (SmolLM2, 96 queries): schedules from 32 queries lost top-10 members on 2% of held-out queries
DEFAULT_CLUSTER_GAP = 0.25   # clusters split at gaps wider than this fraction of the layer's margin
DEFAULT_MAX_LAYERS = 4
MIN_GAIN = 0.02              # a schedule layer must save >= 2% of the layer-work on calibration
MAX_SAFETY_STEPS = 4         # split-half validation: raise safety x1.5 up to this many times, else no schedule


# ---- calibration data ---------------------------------------------------------------------------
def calibration_items() -> list[tuple[str, str]]:
    """``(query, passage)`` pairs from CALIBRATION_MODULES, minus any passage in the benchmark pool."""
    from edge_sel.export.textdata import MODULES, docstring_pairs, iter_docstrings

    bench = {p for _, p in docstring_pairs()}
    overlap = set(MODULES) & set(CALIBRATION_MODULES)
    assert not overlap, overlap
    return [(q, p) for _, q, p in iter_docstrings(CALIBRATION_MODULES, exclude=bench)]


def builtin_data(n_queries: int = 32, n_candidates: int = 48, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Calibration queries, each with its own passage plus ``n_candidates - 1`` other calibration passages."""
    items = calibration_items()
    if len(items) < n_candidates:
        raise InputError(f"only {len(items)} calibration passages available, fewer than {n_candidates} candidates per query")
    rng = np.random.default_rng(seed)
    qidx = rng.permutation(len(items))[:n_queries]
    data = []
    for qi in qidx:
        others = rng.permutation([j for j in range(len(items)) if j != qi])[: n_candidates - 1]
        cand = [items[qi][1]] + [items[j][1] for j in others]
        rng.shuffle(cand)
        data.append((items[qi][0], cand))
    return data


def load_data(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration data file not found: {p}")
    data = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: line {n} is not valid JSON ({e.msg}); expected {{\"query\": str, \"documents\": [str, ...]}}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("query"), str) or not isinstance(obj.get("documents"), list) \
                or not all(isinstance(d, str) for d in obj["documents"]):
            raise InputError(f"{p}: line {n} needs a string 'query' and a list of strings 'documents'")
        data.append((obj["query"], obj["documents"]))
    if not data:
        raise InputError(f"{p} holds no calibration queries")
    return data


# ---- traces -------------------------------------------------------------------------------------
@dataclass
class Trace:
    """One calibration query through the full bundle."""

    final: np.ndarray                  # [N] final scores
    pooled: np.ndarray                 # [L, N, H] pooled state of every candidate after every layer
    query_pooled: np.ndarray | None    # [L, H] (bi-encoders)
    influence: np.ndarray              # [L] mean over tokens of 1 - cos(layer input, layer output)
    extra: dict = field(default_factory=dict)


def collect_traces(rr, data: list[tuple[str, list[str]]], progress: Callable[[int, int], None] | None = None) -> list[Trace]:
    L = len(rr.bundle.layers)
    traces = []
    for qn, (query, docs) in enumerate(data):
        n = len(docs)
        state: dict[str, Any] = {"pooled": None, "q": None, "infl": np.zeros(L), "tok": np.zeros(L)}

        def observer(layer, chunk, h_in, state=state, n=n):
            p = rr._pool(chunk)
            if state["pooled"] is None:
                state["pooled"] = np.zeros((L, n, p.shape[1]), dtype=np.float32)
                state["q"] = np.zeros((L, p.shape[1]), dtype=np.float32)
            docs_ = chunk.items < n
            state["pooled"][layer, chunk.items[docs_]] = p[docs_]
            if not docs_.all():
                state["q"][layer] = p[~docs_][0]
            a, b, m = h_in.astype(np.float64), chunk.hidden.astype(np.float64), chunk.mask > 0.5
            if b.shape[1] != a.shape[1]:  # a first-token-only final layer (cross-encoders): its influence on that token
                a, m = a[:, :b.shape[1]], m[:, :b.shape[1]]
            cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
            state["infl"][layer] += float((1.0 - cos)[m].sum())
            state["tok"][layer] += float(m.sum())

        rr.observer = observer
        try:
            final = rr.predict(query, docs)
        finally:
            rr.observer = None
        traces.append(Trace(final.astype(np.float64), state["pooled"],
                            state["q"] if rr.bundle.scoring == "bi_encoder" else None,
                            state["infl"] / np.maximum(state["tok"], 1)))
        if progress:
            progress(qn + 1, len(data))
    return traces


# ---- per-layer early scores for each method ----------------------------------------------------
def head_scores(rr, trace: Trace, layer: int) -> np.ndarray:
    if rr.bundle.scoring == "bi_encoder":
        return cosine_scores(trace.pooled[layer], trace.query_pooled[layer]).astype(np.float64)
    out = rr.head.run(None, {"pooled": np.ascontiguousarray(trace.pooled[layer])})[0]
    return np.asarray(out, dtype=np.float64).reshape(-1)


def final_query_cosine(trace: Trace, layer: int) -> np.ndarray:
    """Bi-encoders, method (a): the document at layer l against the query's *final* embedding."""
    return cosine_scores(trace.pooled[layer], trace.query_pooled[-1]).astype(np.float64)


def features(scoring: str, trace: Trace, layer: int) -> np.ndarray:
    return probe_features(scoring, trace.pooled[layer], None if trace.query_pooled is None else trace.query_pooled[layer])


def fit_probes(scoring: str, traces: list[Trace]) -> tuple[np.ndarray, list[dict]]:
    L = traces[0].pooled.shape[0]
    W, infos = [], []
    for l in range(L):
        w, info = fit_ridge_probe([features(scoring, t, l) for t in traces], [t.final for t in traces])
        W.append(w)
        infos.append(info)
    return np.stack(W), infos


def crossfit_probe_scores(scoring: str, traces: list[Trace], folds: int = 4) -> list[np.ndarray]:
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
    L = len(rr.bundle.layers)
    out: dict[str, list[np.ndarray]] = {}
    for m in methods:
        if m == "probe":
            out[m] = crossfit_probe_scores(rr.bundle.scoring, traces)
        elif m in ("head", "cosine"):
            out[m] = [np.stack([head_scores(rr, t, l) for l in range(L)]) for t in traces]
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
            rho.append(_spearman(s[l], t.final))
            over.append(len(set(top) & set(np.argsort(-s[l], kind="stable")[:kk])) / kk)
            depth.append((early_rank[top].max() + 1) / len(t.final))
        rows.append({"layer": l, "spearman": float(np.mean(rho)), "topk_overlap": float(np.mean(over)),
                     "depth_for_topk": float(np.mean(depth))})
    return rows


# ---- schedule choice ----------------------------------------------------------------------------
def layer_gaps(scores: list[np.ndarray], traces: list[Trace], k: int) -> np.ndarray:
    """``[Q, L]``: s_K(l) minus the lowest early score of a final top-K member (<= 0 means no margin needed)."""
    G = np.zeros((len(traces), scores[0].shape[0]))
    for qi, (s, t) in enumerate(zip(scores, traces)):
        top = np.argsort(-t.final, kind="stable")[:k]
        for l in range(s.shape[0]):
            kth = np.sort(s[l])[::-1][k - 1]
            G[qi, l] = kth - s[l][top].min()
    return G


def rank_depths(scores: list[np.ndarray], traces: list[Trace], k: int) -> np.ndarray:
    """``[Q, L]``: the deepest early rank of a final top-K member, as a fraction of the query's candidates."""
    D = np.zeros((len(traces), scores[0].shape[0]))
    for qi, (s, t) in enumerate(zip(scores, traces)):
        top = np.argsort(-t.final, kind="stable")[:k]
        for l in range(s.shape[0]):
            rank = np.empty(len(t.final), dtype=np.int64)
            rank[np.argsort(-s[l], kind="stable")] = np.arange(len(t.final))
            D[qi, l] = (rank[top].max() + 1) / len(t.final)
    return D


def layer_params(scores: list[np.ndarray], traces: list[Trace], k: int, safety: float, rule: str) -> np.ndarray:
    """Per-layer pruning parameter from the calibration worst case: margins (score units) or keep fractions."""
    if rule == "rank":
        return np.minimum(1.0, safety * rank_depths(scores, traces, k).max(0))
    return safety * np.maximum(layer_gaps(scores, traces, k).max(0), 0.0)


def simulate(scores: list[np.ndarray], traces: list[Trace], k: int, layers: list[int], margins: list[float],
             floor: int | None = None, cluster_gap: float = DEFAULT_CLUSTER_GAP, rule: str = "margin") -> dict:
    """Run progressive pruning on recorded trajectories: work saved and whether the final top-K survived.
    ``margins`` are the per-layer parameters of ``rule`` (keep fractions for ``rank``)."""
    L = scores[0].shape[0]
    work, full, kept_topk, identical = 0, 0, [], []
    for s, t in zip(scores, traces):
        n = len(t.final)
        live = np.arange(n)
        for l in range(L):
            work += len(live)
            if l in layers and l < L - 1 and len(live) > k:
                m = margins[layers.index(l)]
                if rule == "rank":
                    keep = prune_rank_mask(s[l][live], int(np.ceil(m * n - 1e-9)), k, floor)
                else:
                    keep = prune_mask(s[l][live], k, m, floor, cluster_gap * m)
                live = live[keep]
        full += n * L
        top = set(np.argsort(-t.final, kind="stable")[:k])
        got = set(live[np.argsort(-t.final[live], kind="stable")[:k]])
        kept_topk.append(len(top & set(live)) / k)
        identical.append(got == top)
    return {"layer_work_saved": 1.0 - work / full, "topk_recall": float(np.mean(kept_topk)),
            "topk_identical": float(np.mean(identical))}


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
    Measured: worst-case margins from one query set do not always transfer to another (seeded
    cross-encoder, issue 3 study) — this keeps calibration from storing a schedule that loses top-K members."""
    s = float(safety if safety is not None else (DEFAULT_RANK_SAFETY if rule == "rank" else DEFAULT_SAFETY))
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


# ---- the whole calibration ---------------------------------------------------------------------
def available_methods(scoring: str) -> list[str]:
    return ["probe", "cosine"] if scoring == "bi_encoder" else ["probe", "head"]


def calibrate(bundle: str | os.PathLike | Bundle, data: str | list = "builtin", top_k: int = 10, method: str = "auto",
              safety: float | None = None, max_layers: int = DEFAULT_MAX_LAYERS, n_queries: int = DEFAULT_QUERIES,
              n_candidates: int = 48, seed: int = 0, write: bool = True, memory_budget=None,
              progress: Callable[[int, int], None] | None = None, keep_traces: bool = False, rule: str = "auto") -> dict:
    """Calibrate ``bundle`` and (with ``write``) store schedule + probes in it. Returns a report dict.

    ``rule``: ``margin`` (score margins), ``rank`` (keep fractions) or ``auto`` (the one whose validated
    schedule saves more simulated layer-work). ``safety``: None = the rule's default."""
    from edge_sel.runtime.reranker import Reranker

    t0 = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    if b.task != "rerank":
        raise InputError(f"{b.root} is a {b.task!r} bundle; early ranking is calibrated on rerank bundles")
    if not isinstance(top_k, (int, np.integer)) or top_k <= 0:
        raise InputError(f"top_k must be a positive integer, got {top_k!r}")
    if rule != "auto" and rule not in RULES:
        raise InputError(f"rule {rule!r} is not known (choose from auto, {', '.join(RULES)})")
    if isinstance(data, str):
        label = data
        pairs = builtin_data(n_queries, n_candidates, seed) if data == "builtin" else load_data(data)
    else:
        label, pairs = "python", list(data)
    if len(pairs) < 2:
        raise InputError(f"calibration needs at least 2 queries (got {len(pairs)})")
    for i, (q, docs) in enumerate(pairs):
        if len(docs) <= top_k:
            raise InputError(f"calibration query {i} has {len(docs)} candidates, but top-{top_k} needs more than {top_k} "
                             f"to calibrate pruning (use more documents per query or a smaller --top-k)")
    methods = available_methods(b.scoring)
    if method != "auto" and method not in methods:
        raise InputError(f"method {method!r} is not available for a {b.scoring} bundle (choose from auto, {', '.join(methods)})")

    rr = Reranker(b, memory_budget=memory_budget, pruning="off")
    try:
        traces = collect_traces(rr, pairs, progress)
        all_scores = method_scores(rr, traces, methods)
    finally:
        rr.close()
    source = {"data": label, "queries": len(pairs), "candidates": int(np.median([len(d) for _, d in pairs])), "seed": seed}
    report = decide_schedule(b, traces, all_scores, int(top_k), method=method, rule=rule, safety=safety,
                             max_layers=max_layers, source=source, write=write, started=t0)
    if keep_traces:
        report["traces"], report["method_scores"] = traces, all_scores
    return report


def decide_schedule(b: Bundle, traces: list[Trace], all_scores: dict[str, list[np.ndarray]], k: int, method: str = "auto",
                    rule: str = "auto", safety: float | None = None, max_layers: int = DEFAULT_MAX_LAYERS,
                    source: dict | None = None, write: bool = True, started: float | None = None) -> dict:
    """Choose (method, rule) and the schedule from recorded calibration trajectories; store it with ``write``."""
    t0 = started if started is not None else time.perf_counter()
    methods = [m for m in all_scores if method in ("auto", m)]
    rules = list(RULES) if rule == "auto" else [rule]
    table = {m: agreement_table(all_scores[m], traces, k) for m in methods}
    results = {}
    for m in methods:
        for ru in rules:
            layers, params, info = validated_schedule(all_scores[m], traces, k, safety, max_layers, rule=ru)
            results[(m, ru)] = {"layers": layers, "params": params, **info}
    chosen_m, chosen_r = max(results, key=lambda key: (results[key]["simulated"]["layer_work_saved"], key[0] == "probe", key[1] == "margin"))
    probes, probe_info = fit_probes(b.scoring, traces) if chosen_m == "probe" else (None, None)
    r = results[(chosen_m, chosen_r)]
    sched = Schedule(method=chosen_m, top_k=k, layers=r["layers"],
                     margins=[0.0] * len(r["layers"]) if chosen_r == "rank" else r["params"],
                     rule=chosen_r, keep=r["params"] if chosen_r == "rank" else None, floor=None,
                     cluster_gap=DEFAULT_CLUSTER_GAP, safety=r.get("safety_used", safety or DEFAULT_SAFETY),
                     probe=PROBE_ARRAY if chosen_m == "probe" else None,
                     source_layers=[int(b.layers[l].get("source_index", l)) for l in r["layers"]],
                     info={"calibration": {**(source or {}), "seconds": None},
                           "agreement": r["simulated"],
                           "per_layer": [{"layer": row["layer"], "spearman": round(row["spearman"], 4),
                                          "topk_overlap": round(row["topk_overlap"], 4)} for row in table[chosen_m]]})
    sched.info["calibration"]["seconds"] = round(time.perf_counter() - t0, 1)
    report = {"bundle": str(b.root), "method": chosen_m, "rule": chosen_r, "top_k": k, "schedule": sched.to_manifest(), "table": table,
              "candidates": {f"{m}/{ru}": {"layers": v["layers"], "params": v["params"], "simulated": v["simulated"],
                                           "safety_used": v.get("safety_used")} for (m, ru), v in results.items()},
              "influence": np.mean([t.influence for t in traces], 0).tolist()}
    if probe_info is not None:
        report["probe_cv"] = [round(i["cv_spearman"], 4) for i in probe_info]
    if write:
        if not r["layers"]:
            log.warning("calibration found no layer where pruning keeps every calibration top-%d under split-half validation; "
                        "storing an empty schedule", k)
        write_schedule(b, sched, probes)
    return report


def write_schedule(bundle: Bundle, schedule: Schedule | None, probes: np.ndarray | None) -> None:
    """Store ``schedule`` (and its probe array) in the bundle: new files first, then the manifest via os.replace."""
    root = bundle.root
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    arrays = manifest.setdefault("arrays", {})
    old = arrays.pop(PROBE_ARRAY, None)
    if probes is not None:
        rel = f"calibration/probe-{uuid.uuid4().hex[:8]}.bin"
        full = root / rel
        full.parent.mkdir(parents=True, exist_ok=True)
        arr = np.ascontiguousarray(probes, dtype="<f4")
        tmp = full.with_suffix(".tmp")
        arr.tofile(tmp)
        os.replace(tmp, full)
        arrays[PROBE_ARRAY] = {"file": rel, "dtype": "float32", "shape": list(arr.shape)}
        manifest["files"][rel] = {"size": full.stat().st_size, "sha256": sha256_file(full)}
    if old is not None:
        manifest["files"].pop(old["file"], None)
    manifest["schedule"] = schedule.to_manifest() if schedule is not None else None
    tmp_manifest = root / (MANIFEST + f".tmp-{os.getpid()}")
    tmp_manifest.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp_manifest, root / MANIFEST)
    if old is not None and old["file"] != arrays.get(PROBE_ARRAY, {}).get("file"):
        try:
            (root / old["file"]).unlink()
        except (FileNotFoundError, OSError):
            pass
    bundle.manifest = manifest
    Bundle.open(root)  # structural self-check
