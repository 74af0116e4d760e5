"""``python -m benchmarks.generate``: KV-budgeted generation side by side, one fresh process per configuration.

Workloads, all on Project Gutenberg's *Botchan* (``edge_sel.export.textdata.botchan``, public domain):

* **needle in a haystack** (RULER-style): "The special magic number for <word> is <7 digits>." hidden at
  depth 10/50/90% of a 1k/2k/4k-token haystack; the question ("... Answer: The special magic number
  for <word> is") asked after the context. Exact match = the 7 digits appear in the 12 greedy tokens.
  ``--question-mode separate`` (default, kvpress's pipeline): the context is compressed without seeing
  the question, the question runs over the compressed cache uncompressed (edge_sel: ``protect_suffix``);
  ``in-context``: the question is part of the compressed prompt (both sides);
* **perplexity** of a 256-token continuation after a compressed 1792-token prefix (teacher forced,
  the continuation uncompressed on both sides);
* **speed / memory**: prefill seconds and decode ms/token per context length, whole-process peak RSS
  (each configuration runs in its own process), KV bytes.

Every prompt is tokenized once here, by the bundle's tokenizer (the model's own tokenizer.json), and
handed to the workers as token ids; the workers return answer token ids and this driver scores them,
so every configuration sees the same ids and the same exact-match rule.

Configurations: ``edge_sel full``, every ``--policies`` policy at every ``--ratios`` ratio (fraction
of the context KEPT), ``transformers full`` (torch, full cache, same weights), and every ``--presses``
kvpress press at the same ratios (kvpress's ``compression_ratio`` is the fraction REMOVED: 1 - ratio),
run from their own venv (``$EDGE_SEL_HOME/venvs/kvpress-0.5.5``, built on first use: kvpress needs transformers 5.x).
Each configuration runs as one fresh process per part (each context length's needle prompts, and
the perplexity), so an interrupted run keeps every finished part. Parts run in priority order: the
full caches, ratio 0.2 for mpcache and the presses, 0.1 the same (at 1k + perplexity, then 2k, then
4k), then the other policies at 0.2/0.1, then ratio 0.5; results are written to ``--out`` after every
part, and ``--resume`` skips the parts already there.

    python -m benchmarks.generate --bundle bundles/smol-gen --out gen.json --markdown gen.md
    python -m benchmarks.generate --bundle bundles/smol-gen --quick
    python -m benchmarks.generate --bundle bundles/smol-gen --out gen.json --resume --configs "@0.2,full"
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import child_env, module_cmd

WORDS = ["apple", "river", "copper", "falcon", "meadow", "violet", "harbor", "cactus", "summit", "lantern", "pepper",
         "glacier", "orchid", "thunder", "marble", "willow", "saffron", "canyon", "ember", "quartz"]
PRESSES = ("StreamingLLMPress", "SnapKVPress", "KnormPress", "ExpectedAttentionPress", "TOVAPress")
MAX_NEW = 12
HERE = Path(__file__).resolve().parent


# ---- pure helpers (tested without any model) ---------------------------------------------------
def compression_ratio(keep: float) -> float:
    """kvpress's ``compression_ratio`` (fraction removed) for a kept fraction ``keep``."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"kept fraction must be in (0, 1], got {keep}")
    return round(1.0 - keep, 10)


def is_correct(number: str, text: str) -> bool:
    """Exact match: the 7 digits appear in the answer (also when the model spaces or groups them)."""
    return number in text or number in re.sub(r"[^0-9]", "", text)[:14]


def press_label(press: str) -> str:
    return press[:-5] if press.endswith("Press") else press


def build_configs(policies: list[str], ratios: list[float], peers: list[str], presses: list[str]) -> list[dict]:
    """Every configuration, in the order they run (see :func:`priority`)."""
    cfgs = [{"name": "edge_sel full", "kind": "edge_sel", "policy": "full", "ratio": None}]
    if "llama.cpp" in peers:
        cfgs.append({"name": "llama.cpp full", "kind": "llama_cpp", "ratio": None})
    if "transformers" in peers:
        cfgs.append({"name": "transformers full", "kind": "transformers", "ratio": None})
    for r in ratios:
        for p in policies:
            cfgs.append({"name": f"edge_sel {p} @{r:g}", "kind": "edge_sel", "policy": p, "ratio": r})
        if "kvpress" in peers:
            for pr in presses:
                cfgs.append({"name": f"kvpress {press_label(pr)} @{r:g}", "kind": "kvpress", "press": pr, "ratio": r,
                             "compression_ratio": compression_ratio(r)})
    return sorted(cfgs, key=priority)  # stable: ties keep the order above


