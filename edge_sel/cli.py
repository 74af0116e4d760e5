"""The ``edge-sel`` command line. Every subcommand has ``--help`` with examples.

User errors (bad input, missing files, infeasible budgets) print one message and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path

from edge_sel.runtime.errors import EdgeSelError
from edge_sel.runtime.units import format_size, parse_size

from .progress import export_progress

EXAMPLES = {
    "models": """examples:
  edge-sel models list
  edge-sel models fetch all-minilm-l6-v2
  edge-sel models fetch smollm2-135m-instruct""",
    "export": """examples:
  edge-sel export all-minilm-l6-v2 -o bundles/minilm --verify
  edge-sel export all-minilm-l6-v2 -o bundles/minilm-ce --scoring cross_encoder --seed 0
  edge-sel export smollm2-135m-instruct -o bundles/smollm2 --task rerank --verify
  edge-sel export ~/models/my-cross-encoder -o bundles/ce""",
    "rerank": """examples:
  edge-sel rerank bundles/minilm --query "copy a file" --documents docs.txt --top-k 5
  edge-sel rerank bundles/smollm2 --query "..." --documents docs.jsonl --memory-budget 128MB --json
documents: plain text, one document per non-empty line (corpus_id = index among those lines),
or JSONL (one object per line with a "text" field).""",
    "demo": """examples:
  edge-sel demo
  edge-sel demo --model smollm2-135m-instruct --memory-budget 128MB""",
    "calibrate": """examples:
  edge-sel calibrate bundles/smollm2                        # builtin calibration text, top-10
  edge-sel calibrate bundles/minilm --top-k 5 --json
  edge-sel calibrate bundles/bge --data my_queries.jsonl    # lines: {"query": "...", "documents": ["...", ...]}
calibration text never overlaps the benchmark text (builtin: docstrings of other stdlib modules).""",
    "generate": """examples:
  edge-sel export smollm2-135m-instruct -o bundles/smol-gen --task generate --verify
  edge-sel generate bundles/smol-gen --prompt "Write a haiku about the sea." --chat
  edge-sel generate bundles/smol-gen --prompt-file book.txt --kv-budget 0.2 --policy mpcache --json
  edge-sel generate bundles/smol-gen -p "Once upon a time" --kv-budget 64MB --temperature 0.8 --seed 1
