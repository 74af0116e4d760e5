"""``python -m benchmarks.cross_domain``: is an early-ranking schedule calibrated on one text source safe on others?

Calibrate on one domain (``builtin``: CPython docstrings of the calibration modules), then on domains calibration
never saw (``botchan``: fiction, ``wordnet``: dictionary glosses; ``docstrings``: the benchmark's docstrings) report
per rule how often the pruned top-K set is identical to the full model's (``--pruning off``), the mean top-K overlap
and the layer-work saved; and the latency of the stored rule against the bare whole-model onnxruntime session in
the same run. Domains: :mod:`edge_sel.export.domains`.

Every query runs once through the full bundle with every layer's pooled state recorded (cached in ``--cache``):
pruning drops candidates but never changes a survivor's computation, so each rule's decisions are replayed
exactly on the recorded states (:func:`edge_sel.export.passes.schedule_search.simulate`), and a query set of N
candidates also yields the one of its first N' < N. The latency columns are real calls.

    python -m benchmarks.cross_domain record BUNDLE --domains botchan,wordnet --queries 20 --candidates 64
    python -m benchmarks.cross_domain evaluate BUNDLE --domains botchan,wordnet --queries 20 --candidates 64 --out r.json
    python -m benchmarks.cross_domain latency BUNDLE --domains botchan,wordnet --queries 3 --candidates 64,128
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_CACHE = Path(os.environ.get("EDGE_SEL_TRACE_CACHE", Path.home() / ".cache" / "edge_sel-traces"))


def _bundle_key(bundle: Path) -> str:
    """Identity of the bundle's layers (not of its schedule): recorded states stay valid across calibrations."""
    from edge_sel.runtime.bundle import Bundle

    b = Bundle.open(bundle)
    files = [l.file for l in b.spec.layers] + [b.spec.head.file]
    return hashlib.sha256(json.dumps([b.root.name, files, b.scoring]).encode()).hexdigest()[:12]


def trace_path(cache: Path, bundle: Path, domain: str, n: int, qi: int, seed: int) -> Path:
    return cache / _bundle_key(bundle) / f"{domain}-n{n}-s{seed}" / f"q{qi:03d}.npz"


def record(bundle: Path, domain: str, n_queries: int, n_candidates: int, seed: int, cache: Path, log=print) -> list[Path]:
    """Run ``n_queries`` of ``domain`` through the full bundle, recording every layer's pooled states (cached)."""
    from edge_sel.export.domains import domain_queries
    from edge_sel.export.passes.traces import TraceRecorder
    from edge_sel.runtime import Reranker

    data = domain_queries(domain, n_queries, n_candidates, seed)
    paths = [trace_path(cache, bundle, domain, n_candidates, qi, seed) for qi in range(len(data))]
    todo = [qi for qi, p in enumerate(paths) if not p.is_file()]
    if not todo:
        return paths
    rr = Reranker(bundle, pruning="off")
    L = len(rr.bundle.spec.layers)
    try:
        for qi in todo:
            query, docs = data[qi]
            rec = TraceRecorder(L, len(docs))
            t = time.perf_counter()
            c = time.process_time()
            final = rr.trace(query, docs, rec)
            tr = rec.trace(final, rr.scoring.query_item)
            paths[qi].parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[qi].with_suffix(".tmp.npz")
            np.savez(tmp, final=tr.final, pooled=tr.pooled, influence=tr.influence,
                     query_pooled=tr.query_pooled if tr.query_pooled is not None else np.zeros(0),
                     seconds=time.perf_counter() - t, cpu_seconds=time.process_time() - c,
                     tokens=int(sum(len(x) for x in rr.scoring.items(rr.encoder.encode(query, docs))[0])))
            os.replace(tmp, paths[qi])
            log(f"[{domain} n={n_candidates}] query {qi + 1}/{len(data)}: {time.perf_counter() - t:.1f} s", )
    finally:
        rr.close()
    return paths


def load_traces(paths: list[Path], n: int | None = None):
    """Recorded traces (the first ``n`` candidates of each, when given)."""
    from edge_sel.export.passes.traces import Trace

    out = []
    for p in paths:
        z = np.load(p)
        sl = slice(None) if n is None else slice(0, n)
        qp = z["query_pooled"]
        out.append(Trace(z["final"][sl], z["pooled"][:, sl], qp if qp.size else None, z["influence"],
                         extra={"seconds": float(z["seconds"]), "cpu_seconds": float(z["cpu_seconds"]), "tokens": int(z["tokens"])}))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cross_domain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["record"])
    ap.add_argument("bundle")
    ap.add_argument("--domains", default="botchan,wordnet")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--candidates", default="64")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    args = ap.parse_args(argv)
    bundle = Path(args.bundle).resolve()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.command == "record":
        for d in args.domains.split(","):
            for n in [int(x) for x in args.candidates.split(",")]:
                record(bundle, d, args.queries, n, args.seed, Path(args.cache), log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