def priority(cfg: dict) -> int:
    """Run order: (1) full caches, (2) ratio 0.2 for mpcache and kvpress, (3) 0.1 the same, (4) the other
    edge_sel policies at 0.2/0.1, (5) ratio 0.5, (6) any other ratio."""
    r = cfg.get("ratio")
    if r is None:
        return 1
    main = cfg["kind"] == "kvpress" or cfg.get("policy") == "mpcache"
    if abs(r - 0.2) < 1e-9:
        return 2 if main else 4
    if abs(r - 0.1) < 1e-9:
        return 3 if main else 4
    return 5 if abs(r - 0.5) < 1e-9 else 6


def weight_bundle_configs(spec: str, threads: int) -> list[dict]:
    """``--weight-bundles`` (``label=PATH,...``) -> full-cache edge_sel configurations; a label ending in ``+shared`` runs
    its worker on one process-wide spinning pool of ``threads``, one ending in ``+own`` on per-session pools
    (``EDGE_SEL_SHARED_THREADS`` = threads / 0, runtime/sessions.py); otherwise the worker's own choice (auto)."""
    out = []
    for item in (x for x in spec.split(",") if x.strip()):
        label, _, path = item.partition("=")
        cfg = {"name": f"edge_sel full {label.strip()}", "kind": "edge_sel", "policy": "full", "ratio": None,
               "bundle": str(Path(path.strip()).absolute())}
        if label.strip().endswith("+shared"):
            cfg["env"] = {"EDGE_SEL_SHARED_THREADS": str(threads or os.cpu_count() or 1)}
        elif label.strip().endswith("+own"):
            cfg["env"] = {"EDGE_SEL_SHARED_THREADS": "0"}
        out.append(cfg)
    return out


def select_configs(cfgs: list[dict], filters: str | None) -> list[dict]:
    """Keep configurations whose name contains any of the comma-separated substrings."""
    if not filters:
        return cfgs
    subs = [f.strip() for f in filters.split(",") if f.strip()]
    return [c for c in cfgs if any(s in c["name"] for s in subs)]


def load_doc(path: str | None) -> dict:
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return {"results": []}


def done_names(doc: dict) -> set[str]:
    """Configurations with every part measured (``doc["parts"]`` holds the raw output of each part)."""
    return {r["config"] for r in doc.get("results", []) if "error" not in r and not r.get("missing_parts")}


def part_names(lengths: list[int], with_ppl: bool) -> list[str]:
    return [str(L) for L in lengths] + (["ppl"] if with_ppl else [])


def units(cfgs: list[dict], parts: list[str]) -> list[tuple[dict, str]]:
    """(configuration, part) in run order: tiers 1-3 (full caches, mpcache and kvpress at 0.2 and 0.1)
    at the shortest length and the perplexity first, then at each longer length; then the rest the same way."""
    lengths = sorted(int(p) for p in parts if p != "ppl")
    rank = {str(L): i for i, L in enumerate(lengths)}
    rank["ppl"] = 0

    def key(u):
        cfg, part = u
        t = priority(cfg)
        return (0 if t <= 3 else 1, rank[part], t)

    return sorted(((c, p) for c in cfgs for p in parts), key=key)  # stable: ties keep the configuration order


def done_parts(doc: dict) -> set[tuple[str, str]]:
    return {(name, part) for name, ps in doc.get("parts", {}).items() for part in ps}


def merge_parts(name: str, parts: dict) -> dict:
    """One raw result from the raw outputs of a configuration's parts (needles concatenated, peak RSS = max)."""
    raw = {"config": name, "needle": [], "ppl": None, "peak_rss_bytes": 0, "peak_rss_by_part": {}}
    for part, r in parts.items():
        raw["needle"] += r.get("needle", [])
        if part == "ppl":
            raw["ppl"] = r.get("ppl")
        raw["peak_rss_bytes"] = max(raw["peak_rss_bytes"], r.get("peak_rss_bytes") or 0)
        raw["peak_rss_by_part"][part] = r.get("peak_rss_bytes")
        for k in ("cost_per_decode_step", "load_s", "versions", "ppl_kept_tokens"):
            if k in r:
                raw.setdefault(k, r[k])
        if r.get("cold_by_length"):
            raw.setdefault("cold_by_length", {}).update(r["cold_by_length"])
        if r.get("shared_pool_threads") is not None:  # each part's process made its own thread-pool choice
            raw.setdefault("shared_pool_by_part", {})[part] = r["shared_pool_threads"]
    return raw


