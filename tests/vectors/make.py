"""Shared test vectors: what a conforming runtime computes on small bundles of every scoring kind.

Any runtime that reads the bundle format (the Python reference, the Node binding, a future Swift or Kotlin one)
proves itself by reproducing these files: token ids, a few numbers of every layer's pooled state, the early-ranking
decisions of a schedule and the final scores. ``docs/BUNDLE.md`` ("Proving a runtime") describes the file format.

The bundles themselves are not committed: they are exported here from tiny random-weight models built
deterministically (``tests/tiny_models.py``), calibrated with the builtin data, then the reference runtime writes
``<case>.json``. Regenerate after a change that alters the numbers (an export or runtime change), from a checkout:

    python tests/vectors/make.py                      # tiny bundles -> tests/vectors/*.json (bundles in a temp dir)
    python tests/vectors/make.py --keep-bundles DIR   # and keep the bundles (DIR/<case>) for a binding's tests
    python tests/vectors/make.py --bundle PATH --name minilm --out DIR   # vectors of an existing (real) bundle
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: tiny_models

VECTOR_VERSION = 1
POOLED_VALUES = 4        # first values of each item's pooled state recorded per layer
SCORE_ATOL = 1e-4        # scores and pooled values agree within this (absolute, or relative for large values)
TOP_K = 5
N_DOCS = 16

# name -> (maker in tiny_models, its keyword arguments, calibration method)
CASES = {
    "tiny_bert_bi": ("make_bert", {}, "probe"),
    "tiny_bert_ce": ("make_bert", {"cross_encoder": True}, "probe"),
    "tiny_llama_yes_no": ("make_decoder", {}, "probe"),
}


def texts() -> tuple[list[str], list[str]]:
    """Queries and documents (builtin CPython docstrings; one document long enough to be truncated)."""
    from edge_sel.export.textdata import docstring_pairs

    pairs = docstring_pairs(limit=80)
    docs = [p for _, p in pairs[40:40 + N_DOCS - 1]]
    docs.append(" ".join(docs[:8]) * 2)
    return [pairs[40][0], pairs[47][0]], docs


def forced_schedules(scoring: str, n_layers: int) -> dict[str, dict]:
    """Schedules that prune on any input (the calibrated one may not): every rule, the non-probe methods."""
    early = "cosine" if scoring == "bi_encoder" else "head"
    return {
        "rank_half": {"method": early, "rule": "rank", "top_k": TOP_K, "layers": [{"layer": 0, "keep": 0.5}]},
        "margin_clusters": {"method": early, "rule": "margin", "top_k": TOP_K, "floor": 6, "cluster_gap": 0.25,
                            "layers": [{"layer": l, "margin": 0.0} for l in range(n_layers - 1)]},
        "spread": {"method": early, "rule": "spread", "top_k": TOP_K, "layers": [{"layer": 0, "spread": 0.5}]},
    }


def export_case(name: str, root: Path) -> Path:
    """Export and calibrate the tiny bundle of case ``name`` under ``root`` (deterministic: seeded weights,
    tokenizers trained on builtin text); returns the bundle path."""
    import tiny_models
    from edge_sel.export import export

    maker, kw, _ = CASES[name]
    hf = getattr(tiny_models, maker)(root / f"{name}-hf", **kw)
    pin_tokenizer(hf, "bert" if maker == "make_bert" else "chat")
    if maker == "make_bert":
        widen_bert(hf, kw.get("cross_encoder", False))
    out = export(hf, root / name, verify=True)
    shutil.rmtree(hf, ignore_errors=True)
    return calibrate_case(name, out)


def pin_tokenizer(hf: Path, kind: str) -> None:
    """Replace the freshly trained tokenizer with the committed one (``tokenizers/<kind>.json``, trained once by
    ``tiny_models``): training breaks ties in a different order in every process, so the ids would change."""
    from tokenizers import Tokenizer

    pinned = HERE / "tokenizers" / f"{kind}.json"
    trained = Tokenizer.from_file(str(hf / "tokenizer.json"))
    if Tokenizer.from_file(str(pinned)).get_vocab_size() != trained.get_vocab_size():
        raise RuntimeError(f"{pinned} has another vocabulary size than tiny_models' tokenizer: re-pin it")
    shutil.copyfile(pinned, hf / "tokenizer.json")
    (hf / "vocab.txt").unlink(missing_ok=True)  # BERT's slow-tokenizer vocabulary: tokenizer.json is the one read


def widen_bert(hf: Path, cross_encoder: bool) -> None:
    """Widen the tiny BERT's matrices like the tiny decoders' (``tiny_models.save_widened``): the default init gives
    scores within 1e-5 of each other, which no tolerance could order."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from tiny_models import save_widened

    model = (AutoModelForSequenceClassification if cross_encoder else AutoModel).from_pretrained(hf).eval()
    save_widened(model, AutoTokenizer.from_pretrained(hf), hf)


def calibrate_case(name: str, bundle: Path) -> Path:
    from edge_sel.export.passes.calibrate import calibrate

    calibrate(bundle, "builtin", top_k=TOP_K, n_queries=6, n_candidates=24, method=CASES[name][2])
    return bundle


def _round(x, digits: int = 6):
    return [round(float(v), digits) for v in np.asarray(x).ravel()]