--kv-budget: tokens per layer (512), a fraction of the prompt (0.2) or bytes for the whole cache (64MB);
default: room for the prompt and every new token. Prompts longer than the model's context are refused.""",
    "verify": """examples:
  edge-sel verify bundles/minilm""",
    "info": """examples:
  edge-sel info bundles/minilm""",
    "bench": """examples:
  edge-sel bench bundles/minilm                                    # 64 synthetic candidates of 128 tokens, pruning off/on
  edge-sel bench bundles/smollm2 -n 32,128 -m none,128MB --pruning off,on --json
  edge-sel bench bundles/minilm -n 100 --documents docs.txt --query "copy a file"
  edge-sel bench bundles/smol-gen -p 512,2048 --policy full,mpcache --kv-budget none,0.2
measures edge_sel alone on this device (no torch). The side-by-side comparison with torch, optimum and
kvpress is a developer script of the source checkout: python -m benchmarks.rerank --help""",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: exit 2 with the usage line, as argparse does
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except EdgeSelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edge-sel", description="On-device selection: memory-bounded reranking over exported layer bundles.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    m = cmd("models", "list or fetch the packaged default models")
    msub = m.add_subparsers(dest="models_cmd", metavar="ACTION", parser_class=_Parser)
    msub.required = True
    ml = msub.add_parser("list", help="show packaged models and whether they are fetched")
    ml.add_argument("--json", action="store_true")
    mf = msub.add_parser("fetch", help="download a packaged model into the edge_sel cache")
    mf.add_argument("name")
    mf.add_argument("--force", action="store_true", help="download again even if present")

    e = cmd("export", "export a model to a bundle")
    e.add_argument("model", help="packaged name, local HF directory, .gguf file, or an id in the local HF cache")
    e.add_argument("-o", "--out", required=True, help="bundle directory to write (atomically)")
    e.add_argument("--task", default="rerank", choices=["rerank", "generate"])
    e.add_argument("--scoring", choices=["yes_no", "cross_encoder", "bi_encoder"], help="default: from the model")
    e.add_argument("--max-length", type=int, help="maximum tokens per candidate (default: the model's)")
    e.add_argument("--verify", action="store_true", help="compare bundle and torch scores; fail above 1e-3")
    e.add_argument("--seed", type=int, default=0, help="seed for freshly initialised head weights")
    e.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    e.add_argument("--drop-layers", metavar="N|auto", help="drop the N layers that matter least (block influence + measured "
                   "ranking effect on calibration text); auto: as many as keep top-10 agreement >= 0.9")
    e.add_argument("--calibrate", action="store_true", help="calibrate early-ranking pruning after export (see `edge-sel calibrate`)")
    e.add_argument("--json", action="store_true")

    r = cmd("rerank", "rank documents for a query with a bundle")
    r.add_argument("bundle")
    r.add_argument("--query", "-q", required=True)
    r.add_argument("--documents", "-d", required=True, help="text file (one per line) or JSONL with 'text'")
    r.add_argument("--top-k", "-k", type=int, default=10)
    r.add_argument("--memory-budget", "-m", type=_size, help="e.g. 128MB, 1.5GiB (default: all layers resident)")
    r.add_argument("--instruction", help="decoder rerankers: the <Instruct> line of the prompt")
    r.add_argument("--show-text", action="store_true", help="print document text with the results")
    r.add_argument("--pruning", choices=["auto", "on", "off"], default="auto",
                   help="early-ranking pruning: auto = the bundle's calibrated schedule if it has one; on = require one; off")
    r.add_argument("--json", action="store_true", help="print {results, stats} as JSON")

    d = cmd("demo", "select from real text (CPython docstrings) with a packaged model")
    d.add_argument("--model", default="all-minilm-l6-v2", help="all-minilm-l6-v2 (default) or smollm2-135m-instruct")
    d.add_argument("--memory-budget", "-m", type=_size, default=None, help="default: 128MB (MiniLM) / 192MB (SmolLM2)")
    d.add_argument("--pool", type=int, default=None, help="number of candidate docstrings (default: 200 MiniLM, 48 SmolLM2)")
    d.add_argument("--top-k", "-k", type=int, default=3)
    d.add_argument("--json", action="store_true")

    c = cmd("calibrate", "calibrate early-ranking pruning for a bundle (runtime only, no torch); rewrites its manifest")
    c.add_argument("bundle")
    c.add_argument("--data", default="builtin", help="'builtin' (default) or a JSONL file of {query, documents}")
    c.add_argument("--top-k", "-k", type=int, default=10, help="the top-K the schedule must always keep (default 10)")
    c.add_argument("--method", default="auto", choices=["auto", "probe", "head", "cosine"], help="how a layer is scored")
    c.add_argument("--rule", default="auto", choices=["auto", "margin", "rank"],
                   help="margin = drop clusters scoring below the K-th best minus a calibrated margin; rank = keep a calibrated "
                        "fraction of the candidates; auto (default) = whichever saves more on the calibration data")
    c.add_argument("--safety", type=float, default=None,
                   help="multiplier over the calibration worst case (default: 1.5 for margins, 1.0 for rank fractions; "
                        "split-half validation raises it when needed)")
    c.add_argument("--queries", type=int, default=64, help="builtin data: number of queries (default 64)")
    c.add_argument("--candidates", type=int, default=48, help="builtin data: candidates per query")
    c.add_argument("--max-layers", type=int, default=4, help="at most this many pruning layers")
    c.add_argument("--memory-budget", "-m", type=_size, help="run calibration under this budget")
    c.add_argument("--json", action="store_true")

    from edge_sel.runtime.policies import REGISTRY

    policies = ", ".join(REGISTRY)
    g = cmd("generate", "generate text with a generate bundle under a KV-cache budget")
    g.epilog = f"{EXAMPLES['generate']}\npolicies: {policies} (combine with +)."
    g.add_argument("bundle")
    g.add_argument("--prompt", "-p", help="the prompt text")
    g.add_argument("--prompt-file", help="read the prompt from a UTF-8 text file")
    g.add_argument("--max-new-tokens", "-n", type=int, default=128)
    g.add_argument("--kv-budget", "-b", default=None, help="512 (tokens/layer) | 0.2 (of the prompt) | 64MB (bytes, whole cache)")
    g.add_argument("--policy", default="full", help=f"KV policy (default full): {policies}, or a+b")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template")
    g.add_argument("--system", help="system message (with --chat)")
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--json", action="store_true", help='print {"text", "tokens", "stats"} as JSON')

    qz = cmd("quantize", "write a copy of a bundle with int8 layer weights (onnxruntime dynamic quantization) and measure "
             "what it costs in ranking agreement")
    qz.add_argument("bundle")
    qz.add_argument("-o", "--out", required=True, help="bundle directory to write (atomically)")
    qz.add_argument("--weights", default="int8", choices=["int8", "uint8"])
    qz.add_argument("--no-measure", action="store_true", help="skip the agreement measurement on the builtin calibration data")
    qz.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    qz.add_argument("--json", action="store_true")

    v = cmd("verify", "check a bundle's files against its manifest (sizes and sha256)")
    v.add_argument("bundle")
    v.add_argument("--json", action="store_true")

    i = cmd("info", "summarise a bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")

    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(cmd("bench", "measure edge_sel on this device with a bundle (no torch): rerank latency and peak "
                                     "RSS, or generation prefill tokens/s and decode ms/token"))
    return p


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def cmd_models(args, console) -> int:
    from edge_sel.export import sources

    if args.models_cmd == "list":
        rows = []
        for m in sources.PACKAGED.values():
            rows.append({"name": m.name, "fetched": sources.is_fetched(m.name), "path": str(sources.packaged_path(m.name)),
                         "package": f"{m.package}=={m.version}", "family": m.family, "scoring": m.default_scoring,
                         "description": m.description})
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        from rich.table import Table

        t = Table(title="packaged models")
        for col in ("name", "fetched", "family", "scoring", "package", "path"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], "yes" if r["fetched"] else "no", r["family"], r["scoring"], r["package"], r["path"])
        console.print(t)
        return 0
    path = sources.fetch(args.name, force=args.force)
    console.print(f"[green]fetched[/] {args.name} -> {path}")
    return 0