def write_doc(path: str, doc: dict) -> None:
    """Atomic replace, so an interrupted run never leaves a torn file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, p)


def upsert(doc: dict, result: dict) -> None:
    doc["results"] = [r for r in doc.get("results", []) if r["config"] != result["config"]] + [result]


def needle_cases(encode, decode, haystack_ids: list[int], lengths, depths, n: int, seed: int = 0) -> list[dict]:
    """Token-id prompts: ``context_ids`` (BOS + haystack with the needle) and ``question_ids``; ``n`` per cell.

    ``encode(text, special)`` -> ids; ``decode(ids)`` -> text. The context and the question are tokenized
    separately so that every configuration splits the prompt at the same token."""
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
                q_ids = encode(question, False)
                room = L - len(encode(needle, False)) - len(q_ids) - 1
                start = rng.randrange(0, max(1, len(haystack_ids) - room))
                hay = haystack_ids[start:start + room]
                cut = int(d * len(hay))
                ctx = encode(decode(hay[:cut]) + needle + decode(hay[cut:]), True)
                cases.append({"length": L, "depth": d, "number": number, "word": word,
                              "context_ids": ctx, "question_ids": q_ids})
    return cases


def summarize(raw: dict, decode) -> dict:
    """Score a worker's raw output: needle accuracy per cell, medians of the speed numbers per length."""
    from statistics import mean, median

    cells: dict = {}
    speed: dict = {}
    records = []
    for r in raw["needle"]:
        if "error" in r:
            records.append({k: r[k] for k in ("length", "depth")} | {"error": r["error"]})
            continue
        text = decode(r["answer_ids"])
        ok = is_correct(r["number"], text)
        cells.setdefault(f"{r['length']}@{r['depth']:g}", []).append(ok)
        records.append({"length": r["length"], "depth": r["depth"], "ok": ok, "answer": text[:40]})
        s = speed.setdefault(str(r["length"]), {})
        for k in ("prefill_s", "decode_ms_per_token", "decode_cpu_ms_per_token", "kv_bytes"):
            if r.get(k) is not None:
                s.setdefault(k, []).append(r[k])
    all_ok = [x for v in cells.values() for x in v]
    return {"config": raw["config"], "needle_acc": float(mean(all_ok)) if all_ok else None,
            "needle_n": len(all_ok), "needle_cells": {k: [sum(v), len(v)] for k, v in cells.items()},
            "ppl": raw.get("ppl"), "speed": {L: {k: median(v) for k, v in s.items()} for L, s in speed.items()},
            "peak_rss_bytes": raw.get("peak_rss_bytes"), "errors": sum(1 for r in raw["needle"] if "error" in r),
            "peak_rss_by_part": raw.get("peak_rss_by_part"),
            "extra": {k: raw[k] for k in ("cost_per_decode_step", "load_s", "versions", "ppl_kept_tokens", "cold_by_length",
                                                "shared_pool_by_part") if k in raw},
            "cases": records}


