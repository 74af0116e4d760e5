"""How much layer-work can candidate pruning save *at best* on a bundle? (what bounds the encoders' latency)

    python -m benchmarks.pruning_bound BUNDLE [--queries 10] [--n-docs 128] [--top-k 10] [--out f.json]

Progressive pruning (GRATING) keeps, at a pruning layer, the best-scored live candidates by an early scorer.
Whatever rule sets the cut (score margin or rank), it keeps a *prefix* of that layer's early ranking, and the
final top-K is only safe if the prefix reaches the deepest final top-K member. This script measures that depth
on the benchmark's own queries (``python -m benchmarks.rerank``'s workload: same queries, same N) and the layer-work
an **oracle** would do if it knew, per query, exactly how deep to cut — a lower bound for every prefix rule on
that scorer, calibrated or not:

* ``one layer``: the best single pruning layer ``l`` per query: work = ``(l+1)/L + (L-l-1)/L * depth_l``;
* ``every layer``: pruning after every layer, each cut at that layer's exact depth among the live candidates
  (live sets are intersections of prefixes);
* ``--cascade CHEAP_BUNDLE`` (e.g. ``edge-sel quantize`` output): a two-stage cascade that scores every
  candidate with the cheap bundle and re-scores the best of them with the full one; its cost is
  ``t_cheap / t_full + depth / N`` (both timed here, same process, median over queries);
* ``hindsight``: one schedule for all queries (``calibrate``'s greedy choice, safety 1, up to five layers; rank
  rule, and margin rule without clusters) fitted *on these very queries* — what calibration could reach had it
  seen the benchmark;
* ``calibrated``: what ``calibrate`` itself stores from the builtin calibration queries (split-half validated,
  default safety, per rule), simulated on the benchmark queries: work and whether every top-K survived.

Scorers: the per-layer ridge probe (fitted on ``builtin`` calibration data only, never on these queries), the
bundle's head on intermediate states (cross-encoders, yes/no) or same-layer cosine (bi-encoders), and for
bi-encoders the document at layer l against the query's final embedding. A latency ratio cannot go below the
layer-work fraction (tokenisation, embedding and the head are extra), so if the oracle's work is above a
target, no pruning schedule on that scorer can meet it while keeping the top-K.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def prefix_depths(early: np.ndarray, final: np.ndarray, k: int, live: np.ndarray) -> int:
    """How many of the ``live`` candidates the early ranking must keep to contain every final top-K member."""
    top = set(np.argsort(-final, kind="stable")[:k].tolist())
    order = live[np.argsort(-early[live], kind="stable")]
    need = [i for i, c in enumerate(order) if int(c) in top]
    return (max(need) + 1) if need else k


def oracle_work(early: np.ndarray, final: np.ndarray, k: int) -> dict:
    """``early``: [L, N] early scores of one query; returns the oracle layer-work fractions."""
    L, N = early.shape
    all_ = np.arange(N)
    depth = np.array([prefix_depths(early[l], final, k, all_) / N for l in range(L)])
    one = [((l + 1) + (L - l - 1) * depth[l]) / L for l in range(L - 1)]
    best = int(np.argmin(one))
    live, work = all_, 0
    for l in range(L):
        work += len(live)
        if l < L - 1:
            keep = prefix_depths(early[l], final, k, live)
            live = live[np.argsort(-early[l][live], kind="stable")[:keep]]
    return {"depth": depth.tolist(), "one_layer_work": float(one[best]), "one_layer_at": best,
            "every_layer_work": work / (N * L)}


def hindsight(early: list[np.ndarray], traces: list, k: int) -> dict:
    """The best schedule ``calibrate`` could choose had it been fitted on these queries: rank rule, and margin rule
    without clusters, safety 1, up to five layers."""
    from edge_sel.export.passes.schedule_search import choose_schedule, simulate

    out = {}
    for rule, gap in (("rank", None), ("margin", 0.0)):
        kw = {} if gap is None else {"cluster_gap": gap}
        layers, params, _ = choose_schedule(early, traces, k, safety=1.0, max_layers=5, min_gain=0.0, rule=rule, **kw)
        sim = simulate(early, traces, k, layers, params, rule=rule, **kw)
        out[f"hindsight_{rule}"] = {"layers": layers, "params": [float(f) for f in params],
                                    "work": 1.0 - sim["layer_work_saved"], "topk_identical": sim["topk_identical"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--n-docs", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--cal-queries", type=int, default=64)
    ap.add_argument("--cal-candidates", type=int, default=48)
    ap.add_argument("--cascade", metavar="CHEAP_BUNDLE", help="also measure a cascade from this cheaper bundle")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from edge_sel.runtime import Reranker
    from edge_sel.export.passes.calibrate import builtin_data
    from edge_sel.export.passes.schedule_search import simulate, validated_schedule
    from edge_sel.export.passes.traces import (collect_traces, crossfit_probe_scores, features, final_query_cosine, fit_probes,
                                               head_scores)
    from edge_sel.runtime.rerank.scoring import apply_probe

    from .workload import build_queries

    k = args.top_k
    rr = Reranker(args.bundle, pruning="off")
    scoring = rr.scoring
    L = len(rr.bundle.layers)
    t0 = time.perf_counter()
    cal = collect_traces(rr, builtin_data(args.cal_queries, args.cal_candidates, 0))
    W, _ = fit_probes(scoring, cal)
    t_cal = time.perf_counter() - t0
    queries = build_queries(rr.encoder.tok, args.queries, args.n_docs)
    t0 = time.perf_counter()
    traces = collect_traces(rr, [(q.text, q.docs) for q in queries],
                            progress=lambda i, n: print(f"  query {i}/{n}", flush=True))
    t_run = time.perf_counter() - t0
    early = {"probe": [np.stack([apply_probe(W[l], features(scoring, t, l)) for l in range(L)]) for t in traces]}
    other = "cosine" if scoring.query_item else "head"
    early[other] = [np.stack([head_scores(scoring, t, l) for l in range(L)]) for t in traces]
    if scoring.query_item:
        early["final_query_cosine"] = [np.stack([final_query_cosine(t, l) for l in range(L)]) for t in traces]
    cal_early = {"probe": crossfit_probe_scores(scoring, cal),
                 other: [np.stack([head_scores(scoring, t, l) for l in range(L)]) for t in cal]}
    if scoring.query_item:
        cal_early["final_query_cosine"] = [np.stack([final_query_cosine(t, l) for l in range(L)]) for t in cal]
    rr.close()

    per = {m: [oracle_work(e, t.final, k) for e, t in zip(mats, traces)] for m, mats in early.items()}
    summary = {}
    for m, rows in per.items():
        depth = np.array([r["depth"] for r in rows])
        summary[m] = {"depth_mean": depth.mean(0).tolist(), "depth_worst": depth.max(0).tolist(),
                      "one_layer_work_mean": float(np.mean([r["one_layer_work"] for r in rows])),
                      "every_layer_work_mean": float(np.mean([r["every_layer_work"] for r in rows])),
                      "every_layer_work_min": float(np.min([r["every_layer_work"] for r in rows]))}
        summary[m].update(hindsight(early[m], traces, k))
        for rule in ("rank", "margin"):
            layers, params, info = validated_schedule(cal_early[m], cal, k, rule=rule)
            sim = simulate(early[m], traces, k, layers, params, rule=rule)
            summary[m][f"calibrated_{rule}"] = {"layers": layers, "params": [float(p) for p in params],
                                                "safety": info.get("safety_used"), "work": 1.0 - sim["layer_work_saved"],
                                                "topk_identical": sim["topk_identical"]}
    out = {"bundle": args.bundle, "scoring": scoring.name, "layers": L, "top_k": k, "n_docs": args.n_docs,
           "queries": args.queries, "calibration_seconds": t_cal, "trace_seconds": t_run,
           "summary": summary, "per_query": per}
    print(f"{args.bundle} ({scoring.name}, {L} layers), N={args.n_docs}, K={k}, {args.queries} benchmark queries")
    print("| scorer | depth to hold the final top-K, per layer (mean / worst fraction of N) | oracle work, best single layer | oracle work, every layer (mean / best query) | hindsight work: rank / margin rule | calibrated work (top-K kept): rank / margin rule |")
    print("|---|---|---|---|---|---|")
    for m, s in summary.items():
        d = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(s["depth_mean"][:-1], s["depth_worst"][:-1]))
        print(f"| {m} | {d} | {s['one_layer_work_mean']:.2f} | {s['every_layer_work_mean']:.2f} / {s['every_layer_work_min']:.2f} | "
              f"{s['hindsight_rank']['work']:.2f} / {s['hindsight_margin']['work']:.2f} | "
              f"{s['calibrated_rank']['work']:.2f} ({s['calibrated_rank']['topk_identical']:.0%}) / "
              f"{s['calibrated_margin']['work']:.2f} ({s['calibrated_margin']['topk_identical']:.0%}) |")
    if args.cascade:
        full, cheap = Reranker(args.bundle, pruning="off"), Reranker(args.cascade, pruning="off")
        for r in (full, cheap):
            r.predict(queries[0].text, queries[0].docs[:16])  # warm-up
        rows = []
        for q in queries:
            t0 = time.perf_counter()
            f = full.predict(q.text, q.docs)
            t_full = time.perf_counter() - t0
            t0 = time.perf_counter()
            c = cheap.predict(q.text, q.docs)
            t_cheap = time.perf_counter() - t0
            depth = prefix_depths(c, f, k, np.arange(len(f)))
            same = set(np.argsort(-c, kind="stable")[:k].tolist()) == set(np.argsort(-f, kind="stable")[:k].tolist())
            rows.append({"t_full": t_full, "t_cheap": t_cheap, "depth": depth, "cheap_topk_identical": same})
        full.close()
        cheap.close()
        ratio = float(np.median([r["t_cheap"] / r["t_full"] for r in rows]))
        worst = max(r["depth"] for r in rows)
        out["cascade"] = {"bundle": args.cascade, "per_query": rows, "median_time_ratio": ratio, "depth_worst": worst,
                          "cheap_topk_identical": float(np.mean([r["cheap_topk_identical"] for r in rows])),
                          "work": ratio + worst / args.n_docs}
        print(f"cascade from {args.cascade}: cheap/full time {ratio:.2f} (median), top-{k} identical by the cheap bundle alone "
              f"{out['cascade']['cheap_topk_identical']:.0%}, deepest final top-{k} member at cheap rank {worst} of {args.n_docs} "
              f"→ cost ≥ {out['cascade']['work']:.2f}× the full model")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        np.savez_compressed(Path(args.out).with_suffix(".npz"), **{f"final_{i}": t.final for i, t in enumerate(traces)},
                            **{f"{m}_{i}": e for m, mats in early.items() for i, e in enumerate(mats)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
