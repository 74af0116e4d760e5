"""``edge-sel bench``: measure edge_sel itself on this device with a given bundle, without torch — the role
``llama-bench`` plays for llama.cpp.

A rerank bundle is timed on N candidates of about T tokens each (synthetic words cut to T tokens by the
bundle's own tokenizer, or the first N documents of a file), for every combination of memory budget and
pruning asked for. A generate bundle is timed on prompts of the given lengths (synthetic words or a
text file, tokenized by the bundle) for every combination of KV policy and KV budget: prefill tokens/s
and decode ms/token.

Each configuration runs ``warmup`` untimed calls, then ``repeats`` timed calls; the report gives the
median (and min/max) of the timed calls, and the process's peak RSS over them (the kernel high-water
mark, reset before each configuration on Linux; elsewhere a 5 ms sampler). A configuration the engine
refuses (an infeasible budget, pruning on an uncalibrated bundle) is reported with its reason instead of
stopping the run. The peer comparison against torch, optimum and kvpress is a developer script in a
checkout (``python -m benchmarks.rerank``), not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from statistics import median
from typing import Any

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import EdgeSelError, InputError
from edge_sel.runtime.memory import PeakTracker
from edge_sel.runtime.units import format_size, parse_size

# Common English words for synthetic text: realistic token statistics, no data file needed.
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education "
         "copy file read write open close list sort search find value error memory budget layer model query").split()


MAX_BENCH_DOCS = 100_000  # synthetic candidates are built in memory up front


@dataclass
class Settings:
    """What to measure. Lists are swept as a grid; ``None`` in ``memory_budgets`` / ``kv_budgets`` means
    unbounded (all layers resident / room for the whole prompt)."""

    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    # rerank bundles
    n_docs: list[int] = field(default_factory=lambda: [64])
    doc_tokens: int = 128
    documents: list[str] | None = None
    query: str | None = None
    memory_budgets: list[int | None] = field(default_factory=lambda: [None])
    pruning: list[str] = field(default_factory=lambda: ["off", "on"])
    top_k: int = 10
    spill_dir: str | os.PathLike | None = None  # where a spilling rerank writes hidden states (None: system temp)
    # generate bundles
    prompt_tokens: list[int] = field(default_factory=lambda: [512])
    new_tokens: int = 32
    policies: list[str] = field(default_factory=lambda: ["full"])
    kv_budgets: list[str | None] = field(default_factory=lambda: [None])
    prompt_text: str | None = None
    provider: str = "cpu"  # onnxruntime execution provider (edge_sel.runtime.providers)

    def check(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise InputError(f"need repeats >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        if min(self.n_docs) < 1 or self.doc_tokens < 1 or self.top_k < 1:
            raise InputError("candidate counts, --doc-tokens and --top-k must be positive")
        if max(self.n_docs) > MAX_BENCH_DOCS:
            raise InputError(f"--n-docs {max(self.n_docs)} is more candidates than this benchmark synthesizes "
                             f"(at most {MAX_BENCH_DOCS:,}); rank a real documents file with `edge-sel rerank` instead")
        if min(self.prompt_tokens) < 1 or self.new_tokens < 1:
            raise InputError("prompt lengths and --new-tokens must be positive")
        bad = [p for p in self.pruning if p not in ("off", "on", "auto")]
        if bad:
            raise InputError(f"pruning must be off, on or auto, got {bad}")


def synthetic_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def cut_to_tokens(tokenizer, text: str, n_tokens: int) -> str:
    """The longest prefix of ``text`` that ``tokenizer`` (a ``tokenizers.Tokenizer``) reads as at most
    ``n_tokens`` tokens (special tokens not counted), cut at a token boundary."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    if len(enc.ids) <= n_tokens:
        return text
    return text[: enc.offsets[n_tokens - 1][1]]


def device_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime

    try:
        ours = version("edge-sel")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        ours = None
    return {"machine": platform.machine(), "processor": platform.processor() or None, "system": platform.system(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "edge_sel": ours}


def _timed(call, settings: Settings) -> tuple[list[float], int, Any]:
    """Run ``call`` warmup + repeats times; (seconds of each timed call, peak RSS over them, last result)."""
    for _ in range(settings.warmup):
        call()
    times, out = [], None
    with PeakTracker() as peak:
        for _ in range(settings.repeats):
            t = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t)
    return times, peak.peak, out


