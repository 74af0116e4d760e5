"""Fused graph vs the per-layer runtime vs the bare whole model: same top-K, latency, peak RSS — in one run.

    python -m benchmarks.fused BUNDLE [--schedule bundle|JSON] [-n 128] [-k 10] [--queries 4] [--work DIR] [--out R.json]

Three configurations, each in its own fresh process (so each peak RSS is its own), on the same benchmark queries
(``benchmarks.workload``: docstring passages and Botchan windows, N candidates each):

* ``runtime`` — the Python streaming runtime, every layer resident (no memory budget), pruning with the schedule;
* ``fused``   — the bundle's fused graph with the same schedule compiled in, one stock ``InferenceSession``;
* ``whole``   — the same composition without a schedule: the bare whole model in one session (no pruning);
* ``peer``    — with ``--peer-onnx``: optimum's whole-model export in a bare session, default options, length-sorted
  batches of 16 (``benchmarks.rerank_worker.OrtPeer``, configuration (b) of ``RESULTS.md``; full prompts, no prefix reuse).

Each scores every query once as a warm-up (its results are the ones compared), then ``--runs`` timed passes. Both
graph configurations use the runtime's session options (file-backed weights: prepacking off; CPU arena off) and
every configuration tokenizes with the bundle's own encoder inside the timed call. Reported per configuration:
median wall seconds per query, median CPU seconds per query (all threads; less distorted by a shared machine),
peak RSS (VmHWM of the process over load and all runs) and RSS after loading; for ``fused`` and ``whole``: top-K
identical to ``runtime``'s on how many queries, and the largest score difference on the top-K.

The fused graphs are written into a hard-linked copy of the bundle under ``--work`` (the bundle is not changed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("runtime", "fused", "whole", "peer")


def _prepare(bundle_path: Path, schedule_arg: str, work: Path) -> tuple[Path, dict | None]:
    """A hard-linked copy of the bundle holding ``fused-pruned.onnx`` and ``fused-whole.onnx``; the schedule used."""
    from edge_sel.export.fused_rerank import build_fused
    from edge_sel.runtime import Bundle
    from edge_sel.runtime.manifest import thaw
    from edge_sel.runtime.rerank.schedule import Schedule

    src = Bundle.open(bundle_path)
    if schedule_arg == "bundle":
        if src.spec.schedule is None or not src.spec.schedule.layers:
            raise SystemExit(f"{bundle_path} has no schedule that prunes; calibrate it or pass --schedule JSON")
        sched = thaw(src.spec.schedule)
    else:
        sched = json.loads(Path(schedule_arg).read_text() if Path(schedule_arg).is_file() else schedule_arg)
    copy = work / f"{src.root.name}-fused"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(src.root, copy, copy_function=os.link, ignore=shutil.ignore_patterns(".verified", "fused*.onnx"))
    b = Bundle.open(copy)
    for name, s in (("pruned", Schedule.from_manifest(sched)), ("whole", None)):
        t = time.perf_counter()
        model, _ = build_fused(b, s)
        (copy / f"fused-{name}.onnx").write_bytes(model.SerializeToString())
        print(f"built fused-{name}.onnx ({(copy / f'fused-{name}.onnx').stat().st_size / 1e3:.0f} KB) in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    return copy, sched


def _worker(config: str, spec_path: Path) -> dict:
    import numpy as np

    from edge_sel.runtime.memory import peak_rss_bytes, rss_bytes

    spec = json.loads(spec_path.read_text())
    peak = [peak_rss_bytes()]

    def snap():
        peak[0] = max(peak[0], peak_rss_bytes(), rss_bytes())

    from edge_sel.runtime import Bundle
    from edge_sel.runtime.rerank.text import TextEncoder

    base = rss_bytes()
    bundle = Bundle.open(spec["bundle"])
    k = spec["top_k"]
    t_load = time.perf_counter()
    if config == "runtime":
        from edge_sel import Reranker

        rr = Reranker(bundle, pruning=spec["schedule"])

        def call(q, docs):
            res = rr.rank(q, docs, top_k=k)
            return [r["corpus_id"] for r in res], [r["score"] for r in res], 0.0, len(docs) - rr.last_stats["n_pruned"]
    elif config == "peer":
        from .rerank_worker import OrtPeer

        s = bundle.spec
        peer = OrtPeer({"scoring": s.scoring, "pad_id": s.pad_id, "peer_onnx": spec["peer_onnx"], "batch_size": 16,
                        "yes_id": s.token_ids.yes if s.token_ids else None, "no_id": s.token_ids.no if s.token_ids else None})
        enc = TextEncoder(bundle)

        def call(q, docs):
            e = enc.encode(q, docs)
            scores = peer.score({"doc_ids": [list(map(int, x)) for x in e.doc_ids],
                                 "doc_types": None if e.doc_types is None else [list(map(int, x)) for x in e.doc_types],
                                 "query_ids": None if e.query_ids is None else list(map(int, e.query_ids))})
            top = [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
            return top, [float(scores[i]) for i in top], 0.0, len(docs)
    else:
        import onnxruntime as ort

        from edge_sel.export.fused_feeds import text_feeds
        from edge_sel.runtime.sessions import session_options

        sess = ort.InferenceSession(str(bundle.root / f"fused-{'pruned' if config == 'fused' else 'whole'}.onnx"),
                                    sess_options=session_options(), providers=["CPUExecutionProvider"])
        enc = TextEncoder(bundle)

        def call(q, docs):
            feeds = text_feeds(bundle, q, docs, encoder=enc)
            t = time.perf_counter()
            scores, pruned, order = sess.run(None, feeds)
            run_s = time.perf_counter() - t
            top = [int(i) for i in order[:k]]
            return top, [float(scores[i]) for i in top], run_s, int((pruned < 0).sum())
    load_s = time.perf_counter() - t_load
    idle = rss_bytes()
    snap()
    results, wall, cpu, run_only = [], [], [], []
    for rep in range(1 + spec["runs"]):
        for q in spec["queries"]:
            w0, c0 = time.perf_counter(), time.process_time()
            ids, scores, run_s, survivors = call(q["query"], q["docs"])
            w, c = time.perf_counter() - w0, time.process_time() - c0
            snap()
            if rep == 0:
                results.append({"ids": ids, "scores": scores, "survivors": survivors})
            else:
                wall.append(w)
                cpu.append(c)
                run_only.append(run_s)
    return {"config": config, "results": results, "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "session_run_s": statistics.median(run_only) if config in ("fused", "whole") else None, "load_s": round(load_s, 3),
            "base_rss": base, "idle_rss": idle, "peak_rss": peak[0], "wall_all": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--schedule", default="bundle", help="'bundle' (its calibrated schedule) or a schedule as JSON (text or file)")
    p.add_argument("-n", "--n-docs", type=int, default=128)
    p.add_argument("-k", "--top-k", type=int, default=10)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--runs", type=int, default=1, help="timed passes over all queries after the warm-up pass")
    p.add_argument("--configs", default="runtime,fused,whole", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--peer-onnx", help="the optimum-exported whole model, for the 'peer' configuration")
    p.add_argument("--work", default=None, help="where the fused copy of the bundle goes (default: a temp dir)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, Path(args.spec))))
        return 0

    import tempfile

    from edge_sel.runtime import Bundle
    from edge_sel.runtime.rerank.text import TextEncoder

    from .workload import build_queries

    work = Path(args.work or tempfile.mkdtemp(prefix="edge_sel-fused-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    copy, sched = _prepare(Path(args.bundle), args.schedule, work)
    enc = TextEncoder(Bundle.open(copy))
    queries = build_queries(enc.tok, args.queries, args.n_docs)
    spec = {"bundle": str(copy), "schedule": sched, "peer_onnx": args.peer_onnx, "top_k": args.top_k, "runs": args.runs,
            "queries": [{"query": q.text, "docs": q.docs} for q in queries]}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    runs = {}
    for config in args.configs.split(","):
        print(f"running {config} ...", file=sys.stderr)
        out = subprocess.run([sys.executable, "-m", "benchmarks.fused", args.bundle, "--worker", config, "--spec", str(spec_path)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{config} failed:\n{out.stderr[-3000:]}")
        runs[config] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = runs.get("runtime")
    rows = []
    for config, r in runs.items():
        row = {"config": config, "wall_s": round(r["wall_s"], 4), "cpu_s": round(r["cpu_s"], 4),
               "session_run_s": None if r["session_run_s"] is None else round(r["session_run_s"], 4),
               "peak_rss_mb": round(r["peak_rss"] / 2**20, 1), "idle_rss_mb": round(r["idle_rss"] / 2**20, 1),
               "base_rss_mb": round(r["base_rss"] / 2**20, 1), "load_s": r["load_s"],
               "survivors_per_query": [x["survivors"] for x in r["results"]]}
        if ref is not None and config != "runtime":
            same = [a["ids"] == b["ids"] for a, b in zip(r["results"], ref["results"])]
            row["topk_identical"] = f"{sum(same)}/{len(same)}"
            row["topk_overlap"] = round(statistics.mean(len(set(a["ids"]) & set(b["ids"])) / len(b["ids"])
                                                        for a, b in zip(r["results"], ref["results"])), 4)
            row["max_topk_score_diff"] = max(abs(x - y) for a, b in zip(r["results"], ref["results"]) if a["ids"] == b["ids"]
                                             for x, y in zip(a["scores"], b["scores"])) if any(same) else None
        rows.append(row)
    report = {"bundle": args.bundle, "n_docs": args.n_docs, "top_k": args.top_k, "queries": args.queries, "runs": args.runs,
              "schedule": sched, "rows": rows, "commit": _commit(), "machine_note": "shared machine: compare ratios within this run"}
    text = json.dumps(report, indent=1)
    for row in rows:  # one line each on stderr, for a reader
        print({k: v for k, v in row.items() if k != "survivors_per_query"}, file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
