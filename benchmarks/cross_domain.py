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
    python -m benchmarks.cross_domain run BUNDLE --candidates 64,128 --compare new=CAL --calibrated CAL --peer-onnx ONNX
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
            if paths[qi].is_file():  # another recorder got there first
                continue
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


def probe_scores(W: np.ndarray, scoring, traces) -> list[np.ndarray]:
    """Every layer's probe scores ``[L, N]`` per trace, with the probes ``W`` (fitted on calibration only)."""
    from edge_sel.export.passes.traces import features
    from edge_sel.runtime.rerank.scoring import apply_probe

    return [np.stack([apply_probe(W[l], features(scoring, t, l)) for l in range(W.shape[0])]) for t in traces]


def evaluate(bundle: Path, cal: list, held: dict[str, list], k: int, rules: list[str], safeties: list[float] | None = None,
             stored: dict[str, Path] | None = None) -> dict:
    """Calibrate each rule on the traces ``cal`` (probe, split-half validated, as ``edge-sel calibrate``), replay it
    on every held-out trace set of ``held`` (name -> traces); ``safeties``: also each rule unvalidated at these safety
    factors (the trade-off); ``stored``: label -> a calibrated copy of the bundle whose stored schedule (and probe) is
    replayed as well."""
    from edge_sel.export.passes.schedule_search import choose_schedule, simulate, validated_schedule
    from edge_sel.export.passes.traces import probe_fits
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.rerank.scoring import scoring_class

    b = Bundle.open(bundle)
    scoring = scoring_class(b)
    t = time.process_time()
    W, _, cal_scores = probe_fits(scoring, cal)
    fit_cpu = time.process_time() - t
    held_scores = {name: probe_scores(W, scoring, tr) for name, tr in held.items()}
    rows = []

    def add(label, rule, safety, layers, params, info):
        row = {"schedule": label, "rule": rule, "safety": safety, "layers": layers, "params": [round(float(x), 4) for x in params],
               "calibration": simulate(cal_scores, cal, k, layers, params, rule=rule)}
        for name, tr in held.items():
            row[name] = simulate(held_scores[name], tr, k, layers, params, rule=rule)
        row.update(info)
        rows.append(row)

    for rule in rules:
        layers, params, info = validated_schedule(cal_scores, cal, k, None, rule=rule)
        add(f"{rule} (validated)", rule, info.get("safety_used"), layers, params, {})
        for sf in safeties or []:
            layers, params, _ = choose_schedule(cal_scores, cal, k, sf, rule=rule)
            add(f"{rule} x{sf:g}", rule, sf, layers, params, {})
    for label, path in (stored or {}).items():
        rows.append(stored_row(label, path, cal, held, k, scoring))
    return {"rows": rows, "probe_fit_cpu_s": fit_cpu}


def stored_row(label: str, path: Path, cal: list, held: dict[str, list], k: int, scoring) -> dict:
    """The schedule stored in the bundle at ``path`` (with its own probe array), replayed on every trace set."""
    from edge_sel.export.passes.schedule_search import simulate
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.rerank.schedule import Schedule

    b = Bundle.open(path)
    row = {"schedule": label, "bundle": str(path), "rule": None, "layers": [], "params": []}
    if b.spec.schedule is None or not b.spec.schedule.layers:  # nothing to replay: every call is the full model's
        return {**row, **{name: simulate([t.pooled[:, :, 0] for t in tr], tr, k, [], []) for name, tr in [("calibration", cal), *held.items()]}}
    sch = Schedule.from_manifest(b.spec.schedule.to_dict())
    W = np.array(b.array(sch.probe)) if sch.method == "probe" else None
    row.update(rule=sch.rule, safety=sch.safety, layers=sch.layers, params=[round(float(x), 4) for x in sch.params],
               calibration_source=sch.info.get("calibration"))

    def scores(traces):
        if W is not None:
            return probe_scores(W, scoring, traces)
        from edge_sel.export.passes.traces import head_scores
        return [np.stack([head_scores(scoring, t, l) for l in range(t.pooled.shape[0])]) for t in traces]

    for name, tr in [("calibration", cal), *held.items()]:
        row[name] = simulate(scores(tr), tr, k, sch.layers, sch.params, rule=sch.rule)
    return row


