"""The ``edge-sel`` command line. Every subcommand has ``--help`` with examples.
Long because it is the one dispatcher of every subcommand; each handler is a few lines over the library call.

User errors (bad input, missing files, infeasible budgets) print one message and exit with code 2; an unexpected
internal error prints one line naming the log file that holds its traceback (``EDGE_SEL_DEBUG=1``: the traceback
itself) and exits with code 1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import textwrap
from pathlib import Path

from edge_sel.runtime.errors import EdgeSelError, InputError
from edge_sel.runtime.units import format_size

from .crash import report_crash
from .paths import creatable_path, writable_dir
from .parser import build_parser
from .progress import export_progress

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

    if args.max_length is not None and args.max_length <= 0:
        raise EdgeSelError(f"--max-length must be a positive number of tokens, got {args.max_length}")
    if args.weights not in ("fp32", "fp16", "int8", "int4"):
        raise EdgeSelError(f"--weights {args.weights!r} is not a weight format; choose fp32, fp16, int8 or int4")
    creatable_path(args.out, "-o")
    drop = None
    if args.drop_layers is not None:
        if args.drop_layers != "auto" and not args.drop_layers.isdigit():
            raise EdgeSelError(f"--drop-layers takes a number of layers or 'auto', got {args.drop_layers!r}")
        drop = args.drop_layers if args.drop_layers == "auto" else int(args.drop_layers)
    prog, cb = export_progress(console)
    with prog:
        out = export(args.model, args.out, task=args.task, scoring=args.scoring, max_length=args.max_length,
                     verify=args.verify, overwrite=args.force, seed=args.seed, progress=cb, weights=args.weights,
                     **({"drop_layers": drop} if drop is not None else {}), **({"calibrate": True} if args.calibrate else {}),
                     **({"format": args.format} if args.format != "onnx" else {}),
                     **({"coreml_precision": args.coreml_precision} if args.format == "coreml" else {}))
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.manifest import ExportInfo, thaw

    b = Bundle.open(out)
    s = b.spec
    ex = s.export or ExportInfo()
    info = {"bundle": str(out), "scoring": s.scoring, "layers": len(s.layers), "bytes": b.total_bytes(),
            "seconds": ex.seconds, "verified_max_abs_diff": ex.verified_max_abs_diff,
            "dropped_layers": list(s.dropped_layers), "schedule": thaw(s.schedule)}
    if s.coreml is not None:
        info["coreml"] = s.coreml_summary()
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
        if s.coreml is not None:
            c = info["coreml"]
            msg += (f"\nCoreML: {c['packages']} {c['precision']} ML Program packages, {format_size(c['bytes'])} "
                    f"({format_size(c['weight_bytes'])} of weights)")
        console.print(msg)
    return 0


def cmd_rerank(args, console) -> int:
    from edge_sel.runtime.documents import DocumentsFile
    from .runtime import Reranker

    spill_dir = writable_dir(args.spill_dir, "--spill-dir")
    # checked in one pass up front, then read batch by batch while the engine tokenizes (never held whole)
    with DocumentsFile(args.documents, spool_dir=spill_dir) as docs:
        rr = Reranker(args.bundle, memory_budget=args.memory_budget, pruning=args.pruning, spill_dir=spill_dir,
                      provider=args.provider, shadow=args.shadow)
        try:
            if args.instruction is not None and rr.bundle.spec.prompt is None:
                raise InputError(f"--instruction is the <Instruct> line of a decoder reranker's prompt; {args.bundle} is "
                                 f"a {rr.bundle.spec.model.scoring} bundle, which has no prompt")
            results = rr.rank(args.query, docs, top_k=args.top_k, return_documents=True, instruction=args.instruction)
        finally:
            rr.close()
    texts = {r["corpus_id"]: (r["text"] if args.show_text else r.pop("text")) for r in results}
    stats = rr.stats.public()
    if args.json:
        print(json.dumps({"results": results, "stats": stats, "plan": _rerank_plan_vs_measured(rr)}))
        return 0
    from rich.table import Table

    t = Table(title=f"top {len(results)} of {len(docs)} for: {args.query}")
    t.add_column("rank", justify="right")
    t.add_column("corpus_id", justify="right")
    t.add_column("score", justify="right")
    t.add_column("document")
    for n, r in enumerate(results, 1):
        text = texts[r["corpus_id"]]
        t.add_row(str(n), str(r["corpus_id"]), f"{r['score']:.4f}", textwrap.shorten(text, 90))
    console.print(t)
    console.print(f"latency {stats['latency_s']:.3f} s · peak RSS {format_size(stats['peak_rss_bytes'])} "
                  f"· window {stats['window_layers']}/{stats['n_layers']} layers · chunk {stats['chunk_size']} docs"
                  f" · provider {stats['provider']['provider']}"
                  + (f" · {stats['n_truncated']} documents truncated" if stats.get("n_truncated") else ""))
    console.print(f"pruning: {stats.get('pruning')}"
                  + (f" · {stats['n_pruned']} pruned early, {100 * stats['layer_work_saved']:.0f}% of layer-work saved"
                     if stats.get("n_pruned") else ""))
    if rr.bundle.spec.dropped_layers:
        console.print(_dropped_line(rr.bundle.spec))
    sh = stats.get("shadow")
    if sh:
        console.print(f"shadow: {'ran' if sh['last'].get('ran') else 'not run'} this call"
                      + (f" ({'top-K matched' if sh['last'].get('matched') else 'MISS: schedule tightened'})" if sh["last"].get("ran") else "")
                      + f" · {sh['runs']} runs, {sh['misses']} misses so far")
    return 0


def _rerank_plan_vs_measured(rr) -> dict:
    """The plan's memory estimate (by component, bytes above idle) next to what the call measured."""
    from edge_sel.devices.planner import rerank_memory_of_call

    st = rr.stats.as_dict()
    measured = {k: st.get(k) for k in ("peak_rss_bytes", "start_rss_bytes", "spill_bytes_written", "spill_bytes_read",
                                       "heap_trims")}
    measured["growth_bytes"] = st["peak_rss_bytes"] - st["start_rss_bytes"]
    return {"estimate": rerank_memory_of_call(rr, st), "components": st["plan_estimate"],
            "measured": measured}


