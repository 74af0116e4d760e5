"""``python -m benchmarks.perplexity``: KV eviction judged by perplexity on windows no default was tuned on.

Windows (:mod:`benchmarks.ppl_texts`): 1792-token prefixes (BOS + text) compressed, the next 256 tokens teacher-forced
over the compressed cache (uncompressed themselves), 10 windows over *Botchan* and 6 over *Alice's Adventures in
Wonderland*, alternating between a **tune** half and a **held** half fixed in the code. Every configuration sees
the same token ids (the bundle's tokenizer). The number reported is each system's perplexity **ratio to its own
full cache** on the same window, ``exp(nll - nll_full)``, and its geometric mean over the split's windows.

Configurations, side by side in one run: ``edge_sel full`` and every ``--policies`` policy at every ``--ratios``
kept fraction (all in one process, scored in lockstep: :mod:`benchmarks.ppl_lockstep`), and ``kvpress full``
and every ``--presses`` press at the same kept fractions (``compression_ratio = 1 - ratio``), run in kvpress
0.5.5's own venv (:mod:`benchmarks.peer_env`) on the same weights as the bundle (:mod:`benchmarks.prepare`).
A policy may carry options: ``mpcache_ea:recent_frac=0.3:per_head_budget=0`` builds ``REGISTRY[name](**options)``
(``a|b`` is a list: ``mpcache_ea_mix:mix_recent=0.125|0.25``).

    python -m benchmarks.perplexity --bundle B --fast                      # 2 tuning windows, for development
    python -m benchmarks.perplexity --bundle B --split tune --presses none # choose defaults
    python -m benchmarks.perplexity --bundle B --split held --out ppl.json --markdown ppl.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import child_env, module_cmd
from .ppl_texts import CONT, PREFIX, window_ids, windows

PRESSES = ("ExpectedAttentionPress", "KVzipPress", "SnapKVPress", "StreamingLLMPress", "TOVAPress", "KnormPress")
POLICIES = ("mpcache", "mpcache_ea", "mpcache_recall", "streaming_llm", "snapkv")
HERE = Path(__file__).resolve().parent


def parse_policy(spec: str):
    """``name`` or ``name:key=value:...`` -> (label, a factory of a fresh policy or the name)."""
    name, *opts = spec.split(":")
    if not opts:
        return spec, name
    kw = {}

    def value(v):
        try:
            return json.loads(v)  # numbers, true/false, null
        except json.JSONDecodeError:
            return v

    for o in opts:
        k, _, v = o.partition("=")
        kw[k] = [value(x) for x in v.split("|")] if "|" in v else value(v)  # a|b: a list (commas split --policies)

    def make():
        from edge_sel.runtime.policies import REGISTRY

        return REGISTRY[name](**kw)

    return spec, make


def geo_ratio(nll: dict, full: dict, names: list[str]) -> float | None:
    """Geometric mean over ``names`` of ``exp(nll - nll_full)`` (None when a window is missing)."""
    d = [nll[n] - full[n] for n in names if n in nll and n in full]
    return math.exp(sum(d) / len(d)) if d and len(d) == len(names) else None


# ---- workers --------------------------------------------------------------------------------------
def _worker_edge_sel(cfg: dict) -> None:
    from edge_sel.runtime.generate import Generator

    from .ppl_lockstep import score_lockstep

    gen = Generator(cfg["bundle"], threads=cfg.get("threads") or None)
    configs = [("edge_sel full", "full", None)]
    for spec in cfg["policies"]:
        label, factory = parse_policy(spec)
        configs += [(f"edge_sel {label} @{r:g}", factory, r) for r in cfg["ratios"]]
    res: dict = {"windows": {}}
    for wname, w in cfg["windows"].items():
        t0 = time.perf_counter()
        got = score_lockstep(gen, w["prefix"], w["cont"], configs)
        for name, r in got.items():
            res["windows"].setdefault(name, {})[wname] = {"nll": r["nll"], "kept": r["kept"][0]} | {
                k: r[k] for k in ("fetch", "compress_s", "suffix_ms_per_token", "cold") if r.get(k)}
        print(f"edge_sel {wname}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        Path(cfg["result"]).write_text(json.dumps(res))


def _start(cmd: list[str], log_path: str):
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))


# ---- tables ---------------------------------------------------------------------------------------
def measured(doc: dict) -> set[str]:
    """Windows every configuration of every system has a result for (an interrupted run reports on those)."""
    runs = [per for sy in ("edge_sel", "kvpress") for per in doc.get(sy, {}).values()]
    return {n for n in doc["windows"] if runs and all("nll" in per.get(n, {}) for per in runs)}


def summarize(doc: dict) -> dict:
    """``{config: {split/book key: geometric-mean ratio}}`` over the windows measured, per system's own full cache."""
    wins = {n: w for n, w in doc["windows"].items() if n in measured(doc)}
    keys = {"all": list(wins)}
    for n, w in wins.items():
        keys.setdefault(w["split"], []).append(n)
        keys.setdefault(f"{w['split']} {w['book']}", []).append(n)
    out = {}
    for system in ("edge_sel", "kvpress"):
        runs = doc.get(system, {})
        full = {n: v["nll"] for n, v in runs.get(f"{system} full", {}).items() if "nll" in v}
        for name, per in runs.items():
            nll = {n: v["nll"] for n, v in per.items() if "nll" in v}
            out[name] = {k: geo_ratio(nll, full, names) for k, names in keys.items()}
            out[name]["full_ppl"] = {n: math.exp(v) for n, v in full.items()} if name.endswith(" full") else None
    return out