def cmd_export(args, console) -> int:
    from edge_sel.export import export

    drop = None
    if args.drop_layers is not None:
        if args.drop_layers != "auto" and not args.drop_layers.isdigit():
            raise EdgeSelError(f"--drop-layers takes a number of layers or 'auto', got {args.drop_layers!r}")
        drop = args.drop_layers if args.drop_layers == "auto" else int(args.drop_layers)
    prog, cb = export_progress(console)
    with prog:
        out = export(args.model, args.out, task=args.task, scoring=args.scoring, max_length=args.max_length,
                     verify=args.verify, overwrite=args.force, seed=args.seed, progress=cb,
                     **({"drop_layers": drop} if drop is not None else {}), **({"calibrate": True} if args.calibrate else {}))
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.manifest import ExportInfo, thaw

    b = Bundle.open(out)
    s = b.spec
    ex = s.export or ExportInfo()
    info = {"bundle": str(out), "scoring": s.scoring, "layers": len(s.layers), "bytes": b.total_bytes(),
            "seconds": ex.seconds, "verified_max_abs_diff": ex.verified_max_abs_diff,
            "dropped_layers": list(s.dropped_layers), "schedule": thaw(s.schedule)}
    if args.json:
        print(json.dumps(info))
    else:
        msg = f"[green]bundle written[/] {out}  ({s.scoring}, {len(s.layers)} layers, {format_size(b.total_bytes())}, {ex.seconds} s)"
        if ex.verified_max_abs_diff is not None:
            msg += f"\nverified against torch: max |score diff| = {ex.verified_max_abs_diff:.2e}"
        if s.dropped_layers:
            msg += "\n" + _dropped_line(s)
        if s.schedule is not None:
            msg += "\n" + _schedule_line(s.schedule)
        console.print(msg)
    return 0