# ---- rerank ---------------------------------------------------------------------------------------
def bundle_tokenizer(bundle: Bundle):
    """The bundle's own ``tokenizers.Tokenizer`` (no padding, no truncation): counts tokens as the engines do."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle.path(bundle.spec.tokenizer.file)))
    tok.no_padding()
    tok.no_truncation()
    return tok


def _documents(tok, settings: Settings, n: int) -> list[str]:
    if settings.documents is not None:
        docs = settings.documents
        return [docs[i % len(docs)] for i in range(n)]  # fewer documents than N: cycled
    return [cut_to_tokens(tok, synthetic_text(settings.doc_tokens, settings.seed * 100_003 + i), settings.doc_tokens)
            for i in range(n)]


def bench_rerank(bundle: Bundle, settings: Settings) -> list[dict[str, Any]]:
    from edge_sel.runtime import Reranker

    query = settings.query or synthetic_text(8, settings.seed + 7)
    tok = bundle_tokenizer(bundle)

    def measure(rr, n: int) -> dict[str, Any]:
        docs = _documents(tok, settings, n)
        tokens = [len(tok.encode(d, add_special_tokens=False).ids) for d in docs]
        times, peak, _ = _timed(lambda: rr.rank(query, docs, top_k=min(settings.top_k, n)), settings)
        st = rr.last_stats
        return {"doc_tokens_mean": sum(tokens) / len(tokens), "median_s": median(times), "min_s": min(times),
                "max_s": max(times), "docs_per_s": n / median(times), "peak_rss_bytes": peak,
                "pruning_applied": st.get("pruning"), "layer_work_saved": st.get("layer_work_saved"),
                "window_layers": st.get("window_layers"), "n_layers": st.get("n_layers"), "spill": st.get("spill"),
                "provider": st.get("provider", {}).get("provider"),
                "session_load_s": st.get("provider", {}).get("call_session_load_s"), "runs": times}

    configs = [{"memory_budget_bytes": b, "pruning": p} for b in settings.memory_budgets for p in settings.pruning]
    return _sweep(configs, lambda c: Reranker(bundle, memory_budget=c["memory_budget_bytes"], pruning=c["pruning"],
                                                spill_dir=settings.spill_dir, provider=settings.provider),
                  "n_docs", settings.n_docs, measure)


def _sweep(configs: list[dict], make, size_key: str, sizes: list[int], measure) -> list[dict[str, Any]]:
    """Build the engine of each configuration once and measure it at every size; a configuration or a
    size the engine refuses becomes a row with the reason, and the sweep goes on."""
    rows = []
    for config in configs:
        try:
            engine = make(config)
        except EdgeSelError as e:
            rows.extend({**config, size_key: n, "error": str(e)} for n in sizes)
            continue
        try:
            for n in sizes:
                row = {**config, size_key: n}
                try:
                    row.update(measure(engine, n))
                except EdgeSelError as e:
                    row["error"] = str(e)
                rows.append(row)
        finally:
            engine.close()
    return rows


# ---- generate -------------------------------------------------------------------------------------
def _prompt_ids(gen, settings: Settings) -> list[int]:
    need = max(settings.prompt_tokens)
    text = settings.prompt_text or synthetic_text(need + 16, settings.seed)
    ids = gen.encode(text)
    while len(ids) < need:  # a short prompt file: repeated until it is long enough
        ids = ids + gen.encode(text)
    return ids


def bench_generate(bundle: Bundle, settings: Settings) -> list[dict[str, Any]]:
    from edge_sel.runtime import Generator

    prompts: dict[int, list[int]] = {}  # the prompt ids, tokenized once by the first generator

    def measure(gen, n: int) -> dict[str, Any]:
        if not prompts:
            prompts[0] = _prompt_ids(gen, settings)
        prompt, stats = prompts[0][:n], []

        def call():
            stats.append(gen.generate(prompt, max_new_tokens=settings.new_tokens, stop=False).stats)

        _, peak, _ = _timed(call, settings)
        timed = stats[settings.warmup:]
        prefill = [s["prefill_s"] for s in timed]
        decode = [s["decode_ms_per_token"] for s in timed if s.get("decode_ms_per_token") is not None]
        return {"new_tokens": settings.new_tokens, "prefill_s": median(prefill), "prefill_tokens_per_s": n / median(prefill),
                "decode_ms_per_token": median(decode) if decode else None,
                "kv_bytes_peak": max(s["kv_bytes_peak"] for s in timed),
                "kv_capacity_tokens": timed[-1].get("kv_capacity_tokens"), "peak_rss_bytes": peak,
                "provider": timed[-1].get("provider", {}).get("provider"),
                "prefill_runs": prefill, "decode_runs": decode}

    configs = [{"policy": p, "kv_budget": kv} for p in settings.policies for kv in settings.kv_budgets]
    return _sweep(configs, lambda c: Generator(bundle, kv_budget=c["kv_budget"], policy=c["policy"],
                                               provider=settings.provider),
                  "prompt_tokens", settings.prompt_tokens, measure)


def run(bundle: str | os.PathLike, settings: Settings | None = None) -> dict[str, Any]:
    """Measure ``bundle`` (a rerank or generate bundle) with ``settings``; a JSON-ready report."""
    settings = settings or Settings()
    settings.check()
    b = Bundle.open(bundle)
    t0 = time.perf_counter()
    rows = bench_rerank(b, settings) if b.task == "rerank" else bench_generate(b, settings)
    return {"bundle": str(b.root), "task": b.task, "scoring": b.scoring, "device": device_info(),
            "repeats": settings.repeats, "warmup": settings.warmup, "wall_s": time.perf_counter() - t0, "rows": rows}


def table(report: dict[str, Any]):
    """The report as a ``rich`` table."""
    from rich.table import Table

    def size(v):
        return "-" if v is None else format_size(v)

    reasons: list[str] = []  # a refused configuration's reason goes under the table: in a cell it wraps down a page

    def refused(r) -> str:
        if r["error"] not in reasons:
            reasons.append(r["error"])
        return f"[red]({reasons.index(r['error']) + 1})[/]"  # short: the rerank table has ten columns

    d = report["device"]
    t = Table(title=f"edge-sel bench {report['bundle']} ({report['task']}) · {d['machine']}, {d['cpu_count']} cores, "
                    f"onnxruntime {d['onnxruntime']} · median of {report['repeats']}")
    if report["task"] == "rerank":
        cols = ("N", "tokens/doc", "budget", "pruning", "median s", "min-max s", "docs/s", "peak RSS", "layer-work saved", "window")
        for c in cols:
            t.add_column(c, justify="left" if c == "pruning" else "right")
        for r in report["rows"]:
            head = [str(r["n_docs"]), f"{r['doc_tokens_mean']:.0f}" if "doc_tokens_mean" in r else "-",
                    size(r["memory_budget_bytes"]) if r["memory_budget_bytes"] else "none", r["pruning"]]
            if "error" in r:
                t.add_row(*head, refused(r), *[""] * (len(cols) - 5))
                continue
            saved = r.get("layer_work_saved")
            t.add_row(*head, f"{r['median_s']:.3f}", f"{r['min_s']:.3f}-{r['max_s']:.3f}", f"{r['docs_per_s']:.1f}",
                      size(r["peak_rss_bytes"]), f"{100 * saved:.0f}%" if saved is not None else "-",
                      f"{r['window_layers']}/{r['n_layers']}" if r.get("n_layers") else "-")
        return _noted(t, reasons)
    cols = ("policy", "kv budget", "prompt tok", "prefill tok/s", "prefill s", "decode ms/tok", "KV peak", "peak RSS")
    for c in cols:
        t.add_column(c, justify="left" if c == "policy" else "right")
    for r in report["rows"]:
        head = [r["policy"], str(r["kv_budget"]) if r["kv_budget"] is not None else "none", str(r["prompt_tokens"])]
        if "error" in r:
            t.add_row(*head, refused(r), *[""] * (len(cols) - 4))
            continue
        ms = r["decode_ms_per_token"]
        t.add_row(*head, f"{r['prefill_tokens_per_s']:.0f}", f"{r['prefill_s']:.3f}", f"{ms:.1f}" if ms is not None else "-",
                  size(r["kv_bytes_peak"]), size(r["peak_rss_bytes"]))
    return _noted(t, reasons)


def _noted(t, reasons: list[str]):
    """The table with each refused configuration's reason, numbered, as its caption."""
    if reasons:
        t.caption = "\n".join(f"({i}) refused: {why}" for i, why in enumerate(reasons, 1))
        t.caption_justify = "left"
    return t