def _generate_plan_vs_measured(gen) -> dict:
    from edge_sel.devices.planner import generate_memory

    st = gen.last_stats
    return {"estimate": generate_memory(gen.bundle, st),
            "measured": {k: st.get(k) for k in ("kv_bytes_peak", "kv_bytes_allocated", "peak_rss_bytes")}}


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

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    kw = {k: v for k, v in (("n_queries", args.queries), ("n_candidates", args.candidates)) if v is not None}
    check = tuple(d.strip() for d in args.check.split(",") if d.strip())
    with Progress(TextColumn("calibrating"), BarColumn(), TextColumn("{task.completed}/{task.total} queries"),
                  TextColumn("{task.fields[tokens]}"), TimeElapsedColumn(), TextColumn("remaining"), TimeRemainingColumn(),
                  console=console, transient=True, disable=args.json) as prog:
        task = prog.add_task("cal", total=None, tokens="")

        def progress(i, n, info):
            done, total, sec = info["tokens_done"], info["tokens_total"], info["seconds"]
            if i == 0 and not args.json:
                console.print(f"calibrating on {n} queries ({total:,} tokens through every layer)"
                              + (f", then {args.check_queries} queries of each of {', '.join(check)}" if check else ""))
            if i == 1 and not args.json:
                console.print(f"estimated time for the traces: {sec * total / max(done, 1):.0f} s "
                              f"(from the first query: {done / max(sec, 1e-9):.0f} tokens/s)")
            prog.update(task, completed=i, total=n, tokens=f"{done:,}/{total:,} tokens")

        rep = calibrate(args.bundle, args.data, top_k=args.top_k, method=args.method, safety=args.safety, rule=args.rule,
                        max_layers=args.max_layers, memory_budget=args.memory_budget, progress=progress, check=check,
                        check_queries=args.check_queries, **kw)
    if args.json:
        print(json.dumps({"bundle": rep["bundle"], "method": rep["method"], "schedule": rep["schedule"],
                          "candidates": rep["candidates"], "off_domain": rep.get("off_domain")}))
        return 0
    console.print(f"[green]calibrated[/] {rep['bundle']}")
    console.print(_schedule_line(rep["schedule"]))
    for m, c in rep["candidates"].items():
        what = {"rank": "keep fractions", "spread": "spread margins"}.get(m.split("/")[-1], "margins")
        off = "".join(f" · {d}: top-{rep['top_k']} same {100 * r[m]['topk_identical']:.0f}%, saved {100 * r[m]['layer_work_saved']:.0f}%"
                      for d, r in (rep.get("off_domain") or {}).items() if m in r)
        console.print(f"  {m:13s} layers {c['layers']} {what} {[round(x, 3) for x in c['params']]} · "
                      f"simulated layer-work saved {100 * c['simulated']['layer_work_saved']:.0f}%{off}")
    return 0


def _convert_weights(args, console) -> int:
    from edge_sel.export.passes.weights import convert_bundle
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.manifest import thaw

    if args.weights == "uint8":
        raise EdgeSelError("--weights uint8 exists for --method dynamic only; weight-only formats are fp16, int8, int4")
    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        raise EdgeSelError(f"--block-size must be a power of two >= 16, got {args.block_size}")
    with console.status("converting weights", spinner="dots") if not args.json else _nullcontext() as status:
        def say(msg):
            if status is not None:
                status.update(msg)
        out = convert_bundle(args.bundle, args.out, args.weights, block_size=args.block_size,
                             measure=not args.no_measure, force=args.force, say=say)
    b = Bundle.open(out)
    wspec = b.spec.weights
    if args.json:
        print(json.dumps({"bundle": str(out), "weights": thaw(wspec), "bytes": b.total_bytes()}))
        return 0
    console.print(f"[green]wrote[/] {out} ({wspec.format} weights, {b.total_bytes() / 1e6:.1f} MB, {wspec.seconds} s)")
    _print_agreement(console, wspec.agreement)
    return 0


