"""A budgeted call's RSS growth in a fresh and in a fragmented process, with the heap guard on and off.

    python -m benchmarks.heap_guard BUNDLE --budget 53MiB [--n-docs 128] [--queries 3] [--calls 2] [--out f.json]

Each cell runs in its own process (``EDGE_SEL_HEAP_GUARD`` = 0 turns the guard off). "Fragmented" frees every other
one of ``--blocks`` malloc'd blocks of 0.2-200 KB and trims the heap before the timed calls, as a long-lived host
process leaves it. Reports per cell: median latency per call, the largest share (peak RSS - RSS at call start) and the
guard's trims (``edge_sel.runtime.memory.HeapGuard``; RESULTS.md "memory").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from . import child_env, module_cmd


def _worker(args) -> dict:
    import numpy as np

    from .workload import build_queries
    from edge_sel.runtime.memory import trim_heap
    from edge_sel.runtime import Reranker

    rr = Reranker(args.bundle, memory_budget=args.budget, pruning="off")
    queries = build_queries(rr.encoder.tok, args.queries, args.n_docs)
    rr.rank(queries[0].text, queries[0].docs)  # warm-up: sessions, tokenizer, allocator state
    kept = None
    if args.fragmented:
        blocks = [np.empty(int(s), np.uint8) for s in np.random.default_rng(0).integers(200, 200_000, args.blocks)]
        kept = blocks[::2]
        del blocks
        trim_heap()
    lat, share, trims = [], [], []
    for _ in range(args.calls):
        for q in queries:
            t = time.perf_counter()
            rr.rank(q.text, q.docs)
            lat.append(time.perf_counter() - t)
            st = rr.last_stats
            share.append(st["peak_rss_bytes"] - st["start_rss_bytes"])
            trims.append(st["heap_trims"])
    del kept
    return {"median_s": float(np.median(lat)), "max_share_bytes": int(max(share)), "trims": trims,
            "budget_bytes": int(rr.memory_budget)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--budget", required=True)
    ap.add_argument("--n-docs", type=int, default=128)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2, help="timed passes over the queries")
    ap.add_argument("--blocks", type=int, default=3000)
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fragmented", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    cells = []
    for fragmented in (False, True):
        for guard in ("0", "0.75"):
            cmd = module_cmd("heap_guard", args.bundle, "--budget", args.budget, "--n-docs", str(args.n_docs),
                             "--queries", str(args.queries), "--calls", str(args.calls), "--blocks", str(args.blocks),
                             "--worker") + (["--fragmented"] if fragmented else [])
            out = subprocess.run(cmd, env={**child_env(), "EDGE_SEL_HEAP_GUARD": guard}, capture_output=True, text=True)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                return out.returncode
            cell = {"fragmented": fragmented, "guard": guard, **json.loads(out.stdout.strip().splitlines()[-1])}
            cells.append(cell)
            print(f"{'fragmented' if fragmented else 'fresh':10s} guard {'off' if guard == '0' else guard:4s}  "
                  f"{cell['median_s']:.2f} s/call  share {cell['max_share_bytes'] / 2**20:.1f} MiB "
                  f"(budget {cell['budget_bytes'] / 2**20:.1f})  trims {cell['trims']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bundle": args.bundle, "budget": args.budget, "n_docs": args.n_docs, "queries": args.queries,
                       "calls": args.calls, "blocks": args.blocks, "cells": cells}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