# ---- workers (one process per configuration) --------------------------------------------------
def _worker_edge_sel(cfg: dict) -> dict:
    from edge_sel.runtime.memory import peak_rss_bytes
    from edge_sel.runtime import Generator
    from edge_sel.runtime.sessions import own_process

    own_process()  # one process per configuration, as the edge-sel command: the thread-pool rule applies

    gen = Generator(cfg["bundle"], policy=cfg["policy"], kv_budget=cfg["ratio"], threads=int(cfg.get("threads") or 0) or None)
    out = {"config": cfg["name"], "needle": [], "ppl": None}
    for c in cfg["cases"]:
        rec = {"length": c["length"], "depth": c["depth"], "number": c["number"]}
        q = c["question_ids"]
        try:
            r = gen.generate(c["context_ids"] + q, max_new_tokens=int(cfg.get("max_new", MAX_NEW)), stop=False, protect_suffix=len(q))
        except Exception as e:  # an infeasible budget at a short length: record, do not abort the run
            out["needle"].append({**rec, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        st = r.stats
        rec.update({"answer_ids": r.tokens, "prefill_s": st["prefill_s"], "decode_ms_per_token": st["decode_ms_per_token"],
                    "decode_cpu_ms_per_token": st["decode_cpu_ms_per_token"], "kv_bytes": st["kv_bytes_peak"]})
        out["needle"].append(rec)
        out.setdefault("cost_per_decode_step", st["cost_per_decode_step"])
        out.setdefault("shared_pool_threads", st.get("shared_pool_threads"))  # the thread pool the auto rule chose
        if st.get("cold"):  # mpcache_recall: evicted K/V on disk, bytes read back per decode step
            out.setdefault("cold_by_length", {})[str(c["length"])] = st["cold"]
    if cfg.get("ppl"):
        out["ppl"] = gen.score(cfg["ppl"]["prefix"], cfg["ppl"]["cont"], compress_continuation=False)["ppl"]
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "nelement"):
                total += t.nelement() * t.element_size()
    if not total and hasattr(cache, "key_cache"):
        total = sum(t.nelement() * t.element_size() for t in list(cache.key_cache) + list(cache.value_cache))
    return total


def _worker_transformers(cfg: dict) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from edge_sel.runtime.memory import peak_rss_bytes

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    max_new = int(cfg.get("max_new", MAX_NEW))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg["hf_dir"], dtype=torch.float32).eval()  # default (sdpa) attention
    out = {"config": cfg["name"], "needle": [], "ppl": None, "load_s": time.perf_counter() - t0}
    for c in cfg["cases"]:
        ids = torch.as_tensor(c["context_ids"] + c["question_ids"])[None]
        with torch.no_grad():
            t0 = time.perf_counter()
            o = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            t1, w1 = time.perf_counter(), time.process_time()
            past, toks = o.past_key_values, [int(o.logits[0, -1].argmax())]
            for _ in range(max_new - 1):
                o = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True)
                past = o.past_key_values
                toks.append(int(o.logits[0, -1].argmax()))
            t2, w2 = time.perf_counter(), time.process_time()
        out["needle"].append({"length": c["length"], "depth": c["depth"], "number": c["number"], "answer_ids": toks,
                              "prefill_s": t1 - t0, "decode_ms_per_token": 1000 * (t2 - t1) / (max_new - 1),
                              "decode_cpu_ms_per_token": 1000 * (w2 - w1) / (max_new - 1), "kv_bytes": _kv_bytes(past)})
        del past, o
    if cfg.get("ppl"):
        ids = cfg["ppl"]["prefix"] + cfg["ppl"]["cont"]
        C = len(cfg["ppl"]["cont"])
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(ids)[None], logits_to_keep=C + 1).logits[0, :-1].double().numpy()
        m = logits.max(1)
        lse = m + np.log(np.exp(logits - m[:, None]).sum(1))
        nll = lse - logits[np.arange(C), ids[-C:]]
        out["ppl"] = float(np.exp(nll.mean()))
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def worker_main(path: str) -> int:
    cfg = json.loads(Path(path).read_text())
    res = _worker_transformers(cfg) if cfg["kind"] == "transformers" else _worker_edge_sel(cfg)
    Path(cfg["result"]).write_text(json.dumps(res))
    return 0


