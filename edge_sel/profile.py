"""``edge-sel profile BUNDLE rerank|generate <that command's arguments> --out DIR``: run one call under the
profiler (:mod:`edge_sel.runtime.profiler`) and write what it saw.

Outputs in ``DIR``: ``trace.json`` (Chrome / Perfetto trace events; ``--ops`` adds onnxruntime's per-operator
profile on the same timeline), ``memory.png`` (RSS by kind over time, stage bands, the budget line, the peak),
``report.html`` (self-contained: the plot, the summary, the plan's estimate vs what was measured, top stages) and
``profile.json`` (the summary); a terminal summary, or the summary as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
from pathlib import Path

from edge_sel.runtime.errors import InputError
from edge_sel.runtime.profiler import Profiler

from .paths import creatable_path, writable_dir
from .profile_report import plot_png, print_summary, summarize, write_html
from .profile_trace import write_trace


def profile_options() -> argparse.ArgumentParser:
    """The options ``profile`` itself takes, wherever they appear among the command's arguments."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", "-o")
    p.add_argument("--ops", action="store_true")
    p.add_argument("--interval-ms", type=float, default=5.0)
    p.add_argument("--json", action="store_true")
    return p


def _run_rerank(args) -> tuple[dict, dict | None]:
    from edge_sel.runtime import Reranker
    from edge_sel.runtime.documents import read_documents

    docs = read_documents(args.documents)
    rr = Reranker(args.bundle, memory_budget=args.memory_budget, pruning=args.pruning,
                  spill_dir=writable_dir(args.spill_dir, "--spill-dir"))
    try:
        rr.rank(args.query, docs, top_k=args.top_k, instruction=args.instruction)
    finally:
        rr.close()
    stats = rr.stats.as_dict()
    return stats, rerank_estimate(rr, stats)


def rerank_estimate(rr, stats: dict) -> dict | None:
    """The plan's memory estimate for the call that produced ``stats``, by component (devices planner)."""
    from edge_sel.devices.planner import rerank_memory_of_call

    return rerank_memory_of_call(rr, stats)


def _run_generate(args) -> tuple[dict, dict | None]:
    from edge_sel.runtime import Generator

    from .cli import read_prompt

    prompt = read_prompt(args)
    gen = Generator(args.bundle, kv_budget=args.kv_budget, policy=args.policy)
    try:
        gen.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed, chat=args.chat, system=args.system)
    finally:
        gen.close()
    from edge_sel.devices.planner import generate_memory

    stats = gen.last_stats
    return stats, generate_memory(gen.bundle, stats)


def command(args, console) -> int:
    from .parser import build_parser

    opts, rest = profile_options().parse_known_args(args.rest)
    if opts.out is None:
        raise InputError("profile needs --out DIR (the folder for trace.json, memory.png, report.html, profile.json)")
    if not 0 < opts.interval_ms <= 1000:
        raise InputError(f"--interval-ms must be in (0, 1000], got {opts.interval_ms}")
    inner = build_parser().parse_args([args.task, args.bundle, *rest])
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    creatable_path(str(out), "--out")
    budget = inner.memory_budget if args.task == "rerank" else None
    import edge_sel.runtime.generate  # noqa: F401  the engines and their libraries load before the profile
    import edge_sel.runtime.rerank  # noqa: F401  starts: they belong to its baseline, not to the call

    ops_dir = Path(tempfile.mkdtemp(prefix="edge-sel-ops-")) if opts.ops else None
    try:
        with Profiler(interval=opts.interval_ms / 1000, budget=budget,
                      ops_prefix=str(ops_dir / "s") if ops_dir else None) as prof:
            stats, estimate = (_run_rerank if args.task == "rerank" else _run_generate)(inner)
            gc.collect()  # the call's sessions are released now: onnxruntime writes their per-operator profiles
        res = prof.result
        argv = ["edge-sel", "profile", args.bundle, args.task, *rest]
        summary = summarize(res, {"argv": argv, "task": args.task}, stats, estimate)
        out.mkdir(parents=True, exist_ok=True)  # only once the call succeeded: a bad input leaves nothing behind
        trace = write_trace(res, out / "trace.json", ops=opts.ops, meta={"command": argv})
    finally:
        if ops_dir is not None:
            shutil.rmtree(ops_dir, ignore_errors=True)
    png = plot_png(res, out / "memory.png", title=" ".join(argv[2:])[:120])
    report = write_html(summary, png, out / "report.html")
    (out / "profile.json").write_text(json.dumps(summary, default=str, indent=1))
    files = {"trace": str(trace), "plot": str(png) if png else "(none: pip install edge-sel[profile] for matplotlib)",
             "report": str(report), "summary": str(out / "profile.json")}
    if opts.json:
        print(json.dumps({**summary, "files": files}, default=str))
    else:
        print_summary(summary, console, files)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle")
    p.add_argument("task", choices=["rerank", "generate"])
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="the arguments of `edge-sel rerank` / `edge-sel generate`, plus --out DIR [--ops] "
                        "[--interval-ms 5] [--json]")
