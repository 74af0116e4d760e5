"""``python -m benchmarks.rerank``: edge_sel side by side with the engines users pick today, one fresh process each.

Configurations (``--configs``, default all, in this order):
  torch            transformers eager, full model (the reference for top-K agreement and score parity)
  optimum          optimum's whole-model ONNX export through ORTModelForCausalLM / ...SequenceClassification /
                   ...FeatureExtraction
  ort              the same ONNX graph in a bare onnxruntime.InferenceSession, torch never imported
                   (ratios are taken against it: the stricter peer)
  edge_sel         edge_sel Reranker(bundle), every layer resident
  edge_sel_budget  edge_sel Reranker(bundle, memory_budget=--memory-budget)

Every configuration scores the same token ids (built once by edge_sel's encoder, see ``workload``), after
a warm-up pass over all queries; latency is the median over ``--runs`` passes of the mean time per query.
Memory definitions are in ``rerank_worker``'s docstring (base / idle / peak RSS, model share = peak - idle).

    python -m benchmarks.rerank --model smollm2-135m-instruct --n-docs 64 --queries 5 --out results.json
    python -m benchmarks.rerank --model all-minilm-l6-v2 --quick
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import child_env, module_cmd
from .rerank_worker import CONFIGS

DEFAULT_BUDGETS = {"smollm2-135m-instruct": "128MB", "all-minilm-l6-v2": "80MB"}  # 64MB: below the minimum for 256-token docs (61.2 MiB)
LABELS = {"torch": "transformers (torch eager)", "optimum": "optimum ORTModel", "sbert": "sentence-transformers ({backend})",
          "ort": "bare onnxruntime session", "edge_sel": "edge_sel all resident", "edge_sel_budget": "edge_sel budget {budget}",
          "edge_sel_pruned": "edge_sel pruned", "edge_sel_pruned_budget": "edge_sel pruned, budget {budget}",
          "edge_sel_dropped": "edge_sel pruned, dropped layers"}
PRUNED = ("edge_sel_pruned", "edge_sel_pruned_budget", "edge_sel_dropped")
# targets for edge_sel all resident and under a budget, against the bare session (SmolLM2, N=64, K=10)
TARGETS = {"budget_peak_vs_ort": 0.35, "budget_share_slack": 1.10, "resident_latency_vs_ort": 1.2, "budget_latency_vs_ort": 2.0}
# targets for pruning (N=128, K=10): (e) = edge_sel_pruned, (f) = edge_sel_pruned_budget
TARGETS_PRUNED = {"same_top_k": 0.95, "overlap": 0.99, "decoder_latency_vs_ort": 0.35, "encoder_latency_vs_ort": 0.5,
                  "budget_peak_vs_ort": 0.25, "budget_latency_vs_ort": 0.5}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rerank",
        description="Rerank benchmark: edge_sel vs transformers, optimum ORTModel and a bare onnxruntime session, "
                    "each configuration in a fresh process, on real text (Botchan windows + CPython docstrings).",
        epilog="examples:\n  python -m benchmarks.rerank --model smollm2-135m-instruct --n-docs 64 --queries 5 --out r.json\n"
               "  python -m benchmarks.rerank --model all-minilm-l6-v2 --scoring cross_encoder\n"
               "  python -m benchmarks.rerank --model all-minilm-l6-v2 --quick --configs ort,edge_sel",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, HF directory or .gguf (default: %(default)s)")
    p.add_argument("--scoring", choices=["yes_no", "cross_encoder", "bi_encoder"], help="default: the model's own")
    p.add_argument("--seed", type=int, default=0, help="seed of a fresh classifier head (cross_encoder on a plain encoder)")
    p.add_argument("--n-docs", type=int, default=64, help="candidates per query (default: %(default)s)")
    p.add_argument("--queries", type=int, default=5, help="number of queries (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--memory-budget", help="budget of the edge_sel_budget config: a size, or 'auto' (the input's minimum "
                   "+ half a layer: streams with a window of 2). Default: 128MB for SmolLM2, 80MB for MiniLM, auto otherwise")
    p.add_argument("--pruning", default="off", help="edge_sel / edge_sel_budget: early-ranking pruning passed to Reranker "
                   "('off' = full model, the default; 'auto'/'on' = the bundle's calibrated schedule, where available). "
                   "The edge_sel_pruned* / edge_sel_dropped configs always prune, on calibrated copies of the bundle")
    p.add_argument("--drop-layers", default="auto", help="edge_sel_dropped: layers to drop from the calibrated copy, N or "
                   "'auto' (default; measures many layer subsets: slow on 30-layer models)")
    p.add_argument("--bundle", help="use this edge_sel bundle instead of exporting/caching one (it must come from --model)")
    p.add_argument("--rebuild", action="store_true", help="re-export the cached bundle (e.g. after the exporter changed)")
    p.add_argument("--runs", type=int, default=3, help="timed passes after the warm-up pass (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="peers' batch size (default: %(default)s)")
    p.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS) + " (default: all that apply; "
                   "sbert only for encoders)")
    p.add_argument("--corpus", choices=["mixed", "docstrings"], default="mixed",
                   help="mixed = half docstring passages, half Botchan windows (needs one pip download); docstrings = offline")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 16 docs, 2 queries, K=5, 1 timed pass")
    p.add_argument("--out", help="write the full results JSON here")
    p.add_argument("--markdown", help="write the tables as Markdown here")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per configuration process (default: 4 h)")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of tables")
    return p


def _env() -> dict:
    env = child_env()
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _prepare(args, configs, log) -> dict:
    need = "onnx" if {"optimum", "ort", "sbert"} & set(configs) else ("hf" if "torch" in configs else "none")
    variants = [v for v, names in (("calibrated", ("edge_sel_pruned", "edge_sel_pruned_budget")), ("dropped", ("edge_sel_dropped",)))
                if set(names) & set(configs)]
    with tempfile.TemporaryDirectory(prefix="edge_sel-bench-") as tmp:
        out = Path(tmp) / "prep.json"
        cmd = module_cmd("prepare", args.model, args.scoring or "default", str(args.seed), need, str(out),
                         "--top-k", str(args.top_k), "--variants", ",".join(variants), "--drop-layers", str(args.drop_layers))
        if args.bundle:
            cmd += ["--bundle", str(Path(args.bundle).resolve())]
        elif args.rebuild:
            cmd.append("--rebuild")
        res = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=None, text=True)
        if res.returncode != 0 or not out.is_file():
            raise SystemExit(f"benchmarks.rerank: preparing {args.model} failed (exit {res.returncode}); see the messages above")
        return json.loads(out.read_text())


def _budget(args, rr, workload) -> int:
    from edge_sel.runtime.units import parse_size

    text = args.memory_budget or DEFAULT_BUDGETS.get(args.model, "auto")
    if text == "auto":
        need = max(rr.minimum_budget(q["query"], q["docs"]) for q in workload)
        return int(need + rr.planner.layer_bytes // 2)
    return parse_size(text)


def _agreement(ref: dict, res: dict, k: int) -> dict:
    """Top-K of the timed passes (edge_sel: what ``rank()`` returned, pruning included) against the reference's
    full-model top-K; score differences over the warm-up pass (edge_sel: ``predict()``, every score)."""
    same, overlap = [], []
    for a, b in zip(ref["topk_warmup"], res["topk"]):
        same.append(set(a[:k]) == set(b[:k]))
        overlap.append(len(set(a[:k]) & set(b[:k])) / k)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(ref["scores"], res["scores"]))
    timed_same = all(set(a[:k]) == set(b[:k]) for a, b in zip(ref["topk_warmup"], res["topk"]))
    return {"top_k_identical": float(np.mean(same)), "overlap_at_k": float(np.mean(overlap)),
            "max_abs_score_diff": diff, "timed_top_k_identical": timed_same}


def _gold(res: dict, workload: list[dict], k: int) -> dict:
    hits, rr = [], []
    for q, s in zip(workload, res["scores"]):
        order = np.argsort(-np.asarray(s), kind="stable")
        rank = int(np.where(order == q["gold"])[0][0]) + 1
        hits.append(rank <= k)
        rr.append(1.0 / rank if rank <= k else 0.0)
    return {"gold_in_top_k": float(np.mean(hits)), "mrr_at_k": float(np.mean(rr))}


def reference_name(results: dict) -> str | None:
    """The configuration top-K agreement and score differences are measured against: torch when it ran."""
    return next((c for c in ("torch", "optimum", "ort") if results.get(c, {}).get("ok")), None)


def summarize(results: dict, workload: list[dict], k: int, budget: int) -> dict:
    ref_name = reference_name(results)
    ref = results[ref_name] if ref_name else None
    base = results.get("ort")
    rows = {}
    for name, r in results.items():
        if not r.get("ok"):
            rows[name] = {"ok": False, "error": r.get("error")}
            continue
        row = {"ok": True, "latency_per_query_s": r["latency_per_query"],
               "latency_runs_s": r["latency_per_query_runs"],
               "first_pass_per_query_s": float(np.mean(r["warmup_s"])), "cpu_per_query_s": r.get("cpu_per_query"),
               "peak_rss": r["peak_rss"], "idle_rss": r["idle_rss"], "base_rss": r["base_rss"],
               "model_share": r["peak_rss"] - r["idle_rss"], "load_and_share": r["peak_rss"] - r["base_rss"],
               "load_s": r["load_s"], "torch_imported": r["torch_imported"]}
        row.update(_gold(r, workload, k))
        if ref:
            row.update(_agreement(ref, r, k))
            row["reference"] = ref_name
        if base and base.get("ok"):
            row["latency_vs_ort"] = r["latency_per_query"] / base["latency_per_query"]
            if r.get("cpu_per_query") and base.get("cpu_per_query"):
                row["cpu_vs_ort"] = r["cpu_per_query"] / base["cpu_per_query"]
            row["peak_vs_ort"] = r["peak_rss"] / base["peak_rss"]
        if "edge_sel_stats" in r and r["edge_sel_stats"]:
            st = r["edge_sel_stats"]
            row["stages_mean_s"] = {key: float(np.mean([s[key] for s in st])) for key in
                                    ("latency_s", "tokenize_s", "embed_s", "layers_s", "head_s", "layer_load_wait_s") if key in st[0]}
            for key in ("window_layers", "chunk_size", "chunk_tokens", "n_chunks", "layer_loads", "pruning", "dropped_layers"):
                if key in st[0]:
                    row[key] = st[0][key]
            if "live_per_layer" in st[0]:  # candidate-layers computed, as a fraction of the full model's N x layers
                full = [len(q["doc_ids"]) * (s["n_layers"] + len(s.get("dropped_layers") or [])) for q, s in zip(workload, st)]
                row["candidate_layers"] = float(np.mean([sum(s["live_per_layer"]) / f for s, f in zip(st, full)]))
            row["ids_match_workload"] = r.get("ids_match_workload")
        if name == "sbert":
            row["backend"] = r.get("sbert_backend")
        rows[name] = row
    return rows


def acceptance(rows: dict, budget: int) -> list[dict]:
    checks = []
    ort, full, tight = rows.get("ort"), rows.get("edge_sel"), rows.get("edge_sel_budget")
    ok = lambda r: bool(r and r.get("ok"))  # noqa: E731
    if ok(ort) and ok(tight):
        checks.append({"check": "budget: whole-process peak RSS <= 0.35x bare session", "value": tight["peak_vs_ort"],
                       "target": TARGETS["budget_peak_vs_ort"], "pass": tight["peak_vs_ort"] <= TARGETS["budget_peak_vs_ort"]})
        checks.append({"check": "budget: model share (peak - idle) <= budget + 10%", "value": tight["model_share"] / budget,
                       "target": TARGETS["budget_share_slack"], "pass": tight["model_share"] <= TARGETS["budget_share_slack"] * budget})
        checks.append({"check": "budget: latency <= 2x bare session", "value": tight["latency_vs_ort"],
                       "target": TARGETS["budget_latency_vs_ort"], "pass": tight["latency_vs_ort"] <= TARGETS["budget_latency_vs_ort"]})
    if ok(ort) and ok(full):
        checks.append({"check": "all resident: latency <= 1.2x bare session", "value": full["latency_vs_ort"],
                       "target": TARGETS["resident_latency_vs_ort"], "pass": full["latency_vs_ort"] <= TARGETS["resident_latency_vs_ort"]})
    for name in ("edge_sel", "edge_sel_budget"):
        r = rows.get(name)
        if ok(r) and "top_k_identical" in r:
            checks.append({"check": f"{name}: top-K sets identical to {r['reference']} on every query", "value": r["top_k_identical"],
                           "target": 1.0, "pass": r["top_k_identical"] == 1.0 and r["timed_top_k_identical"]})
    return checks


def acceptance_pruned(rows: dict, scoring: str) -> list[dict]:
    """The targets for (e) pruning + prefix reuse and (f) the same under a tight budget."""
    T = TARGETS_PRUNED
    checks = []
    ort = rows.get("ort")
    ok = lambda r: bool(r and r.get("ok"))  # noqa: E731
    lat_target = T["decoder_latency_vs_ort"] if scoring == "yes_no" else T["encoder_latency_vs_ort"]
    for name in PRUNED:
        r = rows.get(name)
        if not ok(r) or "top_k_identical" not in r:
            continue
        checks.append({"check": f"{name}: same top-K set as {r['reference']} on >= 95% of queries", "value": r["top_k_identical"],
                       "target": T["same_top_k"], "pass": r["top_k_identical"] >= T["same_top_k"]})
        if scoring == "yes_no":
            checks.append({"check": f"{name}: mean overlap@K >= 0.99", "value": r["overlap_at_k"], "target": T["overlap"],
                           "pass": r["overlap_at_k"] >= T["overlap"]})
        if ok(ort) and name == "edge_sel_pruned":
            checks.append({"check": f"{name}: latency <= {lat_target}x bare session", "value": r["latency_vs_ort"],
                           "target": lat_target, "pass": r["latency_vs_ort"] <= lat_target})
        if ok(ort) and name == "edge_sel_pruned_budget" and scoring == "yes_no":
            checks.append({"check": f"{name}: peak RSS <= 0.25x bare session", "value": r["peak_vs_ort"],
                           "target": T["budget_peak_vs_ort"], "pass": r["peak_vs_ort"] <= T["budget_peak_vs_ort"]})
            checks.append({"check": f"{name}: latency <= 0.5x bare session", "value": r["latency_vs_ort"],
                           "target": T["budget_latency_vs_ort"], "pass": r["latency_vs_ort"] <= T["budget_latency_vs_ort"]})
    return checks


def _mb(x) -> str:
    return f"{x / 1024**2:,.0f}"


def table_rows(rows: dict, budget_text: str) -> tuple[list[str], list[list[str]]]:
    head = ["configuration", "latency/query s", "x ort", "CPU s/query", "x ort", "1st pass s", "peak RSS MiB", "x ort", "idle MiB", "base MiB",
            "share MiB", "top-K same", "overlap@K", "max |dscore|", "gold@K", "cand-layers"]
    out = []
    for name, r in rows.items():
        label = LABELS[name].format(budget=budget_text, backend=r.get("backend") or "")
        if not r.get("ok"):
            out.append([label, "FAILED: " + str(r.get("error"))[:80]] + [""] * (len(head) - 2))
            continue
        f = lambda key, fmt: (fmt.format(r[key]) if key in r and r[key] is not None else "-")  # noqa: E731
        out.append([label, f"{r['latency_per_query_s']:.3f}", f("latency_vs_ort", "{:.2f}"), f("cpu_per_query_s", "{:.2f}"),
                    f("cpu_vs_ort", "{:.2f}"), f"{r['first_pass_per_query_s']:.3f}",
                    _mb(r["peak_rss"]), f("peak_vs_ort", "{:.2f}"), _mb(r["idle_rss"]), _mb(r["base_rss"]), _mb(r["model_share"]),
                    f("top_k_identical", "{:.0%}"), f("overlap_at_k", "{:.2f}"), f("max_abs_score_diff", "{:.1e}"),
                    f"{r['gold_in_top_k']:.0%}", f("candidate_layers", "{:.0%}")])
    return head, out


def stage_rows(rows: dict) -> tuple[list[str], list[list[str]]]:
    head = ["configuration", "latency s", "tokenize s", "embed s", "layers s", "head s", "load wait s", "window", "chunks", "chunk tokens", "layer loads"]
    out = []
    for name in ("edge_sel", "edge_sel_budget") + PRUNED:
        r = rows.get(name)
        if not r or not r.get("ok") or "stages_mean_s" not in r:
            continue
        s = r["stages_mean_s"]
        out.append([name] + [f"{s.get(k, float('nan')):.3f}" for k in ("latency_s", "tokenize_s", "embed_s", "layers_s", "head_s", "layer_load_wait_s")]
                   + [str(r.get(k, "-")) for k in ("window_layers", "n_chunks", "chunk_tokens", "layer_loads")])
    return head, out


def markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"### {m['model']} ({m['scoring']}), N={m['n_docs']} documents, {m['queries']} queries, K={m['top_k']}", "",
             f"Command: `{m['command']}`  ", f"Measured {m['date']} on {m['cpus']} CPUs, load average before/after: "
             f"{m['loadavg_before']} / {m['loadavg_after']}; commit {m['commit']}. Top-K agreement and score "
             f"differences against `{m.get('reference')}`; ratios against the bare onnxruntime session.", ""]
    head, body = table_rows(doc["rows"], m["memory_budget_text"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]
    sh, sb = stage_rows(doc["rows"])
    if sb:
        lines += ["", "edge_sel stages (mean per query over the last timed pass, from `Reranker.last_stats`):", "",
                  "| " + " | ".join(sh) + " |", "|" + "---|" * len(sh)] + ["| " + " | ".join(r) + " |" for r in sb]
    notes = [f"- `{n}`: pruning {r['pruning']}" + (f"; dropped layers {r['dropped_layers']}" if r.get("dropped_layers") else "")
             for n, r in doc["rows"].items() if r.get("ok") and r.get("pruning")]
    if notes:
        lines += ["", "Pruning per configuration (`Reranker.last_stats`):", ""] + notes
    if doc["acceptance"]:
        lines += ["", "| acceptance check | measured | target | result |", "|---|---|---|---|"]
        lines += [f"| {c['check']} | {c['value']:.3f} | {c['target']} | {'PASS' if c['pass'] else 'FAIL'} |" for c in doc["acceptance"]]
    return "\n".join(lines) + "\n"


def _print(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    m = doc["meta"]
    head, body = table_rows(doc["rows"], m["memory_budget_text"])
    t = Table(title=f"{m['model']} ({m['scoring']}): N={m['n_docs']}, {m['queries']} queries, K={m['top_k']}, "
                    f"median of {m['runs']} runs")
    for h in head:
        t.add_column(h, justify="left" if h == "configuration" else "right")
    for r in body:
        t.add_row(*r)
    console.print(t)
    sh, sb = stage_rows(doc["rows"])
    if sb:
        t2 = Table(title="edge_sel stages (mean per query)")
        for h in sh:
            t2.add_column(h, justify="right")
        for r in sb:
            t2.add_row(*r)
        console.print(t2)
    for c in doc["acceptance"]:
        mark = "[green]PASS[/]" if c["pass"] else "[red]FAIL[/]"
        console.print(f"{mark} {c['check']}: {c['value']:.3f} (target {c['target']})")
    console.print(f"share = peak - idle RSS (idle: model loaded, before the first query); base: after imports, before loading; "
                  f"agreement vs {m.get('reference')}.")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.n_docs, args.queries, args.runs, args.top_k = min(args.n_docs, 16), min(args.queries, 2), 1, min(args.top_k, 5)
    if args.configs:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    else:
        configs = [c for c in CONFIGS if not (c == "sbert" and (args.scoring == "yes_no" or args.model == "smollm2-135m-instruct"
                                                                   or str(args.model).endswith(".gguf")))]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        print(f"benchmarks.rerank: unknown configuration(s) {bad}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if args.n_docs < args.top_k or args.queries < 1 or args.runs < 1:
        print("benchmarks.rerank: need --n-docs >= --top-k, --queries >= 1 and --runs >= 1", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    prep = _prepare(args, configs, log)
    from edge_sel.runtime import Reranker
    from edge_sel.runtime.units import format_size

    from .workload import build_queries, encode_workload

    rr = Reranker(prep["bundle"])
    queries = build_queries(rr.encoder.tok, args.queries, args.n_docs, corpus=args.corpus, seed=args.seed)
    workload = encode_workload(rr.encoder, queries)
    budget = _budget(args, rr, workload)
    tm = rr.bundle.spec.token_ids
    spec = {"model": args.model, "scoring": prep["scoring"], "bundle": prep["bundle"], "top_k": args.top_k,
            "runs": args.runs, "batch_size": args.batch_size, "memory_budget": budget, "pruning": args.pruning,
            "pad_id": rr.bundle.spec.pad_id, "yes_id": tm and tm.yes, "no_id": tm and tm.no,
            "queries": workload, "max_length": int(rr.bundle.max_length),
            **{k: v for k, v in prep.items() if k.startswith(("peer_", "bundle_"))}}
    rr.close()
    del rr
    lengths = [len(x) for q in workload for x in q["doc_ids"]]

    results = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edge_sel-bench-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for c in configs:
            out = Path(tmp) / f"{c}.json"
            cmd = module_cmd("rerank_worker", "--config", c, "--spec", str(spec_path), "--out", str(out))
            la = os.getloadavg()[0]
            log(f"[{c}] running in a fresh process (load average {la:.2f}) ...")
            t = time.perf_counter()
            try:
                res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=args.timeout)
                data = json.loads(out.read_text()) if out.is_file() else {
                    "config": c, "ok": False, "error": f"worker exited {res.returncode}: {res.stderr.strip()[-500:]}"}
            except subprocess.TimeoutExpired:
                data = {"config": c, "ok": False, "error": f"timed out after {args.timeout:.0f} s"}
            data["wall_s"] = time.perf_counter() - t
            data["loadavg_start"] = la
            results[c] = data
            if data.get("ok"):
                log(f"[{c}] {data['latency_per_query']:.3f} s/query, peak RSS {format_size(data['peak_rss'])} "
                    f"({data['wall_s']:.0f} s wall)")
            else:
                log(f"[{c}] FAILED: {data.get('error')}")
    rows = summarize(results, workload, args.top_k, budget)
    doc = {
        "meta": {
            "model": args.model, "scoring": prep["scoring"], "n_docs": args.n_docs, "queries": args.queries,
            "top_k": args.top_k, "runs": args.runs, "batch_size": args.batch_size, "corpus": args.corpus, "pruning": args.pruning,
            "memory_budget": budget, "memory_budget_text": format_size(budget),
            "command": "python -m benchmarks.rerank " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "commit": _git_commit(), "bundle": prep["bundle"], "reference": reference_name(results),
            "doc_tokens": {"min": int(min(lengths)), "mean": float(np.mean(lengths)), "max": int(max(lengths)),
                           "per_query": float(sum(lengths) / len(workload))},
            "query_names": [q["name"] for q in workload], "queries_text": [q["query"] for q in workload],
        },
        "rows": rows,
        "acceptance": acceptance(rows, budget) + acceptance_pruned(rows, prep["scoring"]),
        "raw": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(doc))
    if args.json:
        print(json.dumps({k: doc[k] for k in ("meta", "rows", "acceptance")}, indent=1))
    else:
        _print(doc)
    return 0 if all(r.get("ok") for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
