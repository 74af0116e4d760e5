"""The ``edge-sel`` commands that rewrite an existing bundle: ``calibrate``, ``quantize`` (weight formats or
dynamic int8), ``convert`` (ORT format) and ``fuse`` (one fused early-ranking graph). Each is a few lines over its pass in :mod:`edge_sel.export.passes`."""

from __future__ import annotations

import contextlib
import json

from edge_sel.runtime.errors import EdgeSelError
from edge_sel.runtime.units import format_size

from .paths import creatable_path
from .summaries import schedule_line


def cmd_calibrate(args, console) -> int:
    from edge_sel.export.passes.calibrate import calibrate

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    kw = {k: v for k, v in (("n_queries", args.queries), ("n_candidates", args.candidates)) if v is not None}
    check = tuple(d.strip() for d in args.check.split(",") if d.strip())
    with Progress(TextColumn("calibrating"), BarColumn(), TextColumn("{task.completed}/{task.total} queries"),
                  TextColumn("{task.fields[tokens]}"), TimeElapsedColumn(), TextColumn("remaining"), TimeRemainingColumn(),
                  console=console, transient=True,
                  disable=args.json or not console.is_terminal) as prog:  # off a terminal rich leaves a blank line
        task = prog.add_task("cal", total=None, tokens="")

        def progress(i, n, info):
            done, total, sec = info["tokens_done"], info["tokens_total"], info["seconds"]
            if i == 0 and not args.json:
                console.print(f"calibrating on {n} queries ({total:,} tokens through every layer)"
                              + (f", then {args.check_queries} queries of each of {', '.join(check)}" if check else ""))
                console.print(f"estimated time for the traces: {info['estimate_s']:.0f} s "
                              f"(measured on a few candidates first: {info['tokens_per_s']:.0f} tokens/s)")
            if i == 1 and not args.json:
                console.print(f"after the first query: {sec * total / max(done, 1):.0f} s in all "
                              f"({done / max(sec, 1e-9):.0f} tokens/s)")
            prog.update(task, completed=i, total=n, tokens=f"{done:,}/{total:,} tokens")

        rep = calibrate(args.bundle, args.data, top_k=args.top_k, method=args.method, safety=args.safety, rule=args.rule,
                        max_layers=args.max_layers, memory_budget=args.memory_budget, progress=progress, check=check,
                        check_queries=args.check_queries, **kw)
    if args.json:
        print(json.dumps({"bundle": rep["bundle"], "method": rep["method"], "schedule": rep["schedule"],
                          "candidates": rep["candidates"], "off_domain": rep.get("off_domain")}))
        return 0
    console.print(f"[green]calibrated[/] {rep['bundle']}")
    console.print(schedule_line(rep["schedule"]))
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
    with console.status("converting weights", spinner="dots") if not args.json else contextlib.nullcontext() as status:
        def say(msg):
            if status is not None:
                status.update(msg)
        out = convert_bundle(args.bundle, args.out, args.weights, block_size=args.block_size,
                             accuracy_level=args.accuracy_level, measure=not args.no_measure, force=args.force,
                             say=say, gguf=args.gguf)
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
    with console.status("quantizing", spinner="dots") if not args.json else contextlib.nullcontext() as status:
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



def cmd_fuse(args, console) -> int:
    from edge_sel.export.passes.fused import fuse_bundle
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.manifest import thaw

    if args.out is not None:
        creatable_path(args.out, "-o")
    out = fuse_bundle(args.bundle, args.out, force=args.force, pruning=not args.no_pruning)
    b = Bundle.open(out)
    f = b.spec.fused
    if args.json:
        print(json.dumps({"bundle": str(out), "fused": thaw(f), "bytes": b.spec.files[f.file].size}))
        return 0
    console.print(f"[green]wrote[/] {b.root / f.file} ({format_size(b.spec.files[f.file].size)}; weights read from "
                  f"{len(f.reads)} bundle files)")
    console.print(f"  inputs {', '.join(f.inputs)} -> outputs {', '.join(f.outputs)}")
    console.print(fused_schedule_line(f))
    return 0


def fused_schedule_line(f) -> str:
    """What pruning a fused graph holds, in one line."""
    s = f.schedule
    if s is None:
        return "  no pruning compiled in: every document through every layer"
    return f"  prunes with the {s['rule']} rule ({s['method']} scores) at layers {[e['layer'] for e in s['layers']]}, protecting the top-{f.top_k}"
