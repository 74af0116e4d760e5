"""How to score an intermediate layer, measured per model; plus calibrated schedules on held-out queries.

    python -m benchmarks.early_rank_study BUNDLE [--cal-queries 32] [--held-out 16] [--candidates 48] [--out f.json]

Calibration: ``edge_sel.export.passes.calibrate.builtin_data`` (docstrings of CALIBRATION_MODULES, disjoint from
the benchmark pool). Held-out: queries/passages from ``edge_sel.export.textdata.docstring_pairs()`` (the benchmark
pool, never seen by calibration): each query's own passage + random other passages. The bundle is copied
first (calibration writes into it).

Reported per method and layer on the held-out queries: mean Spearman with the final score and top-K overlap
(probes fitted on the calibration queries only); then each method's calibrated schedule simulated on the
held-out trajectories, and the real runtime (``Reranker(pruning="auto").rank``) on the chosen schedule.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def held_out_data(n_queries: int, n_candidates: int, seed: int = 1) -> list[tuple[str, list[str]]]:
    from edge_sel.export.passes.calibrate import sample_queries
    from edge_sel.export.textdata import docstring_pairs

    return sample_queries(docstring_pairs(), n_queries, n_candidates, seed)


def render(paths: list[str]) -> str:
    """Markdown tables from study JSON files."""
    lines = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        k = d["top_k"]
        lines += [f"### {d['bundle']} ({d['scoring']})", "",
                  f"calibration: {d['cal_queries']} builtin queries x {d['candidates']} candidates "
                  f"({d['calibration_seconds']:.0f} s); held-out: {d['held_out']} docstring queries x {d['candidates']}; K={k}", "",
                  "Per layer on held-out queries — Spearman with the final score / top-K overlap:", ""]
        methods = list(d["table_held_out"])
        lines.append("| layer | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        L = len(d["table_held_out"][methods[0]])
        for l in range(L):
            cells = [f"{d['table_held_out'][m][l]['spearman']:.2f} / {d['table_held_out'][m][l]['topk_overlap']:.2f}" for m in methods]
            lines.append(f"| {l} | " + " | ".join(cells) + " |")
        lines += ["", "Calibrated schedules (margins = 1.5 x worst calibration gap), simulated:", "",
                  "| method | layers | calib. top-K kept | calib. work saved | held-out top-K kept | held-out same top-K | held-out work saved |",
                  "|---|---|---|---|---|---|---|"]
        for m, sc in d["schedules"].items():
            c, h = sc["calibration"], sc["held_out"]
            lines.append(f"| {m} | {sc['layers']} | {c['topk_recall']:.3f} | {100 * c['layer_work_saved']:.0f}% | "
                         f"{h['topk_recall']:.3f} | {100 * h['topk_identical']:.0f}% | {100 * h['layer_work_saved']:.0f}% |")
        r = d["runtime_held_out"]
        lines += ["", f"Runtime (`Reranker(pruning='auto').rank`, chosen method **{d['chosen']}**, held-out): same top-{k} set "
                  f"{100 * r['topk_identical']:.0f}%, overlap {r['overlap']:.3f}, layer-work saved {100 * r['layer_work_saved']:.0f}% "
                  f"(token-work {100 * r['token_work_saved']:.0f}%), median latency {r['median_latency_pruned_s']:.2f} s vs "
                  f"{r['median_latency_full_s']:.2f} s unpruned.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    if argv and argv[0] == "--report":
        print(render(argv[1:]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--cal-queries", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--safety", type=float, default=1.5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from edge_sel.runtime import Reranker
    from edge_sel.export.passes.calibrate import calibrate
    from edge_sel.export.passes.schedule_search import simulate
    from edge_sel.export.passes.traces import agreement_table, collect_traces, features, final_query_cosine, head_scores
    from edge_sel.runtime.rerank.scoring import apply_probe

    work = Path(tempfile.mkdtemp(prefix="er-study-"))
    bundle = work / "b"
    shutil.copytree(args.bundle, bundle)
    k = args.top_k
    t0 = time.perf_counter()
    rep = calibrate(bundle, "builtin", top_k=k, n_queries=args.cal_queries, n_candidates=args.candidates,
                    safety=args.safety, write=True, keep_traces=True)
    t_cal = time.perf_counter() - t0
    print(f"calibrated in {t_cal:.0f} s: method {rep['method']} layers {rep['schedule']['layers']}", flush=True)

    # held-out trajectories through the full model
    data = held_out_data(args.held_out, args.candidates)
    rr = Reranker(bundle, pruning="off")
    traces = collect_traces(rr, data)
    L = len(rr.bundle.layers)
    scoring = rr.scoring
    # probes fitted on calibration only: refit them here the same way (all calibration traces) from the bundle
    W = np.array(rr.bundle.array("early_probe")) if rr.bundle.has_array("early_probe") else None
    if W is None:  # chosen method was not the probe: fit probes on calibration for the comparison
        from edge_sel.export.passes.calibrate import builtin_data
        from edge_sel.export.passes.traces import fit_probes
        cal_rr = Reranker(bundle, pruning="off")
        W, _ = fit_probes(scoring, collect_traces(cal_rr, builtin_data(args.cal_queries, args.candidates, 0)))
        cal_rr.close()
    held = {"probe": [np.stack([apply_probe(W[l], features(scoring, t, l)) for l in range(L)]) for t in traces]}
    if scoring.query_item:
        held["cosine"] = [np.stack([head_scores(scoring, t, l) for l in range(L)]) for t in traces]
        held["final_query_cosine"] = [np.stack([final_query_cosine(t, l) for l in range(L)]) for t in traces]
    else:
        held["head"] = [np.stack([head_scores(scoring, t, l) for l in range(L)]) for t in traces]
    rr.close()
    table = {m: agreement_table(s, traces, k) for m, s in held.items()}
    sims = {}
    for key, c in rep["candidates"].items():
        m, rule = key.split("/")
        sims[key] = {"calibration": c["simulated"], "layers": c["layers"], "params": c["params"],
                     "held_out": simulate(held[m], traces, k, c["layers"], c["params"], rule=rule)}

    # the real runtime on the stored schedule
    pr = Reranker(bundle, pruning="auto")
    full = Reranker(bundle, pruning="off")
    ident, overlap, saved, tok_saved, lat_p, lat_f = [], [], [], [], [], []
    for (q, docs), t in zip(data, traces):
        t1 = time.perf_counter()
        res = pr.rank(q, docs, top_k=k)
        lat_p.append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        ref = full.rank(q, docs, top_k=k)
        lat_f.append(time.perf_counter() - t1)
        a, b = {r["corpus_id"] for r in res}, {r["corpus_id"] for r in ref}
        ident.append(a == b)
        overlap.append(len(a & b) / k)
        saved.append(pr.last_stats["layer_work_saved"])
        tok_saved.append(pr.last_stats["token_work_saved"])
    runtime = {"topk_identical": float(np.mean(ident)), "overlap": float(np.mean(overlap)),
               "layer_work_saved": float(np.mean(saved)), "token_work_saved": float(np.mean(tok_saved)),
               "median_latency_pruned_s": float(np.median(lat_p)), "median_latency_full_s": float(np.median(lat_f)),
               "live_per_layer_last": pr.last_stats["live_per_layer"]}
    pr.close()
    full.close()
    out = {"bundle": args.bundle, "scoring": scoring.name, "top_k": k, "calibration_seconds": t_cal,
           "cal_queries": args.cal_queries, "held_out": args.held_out, "candidates": args.candidates,
           "chosen": rep["method"], "schedule": rep["schedule"], "table_held_out": table,
           "table_calibration": rep["table"], "schedules": sims, "runtime_held_out": runtime,
           "influence": rep["influence"], "probe_cv": rep.get("probe_cv")}
    print(json.dumps({"chosen": rep["method"], "schedules": sims, "runtime_held_out": runtime}, indent=1))
    for m, rows in table.items():
        print(m, " ".join(f"{r['layer']}:{r['spearman']:.2f}/{r['topk_overlap']:.2f}" for r in rows))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        # raw trajectories for offline analysis: final scores and every method's early scores [L, N] per query
        arrays = {}
        for split_name, tr, sc in (("cal", rep["traces"], rep["method_scores"]), ("held", traces, held)):
            for qi, t in enumerate(tr):
                arrays[f"{split_name}_final_{qi}"] = t.final
                for m, mats in sc.items():
                    arrays[f"{split_name}_{m}_{qi}"] = mats[qi]
        np.savez_compressed(Path(args.out).with_suffix(".npz"), **arrays)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