def render(doc: dict) -> str:
    """A Markdown table: per schedule and domain, top-K identical / overlap / layer-work saved."""
    names = doc["domains"]
    head = ["schedule", "layers", "params"] + [f"{n}: same / overlap / saved" for n in ["calibration"] + names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        cells = [r["schedule"], str(r["layers"]), ", ".join(f"{x:g}" for x in r["params"])]
        for n in ["calibration"] + names:
            v = r.get(n)
            cells.append("-" if v is None else f"{100 * v['topk_identical']:.0f}% / {v.get('overlap', float('nan')):.3f} / "
                                               f"{100 * v['layer_work_saved']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latency(bundle: Path, calibrated: Path, domain: str, n: int, n_queries: int, seed: int, k: int, runs: int,
            peer_onnx: str, log=print, timeout: float = 4 * 3600) -> dict:
    """Real calls, each configuration in a fresh process (``benchmarks.rerank_worker``): the bare whole-model
    onnxruntime session (``ort``) and edge_sel on ``calibrated`` with its stored schedule (``edge_sel_pruned``; its
    warm-up pass is ``predict()``, the full model: the ``--pruning off`` reference for the top-K)."""
    import subprocess
    import tempfile

    from edge_sel.export.domains import domain_pairs, domain_queries
    from edge_sel.runtime import Reranker

    from . import module_cmd
    from .rerank import _env
    from .workload import Query, encode_workload

    own = dict(domain_pairs(domain))
    data = domain_queries(domain, n_queries, n, seed)
    queries = [Query(q, f"{domain}#{i}", docs, ["other"] * len(docs), docs.index(own[q]) if own.get(q) in docs else 0)
               for i, (q, docs) in enumerate(data)]
    rr = Reranker(bundle)
    workload = encode_workload(rr.encoder, queries)
    tm = rr.bundle.spec.token_ids
    spec = {"model": str(bundle), "scoring": rr.bundle.scoring, "bundle": str(bundle), "bundle_calibrated": str(calibrated),
            "top_k": k, "runs": runs, "batch_size": 16, "memory_budget": 0, "pruning": "off", "pad_id": rr.bundle.spec.pad_id,
            "yes_id": tm and tm.yes, "no_id": tm and tm.no, "queries": workload, "max_length": int(rr.bundle.max_length),
            "peer_onnx": peer_onnx}
    rr.close()
    results = {}
    with tempfile.TemporaryDirectory(prefix="edge_sel-xdomain-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for c in ("ort", "edge_sel_pruned"):
            out = Path(tmp) / f"{c}.json"
            log(f"[{domain} N={n}] {c} in a fresh process (load average {os.getloadavg()[0]:.1f}) ...")
            res = subprocess.run(module_cmd("rerank_worker", "--config", c, "--spec", str(spec_path), "--out", str(out)),
                                 env=_env(), capture_output=True, text=True, timeout=timeout)
            results[c] = json.loads(out.read_text()) if out.is_file() else {"ok": False, "error": res.stderr[-500:]}
    ort, pr = results["ort"], results["edge_sel_pruned"]
    if not (ort.get("ok") and pr.get("ok")):
        return {"ok": False, "errors": {c: r.get("error") for c, r in results.items() if not r.get("ok")}}
    ref = [set(t[:k]) for t in pr["topk_warmup"]]     # predict(): the full model
    got = [set(t[:k]) for t in pr["topk"]]            # rank(): pruned
    stats = pr.get("edge_sel_stats") or []
    return {"ok": True, "queries": len(workload), "ort_s": ort["latency_per_query"], "pruned_s": pr["latency_per_query"],
            "full_s": float(np.median(pr["warmup_s"])), "ratio": pr["latency_per_query"] / ort["latency_per_query"],
            "full_ratio": float(np.mean(pr["warmup_s"])) / ort["latency_per_query"],
            "cpu_ratio": pr["cpu_per_query"] / ort["cpu_per_query"] if ort.get("cpu_per_query") else None,
            "topk_identical": float(np.mean([a == b for a, b in zip(ref, got)])),
            "overlap": float(np.mean([len(a & b) / k for a, b in zip(ref, got)])),
            "layer_work_saved": float(np.mean([s_["layer_work_saved"] for s_ in stats])) if stats else None,
            "pruning": stats[0].get("pruning") if stats else None, "loadavg": os.getloadavg()}


def held_traces(cache: Path, bundle: Path, domains: list[str], sizes: list[int], n_queries: int, seed: int) -> dict[str, list]:
    """Per domain and N: recorded traces of some N' >= N (the one with most queries, then the largest), cut to their
    first N candidates (a call with those N candidates computes exactly these states)."""
    held = {}
    for d in domains:
        recorded = {m: [p for p in (trace_path(cache, bundle, d, m, qi, seed) for qi in range(n_queries)) if p.is_file()]
                    for m in sorted(set(sizes))}
        for n in sizes:
            options = [(len(paths), m) for m, paths in recorded.items() if m >= n and paths]
            if options:
                _, m = max(options)
                held[f"{d} N={n} ({len(recorded[m])}q)"] = load_traces(recorded[m], n)
    return held


def render_latency(rows: dict) -> str:
    lines = ["| domain | queries | bare ort s/query | edge_sel full s | pruned s | pruned x ort (wall / CPU) | full x ort | "
             "top-K same | overlap | work saved | load average |", "|" + "---|" * 11]
    for name, r in rows.items():
        if r.get("ok"):
            cpu = f"{r['cpu_ratio']:.3f}" if r.get("cpu_ratio") else "-"
            lines.append(f"| {name} | {r['queries']} | {r['ort_s']:.2f} | {r['full_s']:.2f} | {r['pruned_s']:.2f} | {r['ratio']:.3f} / {cpu} | "
                         f"{r['full_ratio']:.3f} | {100 * r['topk_identical']:.0f}% | {r['overlap']:.3f} | "
                         f"{100 * (r['layer_work_saved'] or 0):.1f}% | {r['loadavg'][0]:.1f} |")
        else:
            lines.append(f"| {name} | failed: {r.get('errors')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cross_domain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["record", "evaluate", "latency", "run"],
                    help="run = record (cached) + evaluate + latency in one go")
    ap.add_argument("bundle")
    ap.add_argument("--domains", default="botchan,wordnet")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--candidates", default="64", help="comma-separated N; traces are recorded at the largest and cut")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--cal-domain", default="builtin", help="evaluate: the domain calibration sees (default: %(default)s)")
    ap.add_argument("--cal-queries", type=int, default=24)
    ap.add_argument("--cal-candidates", type=int, default=48, help="evaluate: the first this many candidates of each "
                    "calibration query (recorded with --candidates 48)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--rules", default="margin,rank,spread")
    ap.add_argument("--safeties", default="", help="evaluate: also each rule unvalidated at these safety factors")
    ap.add_argument("--compare", default="", help="evaluate: LABEL=BUNDLE,... calibrated copies of BUNDLE whose stored "
                    "schedules are replayed too (e.g. the default calibration and an older one)")
    ap.add_argument("--out", help="evaluate / latency / run: write the JSON here (run: and a .md beside it)")
    ap.add_argument("--calibrated", help="latency: the calibrated copy of BUNDLE whose stored schedule is timed")
    ap.add_argument("--peer-onnx", help="latency: the whole-model ONNX graph (benchmarks.prepare's peer_onnx)")
    ap.add_argument("--latency-queries", type=int, default=5, help="run: real-call queries per domain and N")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="latency / run: configurations timed side by side")
    ap.add_argument("--record", action="store_true", help="run: first record the missing traces (else: the cached ones)")
    args = ap.parse_args(argv)
    bundle = Path(args.bundle).resolve()
    cache = Path(args.cache)
    domains = args.domains.split(",")
    sizes = [int(x) for x in args.candidates.split(",")]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    doc: dict = {"bundle": str(bundle), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_start": os.getloadavg()}
    if args.command == "record" or (args.command == "run" and args.record):
        for d in domains:
            record(bundle, d, args.queries, max(sizes), args.seed, cache, log)
    if args.command in ("evaluate", "run"):
        cal = load_traces(sorted((cache / _bundle_key(bundle) / f"{args.cal_domain}-n48-s0").glob("q*.npz"))[:args.cal_queries],
                          args.cal_candidates)
        held = held_traces(cache, bundle, domains, sizes, args.queries, args.seed)
        compare = {kv.split("=", 1)[0]: Path(kv.split("=", 1)[1]).resolve() for kv in args.compare.split(",") if kv}
        res = evaluate(bundle, cal, held, args.top_k, args.rules.split(","),
                       [float(x) for x in args.safeties.split(",") if x], compare)
        doc.update({"cal_domain": args.cal_domain, "cal_queries": len(cal), "cal_candidates": args.cal_candidates,
                    "domains": list(held), "top_k": args.top_k, **res})
        print(render(doc))
    if args.command in ("latency", "run"):
        from concurrent.futures import ThreadPoolExecutor

        def one(d, n):
            r = latency(bundle, Path(args.calibrated).resolve(), d, n, args.latency_queries if args.command == "run" else args.queries,
                        args.seed, args.top_k, args.runs, args.peer_onnx, log)
            log(f"{d} N={n}: {json.dumps(r)}")
            return r

        # each configuration's two sessions run one after the other (their ratio is what counts); --jobs runs
        # configurations side by side on a machine that is shared anyway
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {f"{d} N={n}": pool.submit(one, d, n) for d in domains for n in sizes}
            rows = {name: f.result() for name, f in futures.items()}
        doc["latency"] = rows
        print(render_latency(rows))
    if args.out:
        doc["finished"], doc["loadavg_end"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), os.getloadavg()
        out = Path(args.out)
        out.write_text(json.dumps(doc.get("latency") if args.command == "latency" else doc, indent=1))
        if args.command == "run":
            out.with_suffix(".md").write_text(render(doc) + "\n" + render_latency(doc["latency"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
