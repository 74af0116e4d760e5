"""The Node package (bindings/node) against the Python runtime on the benchmark queries, side by side in one run.

Each side runs in its own process (so RSS is its own): the same bundle, queries, candidates, top-K and memory budget;
a warm-up call (the first query: the process's first call, which loads the sessions), then ``--runs`` timed passes
over the queries, the two sides alternating for ``--rounds`` rounds. Reported: top-K identical per query, max |score
difference| over the returned results, median latency per query of each side and their ratio, the largest peak RSS
growth of any call (the warm-up included; the kernel's high-water mark over the call minus RSS at its start) of
each side against the budget.

    python -m benchmarks.node_binding BUNDLE [--n-docs 128] [--queries 5] [--top-k 10] [--memory-budget 128MB]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODE_PACKAGE = Path(__file__).resolve().parent.parent / "bindings" / "node"

NODE_DRIVER = r"""
const fs = require("node:fs");
const { Reranker } = require(process.argv[2]);
(async () => {
  const w = JSON.parse(fs.readFileSync(process.argv[3], "utf8"));
  const rr = await Reranker.open(w.bundle, { memoryBudget: w.budget, pruning: w.pruning });
  const base = process.memoryUsage.rss();
  const times = [], results = [], growth = [];
  const rank = async (q) => {
    const res = await rr.rank(q.query, q.documents, { topK: w.top_k });
    growth.push(rr.lastStats.peakRssBytes - rr.lastStats.startRssBytes);
    return res;
  };
  await rank(w.queries[0]);  // warm-up: the first call in the process (loads the sessions)
  for (let run = 0; run < w.runs; run++) {
    let t = 0;
    for (const q of w.queries) {
      const t0 = performance.now();
      const res = await rank(q);
      t += performance.now() - t0;
      if (run === 0) results.push(res.map((r) => [r.corpusId, r.score]));
    }
    times.push(t / w.queries.length / 1e3);
  }
  const s = rr.lastStats;
  console.log(JSON.stringify({ results, times, peak_growth: Math.max(...growth), growth, base_rss: base, window: s.windowLayers,
    chunk_tokens: s.chunkTokens, live_per_layer: s.livePerLayer, pruning: s.pruning, collections: s.collections, collect_s: s.collectS }));
})().catch((e) => { console.error(e.message); process.exit(1); });
"""


def python_side(w: dict) -> dict:
    from edge_sel.runtime.rerank import Reranker

    rr = Reranker(w["bundle"], memory_budget=w["budget"], pruning=w["pruning"])
    times, results, growth = [], [], []

    def rank(q):
        res = rr.rank(q["query"], q["documents"], top_k=w["top_k"])
        growth.append(rr.last_stats["peak_rss_bytes"] - rr.last_stats["start_rss_bytes"])
        return res

    rank(w["queries"][0])  # warm-up: the first call in the process (loads the sessions)
    for run in range(w["runs"]):
        t = 0.0
        for q in w["queries"]:
            t0 = time.perf_counter()
            res = rank(q)
            t += time.perf_counter() - t0
            if run == 0:
                results.append([[r["corpus_id"], r["score"]] for r in res])
        times.append(t / len(w["queries"]))
    st = rr.last_stats
    return {"results": results, "times": times, "peak_growth": max(growth), "growth": growth, "window": st["window_layers"],
            "chunk_tokens": st["chunk_tokens"], "live_per_layer": st["live_per_layer"], "pruning": st["pruning"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--n-docs", type=int, default=128)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--runs", type=int, default=1, help="timed passes per process (after a warm-up call)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations python, node (a shared machine's load drifts)")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--pruning", default="auto", choices=["auto", "off"])
    ap.add_argument("--corpus", default="mixed", choices=["mixed", "docstrings"])
    ap.add_argument("--side", choices=["python"], help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args(argv)
    if args.side == "python":
        print(json.dumps(python_side(json.loads(Path(args.workload).read_text(encoding="utf-8")))))
        return 0

    from edge_sel.runtime.rerank import Reranker
    from edge_sel.runtime.units import parse_size

    from .workload import build_queries

    rr = Reranker(args.bundle, pruning="off")
    queries = build_queries(rr.encoder.tok, args.queries, args.n_docs, corpus=args.corpus)
    del rr
    w = {"bundle": str(Path(args.bundle).resolve()), "budget": parse_size(args.memory_budget) if args.memory_budget else None,
         "pruning": args.pruning, "top_k": args.top_k, "runs": args.runs,
         "queries": [{"query": q.text, "documents": list(q.docs)} for q in queries]}
    with tempfile.TemporaryDirectory() as tmp:
        wf = Path(tmp) / "workload.json"
        wf.write_text(json.dumps(w), encoding="utf-8")
        driver = Path(tmp) / "driver.js"
        driver.write_text(NODE_DRIVER, encoding="utf-8")
        sides = {"python": [sys.executable, "-m", "benchmarks.node_binding", args.bundle, "--side", "python", "--workload", str(wf)],
                 "node": ["node", str(driver), str(NODE_PACKAGE), str(wf)]}
        got: dict[str, list[dict]] = {"python": [], "node": []}
        for _ in range(args.rounds):
            for side, cmd in sides.items():
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    print(f"{side}: {out.stderr[-3000:]}", file=sys.stderr)
                    return 1
                got[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    p, n = got["python"][0], got["node"][0]
    p["times"] = [t for r in got["python"] for t in r["times"]]
    n["times"] = [t for r in got["node"] for t in r["times"]]
    p["peak_growth"] = max(r["peak_growth"] for r in got["python"])
    n["peak_growth"] = max(r["peak_growth"] for r in got["node"])
    identical = [[a[0] for a in rp] == [b[0] for b in rn] for rp, rn in zip(p["results"], n["results"])]
    diff = max(abs(a[1] - b[1]) for rp, rn in zip(p["results"], n["results"]) for a, b in zip(rp, rn))
    lp, ln = statistics.median(p["times"]), statistics.median(n["times"])
    report = {"bundle": w["bundle"], "n_docs": args.n_docs, "queries": len(w["queries"]), "top_k": args.top_k,
              "memory_budget": w["budget"], "pruning": {"python": p["pruning"], "node": n["pruning"]},
              "topk_identical": f"{sum(identical)}/{len(identical)}", "max_abs_score_diff": diff,
              "latency_s": {"python": round(lp, 4), "node": round(ln, 4), "node_over_python": round(ln / lp, 3),
                            "per_round_ratio": [round(b / a, 3) for a, b in zip(p["times"], n["times"])]},
              "peak_rss_growth_bytes": {"python": p["peak_growth"], "node": n["peak_growth"]},
              "peak_rss_growth_mib": {"python": round(p["peak_growth"] / 2**20, 1), "node": round(n["peak_growth"] / 2**20, 1),
                                      "budget": round(w["budget"] / 2**20, 1) if w["budget"] else None},
              "within_budget": None if not w["budget"] else {"python": p["peak_growth"] <= w["budget"],
                                                              "node": n["peak_growth"] <= w["budget"]},
              "node_collections_per_call": n.get("collections"), "node_collect_s_per_call": n.get("collect_s"),
              "window": {"python": p["window"], "node": n["window"]}, "chunk_tokens": {"python": p["chunk_tokens"], "node": n["chunk_tokens"]},
              "live_per_layer": {"python": p["live_per_layer"], "node": n["live_per_layer"]}}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
