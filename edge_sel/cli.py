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
import re
import signal
import sys
import textwrap
from pathlib import Path

from edge_sel.runtime.errors import EdgeSelError, InputError
from edge_sel.runtime.units import format_size

from .crash import report_crash
from .paths import creatable_path, writable_dir
from .parser import build_parser
from .pass_commands import cmd_calibrate, cmd_convert, cmd_fuse, cmd_quantize
from .progress import export_progress
from .summaries import dropped_line, schedule_line

def _console():
    from rich.console import Console

    # Off a terminal (a pipe, a log file) a line is not folded at rich's default 80 columns: a folded 'wrote PATH'
    # or plan line breaks whatever reads it; tables get 160 columns there (COLUMNS still wins), so the device and
    # bench tables' figures and headers are not cut to fit 80.
    piped = not sys.stdout.isatty()
    width = 160 if piped and not os.environ.get("COLUMNS") else None
    return Console(stderr=False, highlight=False, soft_wrap=piped, width=width)


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
        for col in ("name", "fetched", "family", "scoring"):  # the name is what `models fetch` and `export` take
            t.add_column(col, no_wrap=True)
        for col in ("package", "path"):
            t.add_column(col, overflow="fold")  # folded, not cut with an ellipsis: the path is there to be copied
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
    if args.fused and (args.task != "rerank" or args.format == "ort"):
        raise EdgeSelError("--fused composes a rerank bundle's ONNX graphs: it needs --task rerank and cannot be combined "
                           "with --format ort")
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
    if args.fused:
        from edge_sel.export.passes.fused import fuse_bundle

        fuse_bundle(out)
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
    if s.fused is not None:
        info["fused"] = thaw(s.fused)
    if args.json:
        print(json.dumps(info))
    else:
        msg = f"[green]bundle written[/] {out}  ({s.scoring}, {len(s.layers)} layers, {format_size(b.total_bytes())}, {ex.seconds} s)"
        if ex.verified_max_abs_diff is not None:
            what = "logit" if s.model.task == "generate" else "score"
            msg += f"\nverified against torch: max |{what} diff| = {ex.verified_max_abs_diff:.2e}"
        if s.dropped_layers:
            msg += "\n" + dropped_line(s)
        if s.schedule is not None:
            msg += "\n" + schedule_line(s.schedule)
        if s.fused is not None:
            msg += f"\nfused graph: {s.fused.file} (inputs {', '.join(s.fused.inputs)})"
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
        console.print(dropped_line(rr.bundle.spec))
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
    if s.weights is not None:  # fp16 / int8 / int4 (format version 2): the format and its measured agreement
        info["weights"] = {k: v for k, v in thaw(s.weights).items() if k != "tensors"}
    if s.fused is not None:
        info["fused"] = thaw(s.fused)
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
    if args.prompt_file == "-":  # standard input, as `rerank -d -`
        try:
            return sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"standard input is not UTF-8 text ({e})") from None
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


def console_main() -> int:
    """The ``edge-sel`` command: a process of its own, so the generate engine may use the shared thread pool
    (``edge_sel.runtime.sessions.own_process``); ``main`` called from a program leaves that program's pools alone."""
    from edge_sel.runtime.sessions import own_process

    own_process()
    return main()


def main(argv: list[str] | None = None) -> int:
    signals: list[int] = []
    previous = _raise_on_sigterm(signals)
    try:
        return _run(argv, signals)
    except KeyboardInterrupt:  # a second signal while the first was being cleaned up and reported
        return 128 + signals[0] if signals else 130
    finally:
        if signals:  # about to exit: interpreter teardown would restore the default handler, and a repeated SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # would then kill the process instead of letting it exit 143
        elif previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None, signals: list[int]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    console = _console()
    handlers = {"models": cmd_models, "export": cmd_export, "rerank": cmd_rerank, "verify": cmd_verify,
                "info": cmd_info, "bench": cmd_bench, "generate": cmd_generate, "calibrate": cmd_calibrate,
                "quantize": cmd_quantize, "convert": cmd_convert, "fuse": cmd_fuse, "profile": cmd_profile, "devices": cmd_devices,
                "plan": cmd_plan}
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
    except OSError as e:
        if not disk_full(e):
            print(f"edge-sel: internal error: {report_crash()}", file=sys.stderr)
            return 1
        # the machine's state, not a bug: the writers have removed their partial output
        print(f"edge-sel: error: no space left on the device ({e}); free some space or write elsewhere", file=sys.stderr)
        return 2
    except Exception:  # a bug, not a user error: one line saying where the traceback went
        print(f"edge-sel: internal error: {report_crash()}", file=sys.stderr)
        return 1


def disk_full(e: OSError) -> bool:
    """A write that failed for want of space: ENOSPC / EDQUOT, or numpy's own messages (it raises them without an
    errno: ``tofile`` "N requested and M written", memmap's "Not enough free space to write ...")."""
    import errno

    return e.errno in (errno.ENOSPC, errno.EDQUOT) or (e.errno is None and (
        "Not enough free space" in str(e) or re.fullmatch(r"\d+ requested and \d+ written", str(e)) is not None))


def _raise_on_sigterm(signals: list[int]):
    """Handle SIGTERM like Ctrl-C, so partial outputs are removed; returns the previous handler (None when not on
    the main thread, where handlers cannot be installed)."""
    def handler(signum, frame):
        signals.append(signum)
        if len(signals) == 1:  # a repeated SIGTERM must not interrupt the cleanup the first one started
            raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(console_main())
