"""``edge-sel bench generate``: KV-budgeted generation side by side, one fresh process per configuration.

Workloads, all on Project Gutenberg's *Botchan* (``edge_sel.textdata.botchan``; DESIGN §5):

* **needle in a haystack** (RULER-style): "The special magic number for <word> is <7 digits>." hidden at
  depth 10/50/90% of a 1k/2k/4k-token haystack, the question asked after the context, uncompressed
  (completion format: "... Answer: The special magic number for <word> is"); exact match = the 7
  digits appear in the first 12 greedy tokens. The full cache's own score is reported per cell;
* **perplexity** of a 256-token continuation after a compressed 1792-token prefix (teacher forced);
* **speed / memory**: prefill seconds and decode ms/token per context length, whole-process peak RSS
  (each configuration runs in its own process), KV bytes (peak).

Configurations: ``full`` (no eviction) and every policy in ``--policies`` at every ratio in ``--ratios``
(fraction of the prompt kept), plus the ``transformers`` peer (full cache, torch eager). The kvpress
peers need transformers 5.x and therefore their own virtual environment (DESIGN §5); they are not run
by this version (``--peers kvpress`` says so in the results).

    edge-sel bench generate --bundle bundles/smol-gen --out gen.json
    edge-sel bench generate --bundle bundles/smol-gen --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

WORDS = ["apple", "river", "copper", "falcon", "meadow", "violet", "harbor", "cactus", "summit", "lantern", "pepper",
         "glacier", "orchid", "thunder", "marble", "willow", "saffron", "canyon", "ember", "quartz"]


def needle_cases(tok_encode, tok_decode, haystack_ids: list[int], lengths, depths, n: int, seed: int = 0):
    """Prompts (text) with a needle at each depth of each length; ``n`` needles per cell."""
    rng = random.Random(seed)
    cases = []
    for L in lengths:
        for d in depths:
            for i in range(n):
                word = WORDS[(i + int(d * 10) + L) % len(WORDS)]
                number = f"{rng.randrange(10**6, 10**7)}"
                needle = f" The special magic number for {word} is {number}. "
                question = (f"\n\nQuestion: What is the special magic number for {word} mentioned in the text above?\n"
                            f"Answer: The special magic number for {word} is")
                room = L - len(tok_encode(needle)) - len(tok_encode(question))
                start = rng.randrange(0, max(1, len(haystack_ids) - room))
                hay = haystack_ids[start:start + room]
                cut = int(d * len(hay))
                text = tok_decode(hay[:cut]) + needle + tok_decode(hay[cut:]) + question
                cases.append({"length": L, "depth": d, "number": number, "prompt": text})
    return cases


def _haystack():
    from edge_sel.textdata import botchan

    return botchan()


# ---- workers (one process per configuration) --------------------------------------------------
def _worker_edge_sel(cfg: dict) -> dict:
    from edge_sel.memory import peak_rss_bytes
    from edge_sel.runtime.generator import Generator

    gen0 = Generator(cfg["bundle"])
    enc = lambda t: gen0.encode(t)  # noqa: E731
    dec = lambda ids: gen0.tok.decode(ids)  # noqa: E731
    text = _haystack()
    hay = enc(text)
    out = {"config": cfg["name"], "needle": [], "ppl": None, "speed": {}}
    gen = Generator(cfg["bundle"], policy=cfg["policy"], kv_budget=cfg["ratio"])
    for c in needle_cases(enc, dec, hay, cfg["lengths"], cfg["depths"], cfg["needles"]):
        try:
            r = gen.generate(c["prompt"], max_new_tokens=12, stop=False)
        except Exception as e:  # an infeasible budget at a short length: record, do not abort the run
            out["needle"].append({**{k: c[k] for k in ("length", "depth")}, "error": str(e)})
            continue
        ok = c["number"] in re.sub(r"[^0-9]", "", r.text)[:14] or c["number"] in r.text
        out["needle"].append({"length": c["length"], "depth": c["depth"], "ok": bool(ok), "answer": r.text[:40]})
        s = out["speed"].setdefault(str(c["length"]), {"prefill_s": [], "decode_ms_per_token": [], "kv_bytes_peak": []})
        s["prefill_s"].append(r.stats["prefill_s"])
        s["decode_ms_per_token"].append(r.stats["decode_ms_per_token"])
        s["kv_bytes_peak"].append(r.stats["kv_bytes_peak"])
        out.setdefault("cost_per_decode_step", r.stats["cost_per_decode_step"])
    if cfg["ppl_prefix"]:
        ids = hay[5000:5000 + cfg["ppl_prefix"] + cfg["ppl_cont"]]
        out["ppl"] = gen.score(ids[:cfg["ppl_prefix"]], ids[cfg["ppl_prefix"]:])["ppl"]
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _worker_transformers(cfg: dict) -> dict:
    import numpy as np
    import torch

    from edge_sel.export.adapters import adapter_for
    from edge_sel.memory import peak_rss_bytes
    from edge_sel.runtime.generator import Generator
    from edge_sel.sources import resolve

    gen0 = Generator(cfg["bundle"])  # same tokenizer and token ids as edge_sel
    enc = lambda t: gen0.encode(t)  # noqa: E731
    dec = lambda ids: gen0.tok.decode(ids)  # noqa: E731
    hay = enc(_haystack())
    gen0.close()
    model, _ = adapter_for("llama").load(resolve(cfg["model"]), "yes_no", 0)
    torch.set_num_threads(int(os.environ.get("EDGE_SEL_THREADS", "0")) or torch.get_num_threads())
    out = {"config": cfg["name"], "needle": [], "ppl": None, "speed": {}}
    for c in needle_cases(enc, dec, hay, cfg["lengths"], cfg["depths"], cfg["needles"]):
        ids = torch.as_tensor(enc(c["prompt"]))[None]
        with torch.no_grad():
            t0 = time.perf_counter()
            o = model(input_ids=ids, use_cache=True)
            t1 = time.perf_counter()
            past, toks = o.past_key_values, [int(o.logits[0, -1].argmax())]
            for _ in range(11):
                o = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True)
                past = o.past_key_values
                toks.append(int(o.logits[0, -1].argmax()))
            t2 = time.perf_counter()
        text = dec(toks)
        ok = c["number"] in text
        out["needle"].append({"length": c["length"], "depth": c["depth"], "ok": bool(ok), "answer": text[:40]})
        s = out["speed"].setdefault(str(c["length"]), {"prefill_s": [], "decode_ms_per_token": [], "kv_bytes_peak": []})
        s["prefill_s"].append(t1 - t0)
        s["decode_ms_per_token"].append(1000 * (t2 - t1) / 11)
    if cfg["ppl_prefix"]:
        ids = hay[5000:5000 + cfg["ppl_prefix"] + cfg["ppl_cont"]]
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0].float().numpy()
        P = cfg["ppl_prefix"]
        lg = logits[P - 1:-1].astype(np.float64)
        m = lg.max(1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(lg - m).sum(1)))
        nll = lse - lg[np.arange(len(ids) - P), ids[P:]]
        out["ppl"] = float(np.exp(nll.mean()))
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def worker_main(path: str) -> int:
    cfg = json.loads(Path(path).read_text())
    res = _worker_transformers(cfg) if cfg["kind"] == "transformers" else _worker_edge_sel(cfg)
    Path(cfg["result"]).write_text(json.dumps(res))
    return 0


# ---- driver -------------------------------------------------------------------------------------
def _summary(res: dict) -> dict:
    import numpy as np

    cells: dict = {}
    for r in res["needle"]:
        if "ok" in r:
            cells.setdefault(f"{r['length']}@{r['depth']}", []).append(r["ok"])
    speed = {L: {k: (float(np.median(v)) if v else None) for k, v in s.items()} for L, s in res["speed"].items()}
    all_ok = [x for v in cells.values() for x in v]
    return {"config": res["config"], "needle_acc": float(np.mean(all_ok)) if all_ok else None,
            "needle_cells": {k: float(np.mean(v)) for k, v in cells.items()}, "ppl": res["ppl"], "speed": speed,
            "peak_rss_bytes": res["peak_rss_bytes"], "cost_per_decode_step": res.get("cost_per_decode_step"),
            "errors": sum(1 for r in res["needle"] if "error" in r)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge-sel bench generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a generate bundle (edge-sel export MODEL --task generate)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the same model for the transformers peer")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--needles", type=int, default=10, help="needles per (length, depth) cell")
    ap.add_argument("--ratios", default="0.5,0.2,0.1", help="fractions of the prompt kept")
    ap.add_argument("--policies", default="mpcache,snapkv,h2o,streaming_llm")
    ap.add_argument("--peers", default="transformers", help="transformers (kvpress: needs its own venv, not run here)")
    ap.add_argument("--ppl-prefix", type=int, default=1792)
    ap.add_argument("--ppl-cont", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="1k tokens, depth 0.5, 3 needles, ratio 0.2, short perplexity")
    ap.add_argument("--out", help="write results JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker_main(a.worker)
    if a.quick:
        a.lengths, a.depths, a.needles, a.ratios, a.ppl_prefix, a.ppl_cont = "1024", "0.5", 3, "0.2", 512, 64
    common = {"bundle": str(Path(a.bundle).absolute()), "model": a.model, "lengths": [int(x) for x in a.lengths.split(",")],
              "depths": [float(x) for x in a.depths.split(",")], "needles": a.needles, "ppl_prefix": a.ppl_prefix,
              "ppl_cont": a.ppl_cont}
    configs = [{"name": "edge_sel full", "kind": "edge_sel", "policy": "full", "ratio": None}]
    for r in [float(x) for x in a.ratios.split(",")]:
        for p in a.policies.split(","):
            configs.append({"name": f"edge_sel {p} @{r:g}", "kind": "edge_sel", "policy": p, "ratio": r})
    peers = [p for p in a.peers.split(",") if p]
    if "transformers" in peers:
        configs.append({"name": "transformers full", "kind": "transformers"})
    import tempfile

    results = []
    with tempfile.TemporaryDirectory(prefix="edge_sel-bench-gen-") as tmp:
        for i, cfg in enumerate(configs):
            cfg = {**common, **cfg, "result": os.path.join(tmp, f"r{i}.json")}
            cpath = os.path.join(tmp, f"c{i}.json")
            Path(cpath).write_text(json.dumps(cfg))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "edge_sel.benchmarks.generate", "--bundle", a.bundle, "--worker", cpath],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{cfg['name']}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                results.append({"config": cfg["name"], "error": proc.stderr[-500:]})
                continue
            s = _summary(json.loads(Path(cfg["result"]).read_text()))
            s["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(s)
            sp = "; ".join(f"{L}: prefill {v['prefill_s']:.1f}s decode {v['decode_ms_per_token']:.0f}ms/tok"
                           for L, v in s["speed"].items() if v.get("decode_ms_per_token"))
            print(f"{s['config']:28s} needle {s['needle_acc'] if s['needle_acc'] is None else round(s['needle_acc'], 2)}"
                  f"  ppl {s['ppl'] and round(s['ppl'], 2)}  peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB  {sp}", flush=True)
    doc = {"args": vars(a), "results": results,
           "notes": ["kvpress peers need transformers 5.x in their own venv (DESIGN §5): not run by this version"]}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