def merge_runs(doc: dict, other: dict, systems: list[str], path: str) -> None:
    """Put ``other``'s results of the systems not run now into ``doc``; several earlier runs of one system combine
    window by window (a configuration measured on some windows in one run and on others in another)."""
    for sy in ("edge_sel", "kvpress"):
        if sy in other and sy not in systems:
            for name, per in other[sy].items():
                doc.setdefault(sy, {}).setdefault(name, {}).update(per)
            doc.setdefault("merged", {}).setdefault(sy, []).append({"from": path, "commit": other.get("commit")})


def _ratio_of(name: str) -> float | None:
    return float(name.rsplit("@", 1)[1]) if "@" in name else None


def markdown(doc: dict, split: str, chosen: str | None = None) -> str:
    """The table for ``split``; the verdict per ratio is for ``chosen`` (the policy chosen on the tuning half), and the
    best edge_sel row per ratio is bold only for information (picking it on the same windows would be tuning to them)."""
    s = summarize(doc)
    ratios = sorted({r for n in s if (r := _ratio_of(n)) is not None}, reverse=True)
    base = sorted({n.rsplit(" @", 1)[0] for n in s if _ratio_of(n) is not None}, key=lambda n: (not n.startswith("edge_sel"), n))
    done = measured(doc)
    books = sorted({w["book"] for n, w in doc["windows"].items() if w["split"] == split and n in done})
    nwin = sum(1 for n, w in doc["windows"].items() if w["split"] == split and n in done)
    fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"Perplexity ratio to the system's own full cache, geometric mean over the {nwin} `{split}` windows "
             f"({', '.join(books)}); {PREFIX}-token compressed prefix, {CONT} tokens scored.", ""]
    hdr = ["config"] + [f"{r:g} kept" for r in ratios] + [f"{r:g} {b}" for r in ratios for b in books]
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    best = {}
    for r in ratios:
        for sys_ in ("edge_sel", "kvpress"):
            vals = [(s[n].get(split), n) for n in s if _ratio_of(n) == r and n.startswith(sys_) and s[n].get(split)]
            if vals:
                best[(sys_, r)] = min(vals)
    for b in base:
        row = [b]
        for r in ratios:
            v = s.get(f"{b} @{r:g}", {}).get(split)
            bold = any(best.get((sy, r), (None, None))[1] == f"{b} @{r:g}" for sy in ("edge_sel", "kvpress"))
            row.append(f"**{fmt(v)}**" if bold and v is not None else fmt(v))
        row += [fmt(s.get(f"{b} @{r:g}", {}).get(f"{split} {bk}")) for r in ratios for bk in books]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for sys_ in ("edge_sel", "kvpress"):
        f = doc.get(sys_, {}).get(f"{sys_} full", {})
        names = [n for n, w in doc["windows"].items() if w["split"] == split and n in done and "nll" in f.get(n, {})]
        if names:
            lines.append(f"- {sys_} full-cache perplexity per window: "
                         + ", ".join(f"{n} {math.exp(f[n]['nll']):.2f}" for n in names))
    for r in ratios:
        k = best.get(("kvpress", r))
        mine = s.get(f"edge_sel {chosen} @{r:g}", {}).get(split) if chosen else None
        if k and mine is not None:
            verdict = "met" if mine <= k[0] + 1e-12 else "NOT met"
            lines.append(f"- {r:g} kept: edge_sel `{chosen}` (chosen on the tuning half) {mine:.3f} vs the best press "
                         f"here, {k[1].split(' ', 1)[1].rsplit(' @', 1)[0]}, {k[0]:.3f}: {verdict}")
    return "\n".join(lines) + "\n"