# ---- Markdown ----------------------------------------------------------------------------------
def _fmt(x, nd=2):
    return "–" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def acceptance(results: list[dict]) -> list[str]:
    """The targets this benchmark measures (needle and perplexity against the full cache and the best press,
    decode speed and peak RSS against transformers), as lines of text."""
    by = {r["config"]: r for r in results if "error" not in r}
    lines = []
    full, tf = by.get("edge_sel full"), by.get("transformers full")

    def acc(r):
        return None if r is None or r.get("needle_acc") is None else r["needle_acc"]

    mp_policies = ("mpcache", "mpcache_recall")  # MPCache's static eviction, and with query-aware recall
    for ratio in (0.2, 0.1):
        kv = [r for n, r in by.items() if n.startswith("kvpress ") and n.endswith(f"@{ratio:g}")]
        best_acc = max(kv, key=lambda r: acc(r) or 0.0) if kv else None
        best_ppl = min((r for r in kv if r.get("ppl")), key=lambda r: r["ppl"], default=None)
        measured = [(pol, by[f"edge_sel {pol} @{ratio:g}"]) for pol in mp_policies if f"edge_sel {pol} @{ratio:g}" in by]
        if not measured:
            lines.append(f"- {ratio:g} kept: mpcache not measured yet")
        for pol, mp in measured:
            s = f"- {ratio:g} kept: {pol} needle {_fmt(acc(mp))}"
            if full and acc(full) is not None and acc(mp) is not None:
                s += f" vs full {_fmt(acc(full))} (diff {100 * (acc(mp) - acc(full)):+.0f} points)"
            if best_acc and acc(mp) is not None and acc(best_acc) is not None:
                s += f"; best kvpress {best_acc['config']} {_fmt(acc(best_acc))} -> {'OK' if acc(mp) >= acc(best_acc) else 'BELOW'}"
            if mp.get("ppl") is not None:
                s += f"; ppl {pol} {_fmt(mp['ppl'])}"
                if full and full.get("ppl"):
                    s += f" (full {_fmt(full['ppl'])})"
                if best_ppl:
                    s += f", best kvpress {best_ppl['config']} {_fmt(best_ppl['ppl'])} -> {'OK' if mp['ppl'] <= best_ppl['ppl'] else 'ABOVE'}"
            lines.append(s)
    L = "4096"
    for pol in mp_policies:
        mp1 = by.get(f"edge_sel {pol} @0.1")
        if not (mp1 and full and L in mp1["speed"] and L in full["speed"]):
            continue
        a, b = mp1["speed"][L]["decode_ms_per_token"], full["speed"][L]["decode_ms_per_token"]
        s = f"- 4k decode ms/token: {pol}@0.1 {a:.1f} / edge_sel full {b:.1f} = {a / b:.2f} (target <= 0.75)"
        if tf and L in tf["speed"]:
            t = tf["speed"][L]["decode_ms_per_token"]
            s += f"; transformers full {t:.1f} -> {pol}@0.1 / transformers = {a / t:.2f} (target <= 1)"
        ca, cb = mp1["speed"][L].get("decode_cpu_ms_per_token"), full["speed"][L].get("decode_cpu_ms_per_token")
        if ca and cb:
            s += f"; CPU ms/token ratio {ca / cb:.2f}"
        lines.append(s)
    if tf and tf.get("peak_rss_bytes"):
        names = ["edge_sel full"] + [f"edge_sel {pol} @{r}" for r in ("0.1", "0.2") for pol in mp_policies]
        for name in names:
            r = by.get(name)
            if not (r and r.get("peak_rss_bytes")):
                continue
            a_by, t_by = r.get("peak_rss_by_part") or {}, tf.get("peak_rss_by_part") or {}
            common = sorted((int(k) for k in a_by if k != "ppl" and a_by[k] and t_by.get(k)), reverse=True)
            if common:  # the generation processes at the longest context both measured
                L = str(common[0])
                a, t, what = a_by[L], t_by[L], f" at {L} tokens"
            else:
                a, t, what = r["peak_rss_bytes"], tf["peak_rss_bytes"], ""
            target = " (target <= 0.5 at 10% kept)" if "@0.1" in name else ""
            lines.append(f"- peak RSS{what} {name} {a / 2**20:.0f} MiB / transformers full {t / 2**20:.0f} MiB = "
                         f"{a / t:.2f}{target}")
    return lines


def display_order(name: str) -> tuple:
    """Table rows: full caches first, then by kept ratio (high to low), edge_sel before its peers."""
    m = re.search(r"@([0-9.]+)$", name)
    ratio = float(m.group(1)) if m else 2.0
    kind = 0 if name.startswith("edge_sel") else 1 if name.startswith("transformers") else 2
    mp = 0 if "mpcache" in name else 1
    return (-ratio, kind, mp, name)