def _print_agreement(console, a) -> None:
    """A converted bundle's measured agreement with its float source (nothing when it was not measured)."""
    if a is not None:
        console.print(f"  vs the float bundle on {a.queries} builtin queries x {a.candidates} candidates: "
                      f"max |score diff| {a.max_abs_score_diff:.2g}, top-10 overlap {a.top10_overlap:.3f}, "
                      f"top-10 identical on {100 * a.top10_identical:.0f}% of queries")


def cmd_quantize(args, console) -> int:
    from edge_sel.export.passes.quantize import quantize_bundle
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.manifest import thaw

    if args.weights not in ("fp16", "int8", "int4", "uint8"):
        raise EdgeSelError(f"--weights {args.weights!r} is not a weight format; choose fp16, int8 or int4 "
                           "(or int8 / uint8 with --method dynamic)")
    creatable_path(args.out, "-o")
    if args.method == "weight-only":
        return _convert_weights(args, console)
    if args.weights not in ("int8", "uint8"):
        raise EdgeSelError(f"--method dynamic quantizes to int8 or uint8, not {args.weights}")
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
    _print_agreement(console, q.agreement)
    return 0


def cmd_convert(args, console) -> int:
    from edge_sel.export.passes.ort_format import convert_to_ort
    from edge_sel.runtime.bundle import Bundle

    if args.out is not None:
        creatable_path(args.out, "-o")
    out = convert_to_ort(args.bundle, args.out, level=args.optimization, force=args.force)
    b = Bundle.open(out)
    ops = dict(b.spec.ort.operators or {})
    if args.json:
        print(json.dumps({"bundle": str(out), "graph_format": b.spec.graph_format, "required_operators": b.spec.ort.required_operators,
                          "operators": ops, "bytes": b.total_bytes()}))
        return 0
    console.print(f"[green]wrote[/] {out} (ORT-format graphs, {format_size(b.total_bytes())}); operator config for a reduced "
                  f"build: {b.root / b.spec.ort.required_operators}")
    for domain, names in ops.items():
        console.print(f"  {domain}: {', '.join(names)}")
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


def read_prompt(args) -> str:
    """The prompt of ``generate``'s arguments: ``--prompt`` or the text of ``--prompt-file``."""
    if args.system is not None and not args.chat:
        raise InputError("--system is a chat message: add --chat (it wraps the prompt in the bundle's chat template)")
    if (args.prompt is None) == (args.prompt_file is None):
        raise InputError("give exactly one of --prompt or --prompt-file")
    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"prompt file not found: {args.prompt_file}") from None
        except IsADirectoryError:
            raise InputError(f"--prompt-file {args.prompt_file} is a directory, not a text file") from None
        except OSError as e:
            raise InputError(f"cannot read prompt file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{args.prompt_file} is not UTF-8 text ({e})") from None
    return prompt


def cmd_generate(args, console) -> int:
    from .runtime import Generator

    prompt = read_prompt(args)
    gen = Generator(args.bundle, kv_budget=args.kv_budget, policy=args.policy, provider=args.provider)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
              chat=args.chat, system=args.system)
    try:
        if args.json:
            res = gen.generate(prompt, **kw)
            print(json.dumps({"text": res.text, "tokens": res.tokens, "finish_reason": res.finish_reason,
                              "stats": gen.stats.public(), "plan": _generate_plan_vs_measured(gen)}))
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


def cmd_profile(args, console) -> int:
    from .profile import command

    return command(args, console)


def cmd_devices(args, console) -> int:
    from .devices_cli import cmd_devices as run

    return run(args, console)


def cmd_plan(args, console) -> int:
    from .devices_cli import cmd_plan as run

    return run(args, console)


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
                "quantize": cmd_quantize, "convert": cmd_convert, "profile": cmd_profile, "devices": cmd_devices,
                "plan": cmd_plan}
    signals: list[int] = []
    previous = _raise_on_sigterm(signals)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args, console)
        return handlers[args.command](args, console)
    except EdgeSelError as e:
        print(f"edge-sel: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (timeout, systemd, docker): the writers' cleanup has run
        print("edge-sel: interrupted", file=sys.stderr)
        return 128 + signals[0] if signals else 130
    except Exception:  # a bug, not a user error: one line saying where the traceback went
        print(f"edge-sel: internal error: {report_crash()}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm(signals: list[int]):
    """Handle SIGTERM like Ctrl-C, so partial outputs are removed; returns the previous handler (None when not on
    the main thread, where handlers cannot be installed)."""
    def handler(signum, frame):
        signals.append(signum)
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