# ---- the `edge-sel bench` command ------------------------------------------------------------------
def _bundle_arg(text: str) -> str:
    # checked while parsing, so that the old forms' options do not hide this message behind "unrecognized arguments"
    if text in ("rerank", "generate", "train-cross-encoder") and not os.path.exists(text):
        raise argparse.ArgumentTypeError(
            f"`edge-sel bench {text}` (the comparison with torch, optimum and kvpress) is a developer script of the "
            f"source checkout: python -m benchmarks.{text.replace('-', '_')} --help; `edge-sel bench BUNDLE` measures edge_sel itself")
    return text


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("bundle", type=_bundle_arg, help="a rerank or a generate bundle")
    b.add_argument("--repeats", "-r", type=int, default=5, help="timed calls per configuration (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    b.add_argument("--seed", type=int, default=0, help="seed of the synthetic text")
    br = b.add_argument_group("rerank bundles")
    br.add_argument("--n-docs", "-n", default="64", help="candidates per query, comma-separated (default 64)")
    br.add_argument("--doc-tokens", "-t", type=int, default=128, help="tokens per synthetic candidate (default 128)")
    br.add_argument("--documents", "-d", help="use these documents instead (text, one per line, or JSONL)")
    br.add_argument("--query", "-q", help="the query (default: synthetic)")
    br.add_argument("--memory-budget", "-m", default="none", help="comma-separated sizes; none = all layers resident")
    br.add_argument("--pruning", default=None, help="comma-separated: off, on (needs a calibrated bundle), auto "
                    "(default: off,on on a calibrated bundle, off on one without a schedule)")
    br.add_argument("--top-k", "-k", type=int, default=10, help="results per call (default 10)")
    br.add_argument("--spill-dir", help="folder for hidden states spilled under a tight budget (default: system temp)")
    bg = b.add_argument_group("generate bundles")
    bg.add_argument("--prompt-tokens", "-p", default="512", help="prompt lengths in tokens, comma-separated (default 512)")
    bg.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per call (default 32)")
    bg.add_argument("--policy", default="full", help="KV policies, comma-separated (default full)")
    bg.add_argument("--kv-budget", "-b", default="none", help="comma-separated: none, 512 (tokens), 0.2 (of the prompt), 64MB")
    bg.add_argument("--prompt-file", help="prompt text (default: synthetic), repeated when shorter than a length")
    b.add_argument("--provider", default="cpu", help="onnxruntime execution provider: cpu (default), auto, coreml, ...")
    b.add_argument("--json", action="store_true", help="print the report as JSON")


def _csv(text: str, convert=str, none_ok: bool = False) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise InputError(f"expected a comma-separated list, got {text!r}")
    if not none_ok and any(x.lower() == "none" for x in items):
        raise InputError(f"{text!r}: 'none' is only allowed in --memory-budget and --kv-budget")
    try:
        return [None if x.lower() == "none" else convert(x) for x in items]
    except ValueError as e:
        raise InputError(f"{text!r}: {e}") from None


# options of one task given explicitly (not at their defaults) to a bundle of the other task are refused
_TASK_OPTIONS = {"rerank": {"n_docs": "64", "doc_tokens": 128, "documents": None, "query": None, "memory_budget": "none",
                            "pruning": None, "top_k": 10, "spill_dir": None},
                 "generate": {"prompt_tokens": "512", "new_tokens": 32, "policy": "full", "kv_budget": "none",
                              "prompt_file": None}}


def _check_task(args: argparse.Namespace, task: str) -> None:
    for other, options in _TASK_OPTIONS.items():
        if other == task:
            continue
        given = [f"--{k.replace('_', '-')}" for k, default in options.items() if getattr(args, k) != default]
        if given:
            raise InputError(f"{args.bundle} is a {task} bundle; {', '.join(given)} only apply to {other} bundles")


def command(args: argparse.Namespace, console) -> int:
    """``edge-sel bench``: parse the lists, run, print a table or JSON."""
    from edge_sel.runtime.documents import read_documents

    from edge_sel.runtime.providers import resolve

    from .paths import writable_dir

    resolve(args.provider)  # a provider this onnxruntime lacks: one line, before anything loads
    prompt_text = None
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt_text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read prompt file {args.prompt_file}: {e}") from None
    bundle = Bundle.open(args.bundle)
    _check_task(args, bundle.task)
    pruning = args.pruning  # unasked, "on" is measured only where a schedule exists (else it is a refused row)
    if pruning is None:
        pruning = "off,on" if bundle.task == "rerank" and bundle.spec.schedule is not None else "off"
    settings = Settings(
        repeats=args.repeats, warmup=args.warmup, seed=args.seed, n_docs=_csv(args.n_docs, int), doc_tokens=args.doc_tokens,
        documents=read_documents(args.documents) if args.documents else None, query=args.query,
        memory_budgets=_csv(args.memory_budget, parse_size, none_ok=True), pruning=_csv(pruning), top_k=args.top_k,
        prompt_tokens=_csv(args.prompt_tokens, int), new_tokens=args.new_tokens, policies=_csv(args.policy),
        kv_budgets=_csv(args.kv_budget, none_ok=True), prompt_text=prompt_text,
        spill_dir=writable_dir(args.spill_dir, "--spill-dir"), provider=args.provider)
    report = run(args.bundle, settings)
    if report["rows"] and all("error" in r for r in report["rows"]):  # nothing measured: the reason is the answer
        raise InputError(f"no configuration could run: {report['rows'][0]['error']}")
    if args.json:
        print(json.dumps(report))
    else:
        console.print(table(report))
    return 0