def markdown(doc: dict) -> str:
    res = sorted(doc.get("results", []), key=lambda r: display_order(r["config"]))
    ok = [r for r in res if "error" not in r]
    lengths = sorted({int(L) for r in ok for L in r.get("speed", {})})
    cells = sorted({c for r in ok for c in r.get("needle_cells", {})}, key=lambda c: (int(c.split("@")[0]), float(c.split("@")[1])))
    out = []
    a = doc.get("args", {})
    out.append(f"Needle: {a.get('needles')} per cell, question mode `{a.get('question_mode', 'separate')}`; cells are "
               f"right/total at length@depth. Perplexity: {a.get('ppl_cont')} tokens after a {a.get('ppl_prefix')}-token "
               f"compressed prefix. Ratios are the fraction of the context kept.\n")
    out.append("| config | needle | " + " | ".join(cells) + " |")
    out.append("|---|---|" + "---|" * len(cells))
    for r in ok:
        nc = r.get("needle_cells", {})
        row = [r["config"], _fmt(r.get("needle_acc"))] + [f"{nc[c][0]}/{nc[c][1]}" if c in nc else "–" for c in cells]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    hdr = ["config", "ppl"] + [f"prefill s {L}" for L in lengths] + [f"decode ms/tok {L}" for L in lengths] + \
          [f"decode CPU ms/tok {lengths[-1]}" if lengths else "decode CPU"] + \
          ["peak RSS MiB"] + [f"peak RSS MiB {L}" for L in lengths] + [f"KV MiB {lengths[-1] if lengths else ''}", "wall s"]
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))
    for r in ok:
        sp = r.get("speed", {})
        row = [r["config"], _fmt(r.get("ppl"))]
        row += [_fmt(sp.get(str(L), {}).get("prefill_s")) for L in lengths]
        row += [_fmt(sp.get(str(L), {}).get("decode_ms_per_token"), 1) for L in lengths]
        last = sp.get(str(lengths[-1]), {}) if lengths else {}
        row.append(_fmt(last.get("decode_cpu_ms_per_token"), 1))
        row.append(_fmt(r["peak_rss_bytes"] / 2**20, 0) if r.get("peak_rss_bytes") else "–")
        byp = r.get("peak_rss_by_part") or {}
        row += [_fmt(byp[str(L)] / 2**20, 0) if byp.get(str(L)) else "–" for L in lengths]
        row.append(_fmt(last["kv_bytes"] / 2**20, 1) if last.get("kv_bytes") else "–")
        row.append(_fmt(r.get("wall_s"), 0))
        out.append("| " + " | ".join(row) + " |")
    bad = [r for r in res if "error" in r or r.get("errors") or r.get("failed_parts") or r.get("missing_parts")]
    if bad:
        out.append("")
        for r in bad:
            if "error" in r:
                out.append(f"- {r['config']}: FAILED: {r['error'][:200]}")
                continue
            if r.get("errors"):
                out.append(f"- {r['config']}: {r['errors']} needle cases failed")
            if r.get("failed_parts"):
                out.append(f"- {r['config']}: failed parts {', '.join(r['failed_parts'])}: "
                           + "; ".join(v[-160:].replace(chr(10), ' ') for v in r["failed_parts"].values()))
            if r.get("missing_parts"):
                out.append(f"- {r['config']}: not measured yet: {', '.join(r['missing_parts'])}")
    acc = acceptance(res)
    if acc:
        out += ["", "Acceptance:", ""] + acc
    return "\n".join(out) + "\n"


# ---- driver -------------------------------------------------------------------------------------
def _tokenizer(bundle: str):
    from edge_sel.bench import bundle_tokenizer
    from edge_sel.runtime.bundle import Bundle

    return bundle_tokenizer(Bundle.open(bundle))