def cmd_rerank(args, console) -> int:
    from edge_sel.runtime.documents import read_documents
    from .runtime import Reranker

    docs = read_documents(args.documents)
    rr = Reranker(args.bundle, memory_budget=args.memory_budget, pruning=args.pruning)
    try:
        results = rr.rank(args.query, docs, top_k=args.top_k, return_documents=args.show_text, instruction=args.instruction)
    finally:
        rr.close()
    stats = rr.stats.public()
    if args.json:
        print(json.dumps({"results": results, "stats": stats}))
        return 0
    from rich.table import Table

    t = Table(title=f"top {len(results)} of {len(docs)} for: {args.query}")
    t.add_column("rank", justify="right")
    t.add_column("corpus_id", justify="right")
    t.add_column("score", justify="right")
    t.add_column("document")
    for n, r in enumerate(results, 1):
        text = docs[r["corpus_id"]]
        t.add_row(str(n), str(r["corpus_id"]), f"{r['score']:.4f}", textwrap.shorten(text, 90))
    console.print(t)
    console.print(f"latency {stats['latency_s']:.3f} s · peak RSS {format_size(stats['peak_rss_bytes'])} "
                  f"· window {stats['window_layers']}/{stats['n_layers']} layers · chunk {stats['chunk_size']} docs"
                  + (f" · {stats['n_truncated']} documents truncated" if stats.get("n_truncated") else ""))
    console.print(f"pruning: {stats.get('pruning')}"
                  + (f" · {stats['n_pruned']} pruned early, {100 * stats['layer_work_saved']:.0f}% of layer-work saved"
                     if stats.get("n_pruned") else ""))
    if rr.bundle.spec.dropped_layers:
        console.print(_dropped_line(rr.bundle.spec))
    return 0


def _dropped_line(spec) -> str:
    """One line on dropped layers; ``spec``: the bundle's typed manifest (or its raw JSON, parsed here)."""
    from edge_sel.runtime.manifest import Manifest

    if not isinstance(spec, Manifest):
        spec = Manifest.parse(spec)
    line = f"dropped layers (source indices): {list(spec.dropped_layers)}"
    cost = spec.drop_cost
    if cost is not None and cost.top10_overlap is not None:
        identical = cost.top10_identical if cost.top10_identical is not None else float("nan")
        line += (f" · measured on calibration text: top-10 agreement {cost.top10_overlap:.3f}, "
                 f"same top-10 set on {100 * identical:.0f}% of queries")
    return line


def _schedule_line(s) -> str:
    """One line on an early-ranking schedule (typed, or the JSON a calibration report holds)."""
    from edge_sel.runtime.manifest import Agreement, ScheduleSpec

    if not isinstance(s, ScheduleSpec):
        s = ScheduleSpec.parse(s, path="schedule")
    ag = s.agreement or Agreement()
    recall = ag.topk_recall if ag.topk_recall is not None else float("nan")
    return (f"early ranking: {s.method} ({s.rule} rule) at layers {[e.layer for e in s.layers]} for top-{s.top_k} · calibration: "
            f"top-K kept {recall:.3f}, layer-work saved {100 * (ag.layer_work_saved or 0):.0f}%")


def cmd_calibrate(args, console) -> int:
    from edge_sel.export.passes.calibrate import calibrate

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("calibrating"), BarColumn(), TextColumn("{task.completed}/{task.total} queries"),
                  TimeElapsedColumn(), console=console, transient=True, disable=args.json) as prog:
        task = prog.add_task("cal", total=None)
        rep = calibrate(args.bundle, args.data, top_k=args.top_k, method=args.method, safety=args.safety, rule=args.rule,
                        max_layers=args.max_layers, n_queries=args.queries, n_candidates=args.candidates,
                        memory_budget=args.memory_budget, progress=lambda i, n: prog.update(task, completed=i, total=n))
    if args.json:
        print(json.dumps({"bundle": rep["bundle"], "method": rep["method"], "schedule": rep["schedule"],
                          "candidates": rep["candidates"]}))
        return 0
    console.print(f"[green]calibrated[/] {rep['bundle']}")
    console.print(_schedule_line(rep["schedule"]))
    for m, c in rep["candidates"].items():
        what = "keep fractions" if m.endswith("/rank") else "margins"
        console.print(f"  {m:13s} layers {c['layers']} {what} {[round(x, 3) for x in c['params']]} · "
                      f"simulated layer-work saved {100 * c['simulated']['layer_work_saved']:.0f}%")
    return 0


