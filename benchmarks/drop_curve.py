"""What dropping layers costs a bundle's ranking: top-10 agreement with the full model as 1, 2, ... L-1 layers go.

    python -m benchmarks.drop_curve BUNDLE [--queries 16] [--candidates 64] [--out f.json]

Layers are taken in the order ``edge-sel export --drop-layers N`` would take them (``edge_sel.export.passes.drop_layers``:
each layer's own measured top-10 overlap when skipped alone, ties broken by block influence), and the agreement of
the cumulative drop is measured on the builtin calibration text (never the benchmark text), with the runtime only.
Used for configuration (g) (dropped layers) on the encoders: a latency target of 0.5x needs about half the layers gone.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from edge_sel.export.passes.drop_layers import agreement, choose_layers
    from edge_sel.runtime import Reranker
    from edge_sel.export.passes.calibrate import builtin_data
    from edge_sel.export.passes.traces import collect_traces

    from edge_sel.runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    L = len(bundle.layers)
    res = choose_layers(bundle, L - 1, n_queries=args.queries, n_candidates=args.candidates)
    individual, influence = res["individual"], res["influence"]
    ranked = sorted(individual, key=lambda layer: (-individual[layer]["top10_overlap"], influence[layer]))
    data = builtin_data(args.queries, args.candidates, seed=1)  # the data choose_layers measured on
    rr = Reranker(bundle, pruning="off")
    try:
        refs = [np.argsort(-t.final, kind="stable") for t in collect_traces(rr, data)]
        curve = []
        for n in range(1, L):
            row = agreement(rr, data, refs, ranked[:n])
            row["dropped"] = sorted(ranked[:n])
            curve.append(row)
            print(f"drop {n}: layers {row['dropped']}: top-10 identical {row['top10_identical']:.2f}, "
                  f"overlap {row['top10_overlap']:.3f}", flush=True)
    finally:
        rr.close()
    doc = {"bundle": str(args.bundle), "queries": args.queries, "candidates": args.candidates, "influence": influence,
           "individual": {str(k): v for k, v in individual.items()}, "curve": curve}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