def _run_one(cfg: dict, tmp: str, bundle: str, kvpress_py: Path | None) -> dict:
    i = re.sub(r"[^A-Za-z0-9.]+", "_", cfg["name"])
    cfg = {**cfg, "result": os.path.join(tmp, f"r_{i}.json")}
    cpath = os.path.join(tmp, f"c_{i}.json")
    Path(cpath).write_text(json.dumps(cfg))
    if cfg["kind"] == "kvpress":
        cmd = [str(kvpress_py), str(HERE / "kvpress_worker.py"), cpath]
    elif cfg["kind"] == "llama_cpp":
        cmd = [str(cfg["llama_py"]), str(HERE / "llama_cpp_worker.py"), cpath]
    else:
        cmd = module_cmd("generate", "--bundle", bundle, "--worker", cpath)
    proc = subprocess.run(cmd, env={**child_env(), **cfg.get("env", {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:] or f"exit {proc.returncode}")
    return json.loads(Path(cfg["result"]).read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a generate bundle (edge-sel export MODEL --task generate)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the same model for the torch peers")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--needles", type=int, default=10, help="needles per (length, depth) cell")
    ap.add_argument("--ratios", default="0.5,0.2,0.1", help="fractions of the context kept")
    ap.add_argument("--policies", default="mpcache,snapkv,h2o,streaming_llm")
    ap.add_argument("--peers", default="transformers,kvpress",
                    help="comma list of transformers, kvpress, llama.cpp (or 'none')")
    ap.add_argument("--gguf", help="llama.cpp peer: the GGUF file (default: the packaged model's, fetched)")
    ap.add_argument("--weight-bundles", default="",
                    help="more generate bundles of the same model run with the full cache, e.g. int8=PATH,int4=PATH; "
                         "a label ending in +shared runs its worker with EDGE_SEL_SHARED_THREADS=--threads, "
                         "+own with 0 (per-session pools); others decide (auto)")
    ap.add_argument("--presses", default=",".join(PRESSES), help="kvpress presses (class names)")
    ap.add_argument("--question-mode", default="separate", choices=["separate", "in-context"],
                    help="separate: the question is not compressed (kvpress pipeline); in-context: part of the compressed prompt")
    ap.add_argument("--max-new", type=int, default=MAX_NEW,
                    help="tokens generated per needle prompt (the answer is read from them; more steps steady the decode ms/token)")
    ap.add_argument("--ppl-prefix", type=int, default=1792)
    ap.add_argument("--ppl-cont", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of every configuration: torch and llama.cpp peers, edge_sel sessions (0: each one's default)")
    ap.add_argument("--quick", action="store_true", help="1k tokens, depth 0.5, 3 needles, ratio 0.2, short perplexity")
    ap.add_argument("--configs", help="run only configurations whose name contains one of these comma-separated substrings")
    ap.add_argument("--resume", action="store_true", help="skip configurations already measured in --out")
    ap.add_argument("--list", action="store_true", help="print the configurations in run order and exit")
    ap.add_argument("--out", help="results JSON, rewritten after every configuration")
    ap.add_argument("--markdown", help="write the Markdown tables here (after every configuration)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker_main(a.worker)
    if a.quick:
        a.lengths, a.depths, a.needles, a.ratios, a.ppl_prefix, a.ppl_cont = "1024", "0.5", 3, "0.2", 512, 64
    peers = [p.strip() for p in a.peers.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in peers if p not in ("transformers", "kvpress", "llama.cpp")]
    presses = [p.strip() for p in a.presses.split(",") if p.strip()]
    if unknown:
        ap.error(f"unknown peer {unknown[0]!r}; known: transformers, kvpress, llama.cpp")
    if a.max_new < 2:
        ap.error(f"--max-new must be at least 2 (one prefill token + one timed decode step), got {a.max_new}")
    cfgs = build_configs([p for p in a.policies.split(",") if p], [float(x) for x in a.ratios.split(",")], peers, presses)
    for cfg in weight_bundle_configs(a.weight_bundles, a.threads):
        cfgs.insert(1, cfg)
    cfgs = select_configs(cfgs, a.configs)
    doc = load_doc(a.out) if a.resume else {"results": []}
    doc.setdefault("parts", {})
    doc.setdefault("failures", {})
    lengths = [int(x) for x in a.lengths.split(",")]
    parts = part_names(lengths, bool(a.ppl_prefix))
    todo = units(cfgs, parts)
    if a.resume:
        skip = done_parts(doc)
        todo = [(c, p) for c, p in todo if (c["name"], p) not in skip]
    if a.list:
        for c, p in todo:
            print(f"{c['name']} [{p}]")
        return 0
    cfgs = [c for c in cfgs if any(c is u for u, _ in todo)]
    bundle = str(Path(a.bundle).absolute())
    tok = _tokenizer(bundle)
    encode = lambda t, special=True: tok.encode(t, add_special_tokens=special).ids  # noqa: E731  (= Generator.encode)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    from edge_sel.export.textdata import botchan

    hay = encode(botchan())
    cases = needle_cases(encode, decode, hay, lengths, [float(x) for x in a.depths.split(",")], a.needles)
    if a.question_mode == "in-context":
        cases = [{**c, "context_ids": c["context_ids"] + c["question_ids"], "question_ids": []} for c in cases]
    ppl = None
    if a.ppl_prefix:
        ids = hay[5000:5000 + a.ppl_prefix + a.ppl_cont]
        ppl = {"prefix": ids[:a.ppl_prefix], "cont": ids[a.ppl_prefix:]}
    common = {"bundle": bundle, "model": a.model, "cases": cases, "ppl": ppl, "threads": a.threads, "max_new": a.max_new}
    kvpress_py = None
    if any(c["kind"] in ("transformers", "kvpress") for c in cfgs):
        from .prepare import ensure_peers

        common["hf_dir"] = ensure_peers(a.model, "yes_no", 0, need_onnx=False, log=print)["peer_hf"]  # same weights as the bundle
    if any(c["kind"] == "llama_cpp" for c in cfgs):
        from .peer_env import PeerEnvError, ensure_llama_env

        try:
            common["llama_py"] = str(ensure_llama_env(log=print))
        except PeerEnvError as e:
            print(f"llama.cpp peer skipped: {e}", file=sys.stderr)
            cfgs = [c for c in cfgs if c["kind"] != "llama_cpp"]
        else:
            if a.gguf:
                common["gguf"] = str(Path(a.gguf).absolute())
            else:
                from edge_sel.export.sources import resolve

                common["gguf"] = str(resolve(a.model).path)
            doc["llama_cpp_env"] = {"python": common["llama_py"], "gguf": common["gguf"]}
    if any(c["kind"] == "kvpress" for c in cfgs):
        from .peer_env import PeerEnvError, ensure_kvpress_env, env_info

        try:
            kvpress_py = ensure_kvpress_env(log=print)
        except PeerEnvError as e:
            print(f"kvpress peers skipped: {e}", file=sys.stderr)
            cfgs = [c for c in cfgs if c["kind"] != "kvpress"]
        else:
            doc["kvpress_env"] = {"python": str(kvpress_py), **env_info(kvpress_py)}
    doc["args"] = {k: v for k, v in vars(a).items() if k not in ("worker", "list")}
    doc["notes"] = ["ratios = fraction of the context kept; kvpress compression_ratio = 1 - ratio",
                    "question mode 'separate': context compressed without the question; the question and the 12 new "
                    "tokens are never evicted (edge_sel protect_suffix; kvpress pipeline semantics)",
                    "decode ms/token and prefill s: medians over the needle prompts of each length (wall clock); "
                    "peak RSS: VmHWM of the configuration's own process; KV bytes: edge_sel kv_bytes_peak (K, V, "
                    "positions, scores, policy statistics, prefill scratch), torch peers: K+V tensors at the end"]
    todo = [(c, p) for c, p in todo if any(c is k for k in cfgs)]  # kvpress dropped when its env failed
    print(f"{len(todo)} parts of {len(cfgs)} configurations: {', '.join(c['name'] for c in cfgs)}", flush=True)
    by_len: dict = {}
    for c in cases:
        by_len.setdefault(str(c["length"]), []).append(c)
    with tempfile.TemporaryDirectory(prefix="edge_sel-bench-gen-") as tmp:
        for cfg, part in todo:
            name = cfg["name"]
            unit = {**common, **cfg, "cases": [] if part == "ppl" else by_len[part], "ppl": ppl if part == "ppl" else None}
            t0 = time.perf_counter()
            load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            try:
                raw = _run_one(unit, tmp, a.bundle, kvpress_py)
            except Exception as e:
                print(f"{name} [{part}]: FAILED\n{str(e)[-2000:]}", file=sys.stderr, flush=True)
                doc["failures"].setdefault(name, {})[part] = str(e)[-1000:]
            else:
                raw["wall_s"] = round(time.perf_counter() - t0, 1)
                raw["load_avg"] = [load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else None]  # the machine is shared
                doc["parts"].setdefault(name, {})[part] = raw
                doc["failures"].get(name, {}).pop(part, None)
                one = summarize(raw, decode)
                sp = "; ".join(f"prefill {v['prefill_s']:.2f}s decode {v['decode_ms_per_token']:.0f}ms/tok"
                               for L, v in one["speed"].items() if v.get("decode_ms_per_token"))
                acc = one["needle_acc"]
                print(f"{name:34s} [{part:>4s}] needle {acc if acc is None else round(acc, 2)} ({one['needle_n']})  "
                      f"ppl {one['ppl'] and round(one['ppl'], 2)}  peak RSS {(one['peak_rss_bytes'] or 0) / 2**20:.0f} MiB  "
                      f"{sp}  [{raw['wall_s']:.0f}s, load {raw['load_avg'][0]:.1f}->{raw['load_avg'][1]:.1f}]", flush=True)
            done = doc["parts"].get(name, {})
            if done:
                s = summarize(merge_parts(name, done), decode)
                s["wall_s"] = round(sum(r.get("wall_s", 0) for r in done.values()), 1)
                s["missing_parts"] = [p for p in parts if p not in done]
                if doc["failures"].get(name):
                    s["failed_parts"] = dict(doc["failures"][name])
            else:
                s = {"config": name, "error": doc["failures"][name][part]}
            s["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            upsert(doc, s)
            if a.out:
                write_doc(a.out, doc)
            if a.markdown:
                try:
                    Path(a.markdown).write_text(markdown(doc))
                except Exception as e:  # a table bug must not stop the measurements
                    print(f"markdown: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    if not a.out and not a.markdown:
        print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
