"""``python -m benchmarks.needles_heldout``: needle retrieval and decode speed under a KV budget, on wording and
positions no default was chosen on.

The needle task of :mod:`benchmarks.generate` (a 7-digit "special magic number" in *Botchan* at depths 0.1 / 0.5 /
0.9) is where the needle defaults were chosen. Here everything differs: four other needle sentences and questions
(:data:`TEMPLATES`), other keys (:data:`KEYS`), other depths (:data:`DEPTHS`), another book as the haystack (*Alice's
Adventures in Wonderland*, :func:`benchmarks.ppl_texts.alice`) and another seed. The context is compressed without
seeing the question; the question runs uncompressed over the compressed cache (``protect_suffix``) and the answer is
greedy, exact match on the digits in ``--max-new`` tokens (:func:`benchmarks.generate.is_correct`).

``--split tune`` is where this benchmark's defaults are chosen: four more needle sentences (:data:`TUNE_TEMPLATES`),
their own keys and depths (:data:`TUNE_KEYS`, :data:`TUNE_DEPTHS`) and their own seed, in *Botchan* (or, with
``--haystack alice``, in the held-out book at other offsets); no sentence, key, depth or needle of it appears in
the held-out split (``--split held``, the default), which reports.

Every configuration (``edge_sel full`` and every ``--policies`` policy at every ``--ratios`` kept fraction) sees the
same token ids in one process: the context's prefill runs once per case and each configuration compresses, answers
and decodes over its own cache (:func:`benchmarks.ppl_lockstep.generate_lockstep`, equal to ``Generator.generate``
per configuration, tested). The configurations' decode steps take turns, so the median milliseconds per decode step
are measured side by side under the same load; that is the speed table (``--lengths 8000`` for decode at 8k).

    python -m benchmarks.needles_heldout --bundle B --lengths 2048,4096 --ratios 0.05 --out needles.json
    python -m benchmarks.needles_heldout --bundle B --split tune --lengths 2048 --policies mpcache_recall:fetch_min=64
    python -m benchmarks.needles_heldout --bundle B --lengths 8000 --per-length 1 --max-new 33 --ratios 0.05 \\
        --policies mpcache_ea,mpcache_recall --out decode8k.json          # decode speed at 8k
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .generate import is_correct
from .perplexity import kv_parser, parse_policy

# (needle sentence, question, answer prefix); {key} and {number} are filled in
TEMPLATES = (
    (" The combination of the {key} safe is {number}. ",
     "\n\nQuestion: What is the combination of the {key} safe?\nAnswer: The combination of the {key} safe is"),
    (" Please note that the ticket number for {key} was {number}. ",
     "\n\nWhat was the ticket number for {key}, according to the story?\nThe ticket number for {key} was"),
    (" The {key} drawer is opened with the code {number}. ",
     "\n\nQuestion: Which code opens the {key} drawer?\nAnswer: The {key} drawer is opened with the code"),
    (" Written on the back of the {key} card was the number {number}. ",
     "\n\nWhat number was written on the back of the {key} card?\nThe number written on the back of the {key} card was"),
)
KEYS = ("walnut", "indigo", "sparrow", "lagoon", "bramble", "cobalt", "tundra", "juniper", "mosaic", "falconet",
        "harpoon", "sequoia")
DEPTHS = (0.2, 0.4, 0.6, 0.8)
SEED = 2026
# the tuning split: its own sentences, keys, depths, haystack (Botchan) and seed
TUNE_TEMPLATES = (
    (" The locker at the {key} station opens with {number}. ",
     "\n\nQuestion: What opens the locker at the {key} station?\nAnswer: The locker at the {key} station opens with"),
    (" Remember that the {key} account number is {number}. ",
     "\n\nWhat is the {key} account number mentioned in the text?\nThe {key} account number is"),
    (" The parcel for {key} carried the tracking code {number}. ",
     "\n\nQuestion: Which tracking code did the parcel for {key} carry?\nAnswer: The parcel for {key} carried the tracking code"),
    (" On the {key} door someone had painted the number {number}. ",
     "\n\nWhat number had someone painted on the {key} door?\nOn the {key} door someone had painted the number"),
)
TUNE_KEYS = ("meadow", "copper", "heron", "thistle", "granite", "saffron", "willow", "ember", "quartz", "lantern",
             "orchid", "glacier")
TUNE_DEPTHS = (0.15, 0.35, 0.65, 0.85)
TUNE_SEED = 77
POLICIES = ("mpcache_recall", "mpcache_ea_recall", "mpcache_ea", "snapkv", "streaming_llm")
QUESTION_AWARE = ("mpcache_recall", "mpcache_ea_recall")  # read evicted tokens back for the question
MAX_NEW = 12


def cases(encode, decode, haystack: list[int], lengths, per_length: int, split: str = "held") -> list[dict]:
    """``per_length`` needles per prompt length: templates, keys and depths taken in turn, haystack offsets at random.
    ``encode(text, bos)`` -> ids, ``decode(ids)`` -> text; context and question are tokenized apart, so every
    configuration cuts the prompt at the same token. ``split``: "held" (reported) or "tune" (defaults chosen)."""
    templates, keys, depths, seed = ((TEMPLATES, KEYS, DEPTHS, SEED) if split == "held"
                                     else (TUNE_TEMPLATES, TUNE_KEYS, TUNE_DEPTHS, TUNE_SEED))
    rng = random.Random(seed)
    out = []
    for i in range(per_length):  # lengths take turns: a run cut short has cases of every length
        for L in lengths:
            needle, question = templates[i % len(templates)]
            key, depth = keys[(i + L) % len(keys)], depths[(i + i // len(templates)) % len(depths)]
            number = str(rng.randrange(10**6, 10**7))
            q_ids = encode(question.format(key=key), False)
            nd = needle.format(key=key, number=number)
            room = L - len(encode(nd, False)) - len(q_ids) - 1
            start = rng.randrange(0, max(1, len(haystack) - room))
            hay = haystack[start:start + room]
            cut = int(depth * len(hay))
            ctx = encode(decode(hay[:cut]) + nd + decode(hay[cut:]), True)
            out.append({"length": L, "depth": depth, "template": i % len(templates), "key": key, "number": number,
                        "context_ids": ctx, "question_ids": q_ids})
    return out


def summarize(doc: dict) -> dict:
    """``{config: {length: {"right", "n", "step_ms"}}}``: needles right and the median decode-step milliseconds."""
    out: dict = {}
    for rec in doc["cases"]:
        for name, r in rec["results"].items():
            cell = out.setdefault(name, {}).setdefault(str(rec["length"]), {"right": 0, "n": 0, "ms": []})
            cell["right"] += int(r["ok"])
            cell["n"] += 1
            cell["ms"] += r["step_ms"]
    for per in out.values():
        for cell in per.values():
            ms = cell.pop("ms")
            cell["step_ms"] = statistics.median(ms) if ms else None
    return out


def markdown(doc: dict) -> str:
    s = summarize(doc)
    lengths = sorted({int(L) for per in s.values() for L in per})
    full = s.get("edge_sel full", {})
    head = ["config"] + [f"needles {L}" for L in lengths] + [f"decode ms/step {L} (× full)" for L in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per in s.items():
        row = [name + ("" if name == "edge_sel full" or name.split()[1].split(":")[0] in QUESTION_AWARE
                       else " (question-agnostic)")]
        row += [f"{per[str(L)]['right']}/{per[str(L)]['n']}" if str(L) in per else "–" for L in lengths]
        for L in lengths:
            c, f = per.get(str(L), {}), full.get(str(L), {})
            ms, fms = c.get("step_ms"), f.get("step_ms")
            row.append("–" if ms is None else f"{ms:.1f}" + (f" ({ms / fms:.2f}×)" if fms and name != "edge_sel full" else ""))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, per in s.items():
        if name == "edge_sel full" or name.split()[1].split(":")[0] not in QUESTION_AWARE:
            continue
        for L in lengths:
            c, f = per.get(str(L)), full.get(str(L))
            if c and f:
                ok = c["right"] >= f["right"] - 1
                lines.append(f"- {L}: `{name}` {c['right']}/{c['n']} vs full {f['right']}/{f['n']}: "
                             f"{'within one miss' if ok else 'NOT within one miss'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = kv_parser("needles_heldout", __doc__, bundle_required=True)
    ap.add_argument("--split", default="held", choices=["held", "tune"],
                    help="held: the reported needles (Alice); tune: where defaults are chosen (Botchan, other wording)")
    ap.add_argument("--haystack", choices=["alice", "botchan"],
                    help="the book the needles hide in (default: alice for held, botchan for tune; the tune split's "
                         "sentences, keys, depths and seed stay its own with either)")
    ap.add_argument("--lengths", default="2048,4096", help="prompt lengths in tokens")
    ap.add_argument("--per-length", type=int, default=8, help="needles per length")
    ap.add_argument("--ratios", default="0.05", help="fractions of the context kept")
    ap.add_argument("--policies", default=",".join(POLICIES), help="edge_sel policies (name or name:key=value:...)")
    ap.add_argument("--max-new", type=int, default=MAX_NEW, help="greedy tokens per answer (decode steps + 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="results JSON, written after every case")
    ap.add_argument("--markdown", help="write the table here")
    a = ap.parse_args(argv)
    if a.per_length < 1 or a.max_new < 2:
        ap.error("--per-length must be >= 1 and --max-new >= 2")
    ratios = [float(x) for x in a.ratios.split(",") if x]
    if any(not 0 < r < 1 for r in ratios):
        ap.error("--ratios must be fractions in (0, 1)")
    lengths = [int(x) for x in a.lengths.split(",") if x]
    from edge_sel.runtime.generate import Generator

    from .ppl_lockstep import generate_lockstep
    from .ppl_texts import alice

    gen = Generator(str(Path(a.bundle).absolute()), threads=a.threads)
    if max(lengths) + 64 + a.max_new > gen.context:
        ap.error(f"--lengths: the model's context is {gen.context} tokens")
    tok = gen.tokenizer
    encode = (lambda t, bos: ([gen.bundle.spec.bos_id] if bos and gen.bundle.spec.bos_id is not None else [])
              + tok.encode(t, add_special_tokens=False))
    decode = tok.decode
    configs = [("edge_sel full", "full", None)]
    for spec in [p for p in a.policies.split(",") if p]:
        label, factory = parse_policy(spec)
        configs += [(f"edge_sel {label} @{r:g}", factory, r) for r in ratios]
    doc = {"args": vars(a), "cases": [], "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                                  text=True, cwd=Path(__file__).parent).stdout.strip()}
    if (a.haystack or ("alice" if a.split == "held" else "botchan")) == "alice":
        haystack = alice()
    else:
        from edge_sel.export.textdata import botchan

        haystack = botchan()
    for c in cases(encode, decode, encode(haystack, False), lengths, a.per_length, a.split):
        t0 = time.perf_counter()
        got = generate_lockstep(gen, c["context_ids"], c["question_ids"], configs, a.max_new)
        res = {}
        for name, r in got.items():
            text = decode(r["tokens"])
            res[name] = {"ok": is_correct(c["number"], text), "answer": text[:48], "step_ms": r["step_ms"],
                         "capacity": r["capacity"], "kept": r["kept"]}
        doc["cases"].append({k: c[k] for k in ("length", "depth", "template", "key", "number")} | {"results": res})
        print(f"{c['length']} d{c['depth']} t{c['template']}: {time.perf_counter() - t0:.0f}s "
              + " ".join(f"{n.split(' ', 1)[1]}={'Y' if r['ok'] else 'n'}" for n, r in res.items()), file=sys.stderr, flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    if a.markdown:
        Path(a.markdown).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