def make_vectors(bundle: str | Path, name: str, with_plans: bool = True) -> dict:
    """The reference runtime's results on ``bundle`` for the builtin queries and documents (``with_plans``: and the
    planner's decisions, whose budgets follow the bundle's file sizes)."""
    from edge_sel.runtime import Bundle
    from edge_sel.runtime.rerank import Reranker

    b = Bundle.open(bundle)
    spec = b.spec
    queries, docs = texts()
    rr = Reranker(b)
    out = {"vector_version": VECTOR_VERSION, "case": name, "scoring": spec.model.scoring, "n_layers": len(spec.layers),
           "tolerance": SCORE_ATOL, "pooled_values": POOLED_VALUES, "top_k": TOP_K, "documents": docs, "queries": []}
    n_layers = len(spec.layers)
    for q in queries:
        enc = rr.encoder.encode(q, docs)
        pooled: dict[int, np.ndarray] = {}

        def observe(obs):
            for it, row in zip(obs.items, obs.pooled):
                pooled.setdefault(obs.layer, {})[int(it)] = np.asarray(row[:POOLED_VALUES])

        scores = rr.trace(q, docs, observe)
        entry = {
            "query": q,
            "tokens": {"ids": [x.tolist() for x in enc.doc_ids], "prefix_len": int(enc.prefix_len),
                       "type_ids": None if enc.doc_types is None else [x.tolist() for x in enc.doc_types],
                       "query_ids": None if enc.query_ids is None else enc.query_ids.tolist(),
                       "n_truncated": int(enc.n_truncated)},
            # per layer, per item (documents, then the query item of a bi-encoder): the first pooled values
            "pooled": [[_round(pooled[l][i]) for i in sorted(pooled[l])] for l in range(n_layers)],
            "scores": _round(scores),
            "rankings": {},
        }
        schedules = {"none": "off", "bundle": "auto", **forced_schedules(spec.model.scoring, n_layers)}
        for label, sched in schedules.items():
            r = Reranker(b, pruning=sched)
            res = r.rank(q, docs, top_k=TOP_K)
            full = r.rank(q, docs, top_k=None)
            entry["rankings"][label] = {
                "schedule": sched if isinstance(sched, dict) else None,
                "top": [[x["corpus_id"], round(x["score"], 6)] for x in res],
                "order": [x["corpus_id"] for x in full],
                "pruned_at_layer": [next((x.get("pruned_at_layer", -1) for x in full if x["corpus_id"] == i)) for i in range(len(docs))],
                "live_per_layer": r.last_stats["live_per_layer"],
            }
        out["queries"].append(entry)
    out["bundle_schedule"] = None if spec.schedule is None else spec.schedule.to_dict()
    if with_plans:
        out["plans"] = plans(b, queries[0], docs)
    return out


def plans(b, query: str, docs: list[str]) -> list[dict]:
    """What the planner decides for a few budgets (a binding with the same planner reproduces them)."""
    from edge_sel.runtime.rerank import Reranker

    rr = Reranker(b, pruning="off", spill=False)
    minimum = rr.minimum_budget(query, docs)
    out = []
    for budget in (None, minimum, minimum + (1 << 20), minimum * 4):
        r = Reranker(b, memory_budget=budget, pruning="off", spill=False)
        r.rank(query, docs, top_k=TOP_K)
        st = r.last_stats
        out.append({"budget": budget, "window_layers": st["window_layers"], "chunk_tokens": st["chunk_tokens"],
                    "n_chunks": st["n_chunks"], "chunk_size": st["chunk_size"]})
    out.append({"budget": minimum - 1, "error": "BudgetError", "minimum_bytes": minimum})
    return out


def compare(vectors: dict, got: dict) -> list[str]:
    """Differences between two vector files (expected, actual) beyond the tolerance; empty when they agree."""
    tol = vectors["tolerance"]
    bad: list[str] = []

    def close(a, b, what):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape or not np.allclose(a, b, atol=tol, rtol=tol):
            bad.append(f"{what}: expected {a.ravel()[:6].tolist()}…, got {b.ravel()[:6].tolist()}…")

    for qe, qg in zip(vectors["queries"], got["queries"]):
        q = qe["query"][:30]
        if qe["tokens"] != qg["tokens"]:
            bad.append(f"{q}: token ids differ")
        for l, (pe, pg) in enumerate(zip(qe["pooled"], qg["pooled"])):
            close(pe, pg, f"{q}: pooled states after layer {l}")
        close(qe["scores"], qg["scores"], f"{q}: scores")
        for label, re in qe["rankings"].items():
            rg = qg["rankings"][label]
            for key in ("order", "pruned_at_layer", "live_per_layer"):
                if re[key] != rg[key]:
                    bad.append(f"{q}: schedule {label}: {key} expected {re[key]}, got {rg[key]}")
            if [x[0] for x in re["top"]] != [x[0] for x in rg["top"]]:
                bad.append(f"{q}: schedule {label}: top ids differ")
            close([x[1] for x in re["top"]], [x[1] for x in rg["top"]], f"{q}: schedule {label}: top scores")
    if "plans" in got and vectors.get("plans") != got["plans"]:
        bad.append(f"plans: expected {vectors.get('plans')}, got {got.get('plans')}")
    return bad


def write(vectors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(vectors, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="where the <case>.json files go (default: tests/vectors)")
    ap.add_argument("--keep-bundles", type=Path, help="keep the exported tiny bundles here (DIR/<case>)")
    ap.add_argument("--bundle", type=Path, help="write vectors of this existing bundle instead of the tiny ones")
    ap.add_argument("--name", help="case name for --bundle")
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="tiny cases to build")
    args = ap.parse_args(argv)
    if args.bundle:
        name = args.name or args.bundle.name
        write(make_vectors(args.bundle, name), args.out / f"{name}.json")
        return 0
    root = args.keep_bundles or Path(tempfile.mkdtemp(prefix="edge_sel-vectors-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.cases:
            bundle = export_case(name, root)
            write(make_vectors(bundle, name), args.out / f"{name}.json")
            print(f"{name}: {args.out / (name + '.json')}")
    finally:
        if not args.keep_bundles:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
