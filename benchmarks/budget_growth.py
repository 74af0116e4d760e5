"""RSS growth of one rerank call as a multiple of its memory budget, for growing numbers of documents.

    python -m benchmarks.budget_growth [--n-docs 40,500,2000,20000] [--work DIR] [--out results/budget_growth.json]

Exports the three tiny random-weight test models (cross-encoder, BERT bi-encoder, Llama yes/no; ``tests/tiny_models.py``)
into ``--work`` once, writes a documents file per N (short CPython docstring passages), and for each bundle picks
three budgets: the smallest the plan accepts for the largest N (``Reranker.minimum_budget``), 1.5x and 3x that.
Every cell runs in a fresh process: open the bundle, trim the heap, take RSS as the baseline, rank the documents
file (read and tokenized batch by batch, as ``edge-sel rerank`` does) and report peak RSS minus the baseline. The
line the budget must hold: growth <= 1.1 x budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import REPO, child_env, module_cmd

QUERY = "how do I copy a file to another folder"
BUNDLES = {"tiny CE": ("ce", {"cross_encoder": True}), "tiny BERT bi": ("bi", {}), "tiny Llama yes/no": ("llama", None)}


def _bundles(work: Path) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_bert, make_decoder

    from edge_sel.export import export

    out = {}
    for label, (name, kw) in BUNDLES.items():
        root = work / name
        if not (root / "bundle" / "manifest.json").exists():
            hf = make_decoder(root / "hf") if kw is None else make_bert(root / "hf", **kw)
            export(hf, root / "bundle", verify=True)
        out[label] = root / "bundle"
    return out


def _documents(work: Path, n: int) -> Path:
    from edge_sel.export.textdata import docstring_pairs

    path = work / f"docs{n}.txt"
    if not path.exists():
        passages = [" ".join(p.split())[:160] for _, p in docstring_pairs(limit=400)]
        path.write_text("".join(f"{passages[i % len(passages)]} ({i})\n" for i in range(n)))
    return path


def _worker(args) -> dict:
    from edge_sel.runtime import Reranker
    from edge_sel.runtime.documents import DocumentsFile
    from edge_sel.runtime.memory import peak_rss_bytes, reset_peak, rss_bytes, trim_heap

    rr = Reranker(args.bundle, memory_budget=args.budget, spill_dir=args.spill_dir)
    trim_heap()
    base = rss_bytes()
    reset_peak()
    t = time.perf_counter()
    with DocumentsFile(args.documents, spool_dir=args.spill_dir) as docs:
        rr.rank(QUERY, docs, top_k=10)
    seconds = time.perf_counter() - t
    st = rr.last_stats
    return {"growth_bytes": peak_rss_bytes() - base, "budget_bytes": rr.memory_budget, "seconds": seconds,
            "spill": st["spill"], "tokens_in_ram": st["plan_estimate"].get("tokens"), "chunk_tokens": st["chunk_tokens"],
            "n_chunks": st["n_chunks"], "window": st["window_layers"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", default="40,500,2000,20000")
    ap.add_argument("--work", help="folder for the tiny bundles and documents (default: a temporary folder)")
    ap.add_argument("--out", help="write every cell as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--documents", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--spill-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    from edge_sel.runtime import Reranker
    from edge_sel.runtime.documents import DocumentsFile

    work = Path(args.work or tempfile.mkdtemp(prefix="edge_sel-budget-growth-"))
    work.mkdir(parents=True, exist_ok=True)
    spill = work / "spill"
    spill.mkdir(exist_ok=True)
    sizes = [int(x) for x in args.n_docs.split(",")]
    docs = {n: _documents(work, n) for n in sizes}
    cells, ok = [], True
    print("| bundle | budget | " + " | ".join(f"N={n:,}" for n in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for label, bundle in _bundles(work).items():
        with DocumentsFile(docs[max(sizes)]) as d:
            tight = Reranker(bundle).minimum_budget(QUERY, d)
        for factor in (1.0, 1.5, 3.0):
            budget = int(-(-tight * factor // 2**20) * 2**20)  # whole MiB, rounded up
            row = []
            for n in sizes:
                cmd = module_cmd("budget_growth", "--worker", "--bundle", str(bundle), "--documents", str(docs[n]),
                                 "--budget", str(budget), "--spill-dir", str(spill))
                out = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
                if out.returncode != 0:
                    sys.stderr.write(out.stderr)
                    return out.returncode
                cell = {"bundle": label, "n_docs": n, "factor": factor, **json.loads(out.stdout.strip().splitlines()[-1])}
                cells.append(cell)
                ratio = cell["growth_bytes"] / budget
                ok &= ratio <= 1.1
                row.append(f"{ratio:.2f}x{' (spill)' if cell['spill'] else ''}")
            print(f"| {label} | {budget / 2**20:.0f} MiB | " + " | ".join(row) + " |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"n_docs": sizes, "query": QUERY, "cells": cells}, indent=1))
    print("every cell within 1.1 x budget" if ok else "SOME CELL ABOVE 1.1 x BUDGET")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