def cmd_quantize(args, console) -> int:
    from edge_sel.export.passes.quantize import quantize_bundle
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.manifest import thaw

    with console.status("quantizing", spinner="dots") if not args.json else _nullcontext() as status:
        def say(msg):
            if status is not None:
                status.update(msg)
        out = quantize_bundle(args.bundle, args.out, weight_type=args.weights, measure=not args.no_measure,
                              force=args.force, say=say)
    q = Bundle.open(out).spec.quantization
    if args.json:
        print(json.dumps({"bundle": str(out), "quantization": thaw(q)}))
        return 0
    console.print(f"[green]wrote[/] {out} ({q.weights} layer weights, {q.seconds} s)")
    a = q.agreement
    if a is not None:
        console.print(f"  vs the float bundle on {a.queries} builtin queries x {a.candidates} candidates: "
                      f"max |score diff| {a.max_abs_score_diff:.2g}, top-10 overlap {a.top10_overlap:.3f}, "
                      f"top-10 identical on {100 * a.top10_identical:.0f}% of queries")
    return 0


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def cmd_verify(args, console) -> int:
    from edge_sel.runtime.bundle import Bundle

    b = Bundle.open(args.bundle, verify=False)
    b.verify()  # always the full pass (also refreshes the verification stamp)
    n = len(b.spec.files)
    if args.json:
        print(json.dumps({"bundle": str(b.root), "ok": True, "files": n, "bytes": b.total_bytes()}))
    else:
        console.print(f"[green]ok[/] {b.root}: {n} files, {format_size(b.total_bytes())}, all sizes and sha256 match")
    return 0


def cmd_info(args, console) -> int:
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.manifest import thaw

    b = Bundle.open(args.bundle)
    s = b.spec
    info = {"bundle": str(b.root), "model": thaw(s.model), "dims": thaw(s.dims), "max_length": s.max_length,
            "layers": len(s.layers), "bytes": b.total_bytes(), "dropped_layers": list(s.dropped_layers),
            "drop_cost": thaw(s.drop_cost), "quantization": thaw(s.quantization),
            "schedule": thaw(s.schedule), "export": thaw(s.export)}
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            console.print(f"[bold]{k}[/]: {v}")
    return 0


def cmd_generate(args, console) -> int:
    from edge_sel.runtime.errors import InputError
    from .runtime import Generator

    if (args.prompt is None) == (args.prompt_file is None):
        raise InputError("give exactly one of --prompt or --prompt-file")
    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"prompt file not found: {args.prompt_file}") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{args.prompt_file} is not UTF-8 text ({e})") from None
    gen = Generator(args.bundle, kv_budget=args.kv_budget, policy=args.policy)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              chat=args.chat, system=args.system)
    try:
        if args.json:
            res = gen.generate(prompt, **kw)
            print(json.dumps({"text": res.text, "tokens": res.tokens, "finish_reason": res.finish_reason,
                              "stats": gen.stats.public()}))
            return 0
        for piece in gen.stream(prompt, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        st = gen.last_stats
        ms = st.get("decode_ms_per_token")
        print(f"[{st['policy']}] prompt {st['prompt_tokens']} tok · prefill {st['prefill_s']:.2f} s · "
              f"decode {ms:.1f} ms/token · KV peak {format_size(st['kv_bytes_peak'])} "
              f"(capacity {st['kv_capacity_tokens']} tok/layer) · peak RSS {format_size(st['peak_rss_bytes'])}"
              if ms is not None else f"[{st['policy']}] prompt {st['prompt_tokens']} tok", file=sys.stderr)
        return 0
    finally:
        gen.close()


def cmd_bench(args, console) -> int:
    from .bench import command

    return command(args, console)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    console = _console()
    handlers = {"models": cmd_models, "export": cmd_export, "rerank": cmd_rerank, "verify": cmd_verify,
                "info": cmd_info, "bench": cmd_bench, "generate": cmd_generate, "calibrate": cmd_calibrate,
                "quantize": cmd_quantize}
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args, console)
        return handlers[args.command](args, console)
    except EdgeSelError as e:
        print(f"edge-sel: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-sel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