# ---- driver ---------------------------------------------------------------------------------------
def press_run(spec: str, ratio: float) -> dict:
    """The kvpress worker's run of ``spec`` (a press class, options as ``Class:key=value:...``, values JSON) at ``ratio`` kept."""
    from .generate import compression_ratio, press_label

    cls, *opts = spec.split(":")
    kw = {k: json.loads(v) for k, _, v in (o.partition("=") for o in opts)}
    label = press_label(cls) + "".join(f":{o}" for o in opts)
    return {"name": f"kvpress {label} @{ratio:g}", "press": cls, "press_kw": kw, "compression_ratio": compression_ratio(ratio)}


def kv_parser(prog: str, doc: str | None, bundle_required: bool) -> argparse.ArgumentParser:
    """The options the KV-quality benchmarks share (this one and ``benchmarks.needles_heldout``)."""
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{prog}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=bundle_required, help="a generate bundle (edge-sel export MODEL --task generate)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = kv_parser("perplexity", __doc__, bundle_required=False)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the same model for kvpress")
    ap.add_argument("--split", default="held", choices=["tune", "held", "all", "extra"],
                    help="extra: a robustness check on windows neither half used (midpoints between them)")
    ap.add_argument("--fast", action="store_true", help="the split's first window of each book only (development)")
    ap.add_argument("--windows", help="only these windows of the split (comma-separated names, e.g. botchan@28179)")
    ap.add_argument("--ratios", default="0.2,0.1,0.05", help="fractions of the context kept")
    ap.add_argument("--policies", default=",".join(POLICIES), help="edge_sel policies (name or name:key=value:...)")
    ap.add_argument("--presses", default=",".join(PRESSES), help="kvpress presses (class names, options as Class:key=value; 'none' = no kvpress)")
    ap.add_argument("--threads", type=int, default=1, help="threads per worker (1: the two workers run side by side)")
    ap.add_argument("--systems", default="edge_sel,kvpress", help="which workers to run now")
    ap.add_argument("--merge", action="append", default=[],
                    help="a results JSON of an earlier run on the same token ids (checked), or a worker's OUT.<system>.json "
                         "(its window names checked): its systems join the table")
    ap.add_argument("--chosen", help="the edge_sel policy label chosen on the tuning half: the verdict lines judge it")
    ap.add_argument("--out", help="results JSON (raw NLL per configuration and window); workers write OUT.<system>.json as they go")
    ap.add_argument("--resume", action="store_true", help="kvpress: keep the runs OUT.kvpress.json already holds")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        _worker_edge_sel(json.loads(Path(a.worker).read_text()))
        return 0
    if not a.bundle:
        ap.error("--bundle is required")
    ratios = [float(x) for x in a.ratios.split(",") if x]
    if any(not 0 < r < 1 for r in ratios):
        ap.error("--ratios must be fractions in (0, 1)")
    presses = [p for p in a.presses.split(",") if p and p != "none"]
    policies = [p for p in a.policies.split(",") if p]
    from .generate import _tokenizer  # the bundle's own tokenizer.json

    from edge_sel.runtime.bundle import Bundle

    bundle = str(Path(a.bundle).absolute())
    tok = _tokenizer(bundle)
    wins = windows(a.split)
    if a.fast:
        wins = [next(w for w in wins if w.book == b) for b in ("botchan", "alice")]
    if a.windows:
        wins = [w for w in wins if w.name in a.windows.split(",")]
    ids = window_ids(lambda t: tok.encode(t, add_special_tokens=False).ids, wins, bos=Bundle.open(bundle).spec.bos_id)
    doc = {"args": {k: v for k, v in vars(a).items() if k != "worker"},
           "windows": {n: {"book": w["book"], "split": w["split"]} for n, w in ids.items()},
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()}
    payload = {n: {"prefix": w["prefix"], "cont": w["cont"]} for n, w in ids.items()}
    doc["ids_sha256"] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    systems = [s for s in a.systems.split(",") if s]
    for path in a.merge:
        other = json.loads(Path(path).read_text())
        if "ids_sha256" not in other and isinstance(other.get("windows"), dict):  # a worker's OUT.<system>.json
            runs = other["windows"]
            sy = next((s for s in ("edge_sel", "kvpress") if f"{s} full" in runs), None)
            unknown = {w for per in runs.values() for w in per} - set(ids)
            if sy is None or unknown:
                print(f"--merge {path}: not a worker result of these windows ({sorted(unknown)[:3]})", file=sys.stderr)
                return 2
            other = {"ids_sha256": doc["ids_sha256"], sy: runs}  # window names fix the token ids (ppl_texts)
        if other.get("ids_sha256") != doc["ids_sha256"]:
            print(f"--merge {path}: measured on other token ids; refusing to put it beside this run", file=sys.stderr)
            return 2
        merge_runs(doc, other, systems, path)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edge_sel-bench-ppl-") as tmp:
        keep = (lambda sy: f"{a.out}.{sy}.json") if a.out else (lambda sy: os.path.join(tmp, f"{sy}.json"))
        procs = {}
        if "edge_sel" in systems:
            ecfg = {"bundle": bundle, "windows": payload, "policies": policies, "ratios": ratios, "threads": a.threads,
                    "result": keep("edge_sel")}
            Path(tmp, "edge_sel_cfg.json").write_text(json.dumps(ecfg))
            procs["edge_sel"] = (_start(module_cmd("perplexity", "--worker", str(Path(tmp, "edge_sel_cfg.json"))),
                                        os.path.join(tmp, "edge_sel.log")), ecfg["result"])
        if presses and "kvpress" in systems:
            from .peer_env import ensure_kvpress_env, env_info
            from .prepare import ensure_peers

            py = ensure_kvpress_env(log=print)
            doc["kvpress_env"] = env_info(py)
            runs = [{"name": "kvpress full", "press": "none", "compression_ratio": 0.0}]
            runs += [press_run(p, r) for p in presses for r in ratios]
            kcfg = {"hf_dir": ensure_peers(a.model, "yes_no", 0, need_onnx=False, log=print)["peer_hf"], "windows": payload,
                    "runs": runs, "threads": a.threads, "result": keep("kvpress"), "resume": a.resume}
            Path(tmp, "kvpress_cfg.json").write_text(json.dumps(kcfg))
            procs["kvpress"] = (_start([str(py), str(HERE / "kvpress_worker.py"), str(Path(tmp, "kvpress_cfg.json"))],
                                       os.path.join(tmp, "kvpress.log")), kcfg["result"])
        for system, (proc, result) in procs.items():
            rc = proc.wait()
            log = Path(tmp, f"{system}.log").read_text()
            if rc != 0:
                print(f"{system} worker failed (exit {rc}):\n{log[-3000:]}", file=sys.stderr)
            if Path(result).is_file():
                doc[system] = json.loads(Path(result).read_text())["windows"]
            doc.setdefault("logs", {})[system] = log[-4000:]
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    doc["summary"] = summarize(doc)
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))
    split = a.split if a.split != "all" else "held"
    md = markdown(doc, split, a.chosen)
    if a.markdown:
        Path(a.markdown).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
