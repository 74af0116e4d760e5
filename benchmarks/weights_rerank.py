"""Reranking per weight format under a memory budget: each bundle's top-K against the first bundle's (the fp32
reference) and its latency, the bundles interleaved query by query in one process.

    python -m benchmarks.weights_rerank FP32_BUNDLE@192MB INT4_BUNDLE@128MB --n-docs 128 --queries 8

Per query and bundle: ``Reranker(bundle, memory_budget=B, pruning="off").predict(query, docs)`` on the docstring
corpus of :mod:`benchmarks.workload` (a query's own passage among other functions' docstrings, each cut to 130
tokens); the top-K sets are
compared. Prints one JSON line per bundle: mean top-K overlap with the reference, identical top-K sets, median latency,
the median of the per-query latency ratios against the reference, and the layer window the budget gave.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", help="BUNDLE@BUDGET; the first is the reference")
    p.add_argument("--n-docs", type=int, default=128)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--top-k", type=int, default=10)
    args = p.parse_args(argv)
    from edge_sel.runtime.rerank.reranker import Reranker

    from .workload import build_queries

    specs = [b.rsplit("@", 1) for b in args.bundles]
    rerankers = [Reranker(path, memory_budget=budget, pruning="off") for path, budget in specs]
    queries = build_queries(_tokenizer(specs[0][0]), args.queries, args.n_docs, corpus="docstrings")
    k = min(args.top_k, args.n_docs)  # a top-k wider than the candidates is all of them
    tops: list[list[set]] = [[] for _ in specs]
    secs: list[list[float]] = [[] for _ in specs]
    windows: list = [None] * len(specs)
    for qi, q in enumerate(queries):
        order = range(len(specs)) if qi % 2 == 0 else reversed(range(len(specs)))
        for i in order:
            t = time.perf_counter()
            s = rerankers[i].predict(q.text, q.docs)
            secs[i].append(time.perf_counter() - t)
            tops[i].append(set(np.argsort(-np.asarray(s), kind="stable")[:k].tolist()))
            windows[i] = rerankers[i].last_stats.get("window_layers", windows[i])
    for i, (path, budget) in enumerate(specs):
        overlap = [len(a & b) / k for a, b in zip(tops[i], tops[0])]
        ratios = [a / b for a, b in zip(secs[i], secs[0])]
        print(json.dumps({"bundle": path, "budget": budget, "queries": len(queries), "n_docs": args.n_docs,
                          "overlap": round(float(np.mean(overlap)), 3), "identical": sum(o == 1.0 for o in overlap),
                          "median_s": round(statistics.median(secs[i]), 2),
                          "vs_reference_median_of_ratios": round(statistics.median(ratios), 3),
                          "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)], "window_layers": windows[i]}),
              flush=True)
    return 0


def _tokenizer(path: str):
    from edge_sel.bench import bundle_tokenizer
    from edge_sel.runtime.bundle import Bundle

    return bundle_tokenizer(Bundle.open(path))


if __name__ == "__main__":
    from edge_sel.runtime.sessions import own_process

    own_process()
    raise SystemExit(main())
