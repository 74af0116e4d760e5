"""``python -m benchmarks.layer_shares``: calibrate ``mpcache_ea_alloc``'s per-layer shares of the KV budget.

Each window's compressed prefix (:mod:`benchmarks.ppl_texts`, the **tune** half by default: the held-out half judges
the result) runs through the engine with the full cache and :class:`LongRangeAttention` recording, per layer and KV
head, each key's largest attention from a query at least ``--distance`` positions after it; at each kept fraction one
top-k over every layer's scores (:func:`global_shares`) gives each layer's share; the shares are averaged over the
windows. Prints the table to paste into ``CALIBRATED`` (runtime/policies/layer_allocation.py) and writes it as JSON.

    python -m benchmarks.layer_shares --bundle B --split tune --out shares.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .ppl_texts import window_ids, windows


def calibrate(bundle: str, split: str, ratios: list[float], distance: int, threads: int | None, log=print,
              statistic: str = "long_range") -> dict:
    from edge_sel.runtime.generate import Generator
    from edge_sel.runtime.policies.layer_allocation import LongRangeAttention, global_shares
    from edge_sel.runtime.policies.prompt_allocation import MPCacheEASurvey

    gen = Generator(bundle, threads=threads)
    tok = gen.tokenizer
    ids = window_ids(lambda t: tok.encode(t, add_special_tokens=False), windows(split), bos=gen.bundle.spec.bos_id)
    per: dict[float, list] = {r: [] for r in ratios}
    for name, w in ids.items():
        t0 = time.perf_counter()
        if statistic == "reconstruction":  # KVzip's score: mpcache_ea_survey's survey, passes and all
            pol = MPCacheEASurvey(statistic="reconstruction")
            gen.survey(pol, w["prefix"], gen.reconstruction_passes(pol, w["prefix"]))
            scores = pol.measured
        else:
            rec = LongRangeAttention(distance=distance)
            Generator(bundle, policy=rec, threads=threads).generate(w["prefix"], max_new_tokens=1, stop=False)
            scores = rec.stacked(len(w["prefix"]))
        for r in ratios:
            per[r].append(global_shares(scores, r))
        log(f"{name}: {time.perf_counter() - t0:.0f}s")
    geometry = (gen.n_layers, gen.heads, gen.kv_heads, gen.head_dim)
    table = {r: np.mean(per[r], axis=0) for r in ratios}
    spread = {r: float(np.std(per[r], axis=0).max()) for r in ratios}
    return {"geometry": list(geometry), "windows": list(ids), "distance": distance, "statistic": statistic,
            "shares": {f"{r:g}": [round(float(x), 3) for x in table[r]] for r in ratios},
            "max_std_over_windows": spread}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.layer_shares", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a generate bundle")
    ap.add_argument("--split", default="tune", choices=["tune", "held", "all"])
    ap.add_argument("--ratios", default="0.2,0.1,0.05", help="kept fractions to calibrate at")
    ap.add_argument("--distance", type=int, default=32, help="a query this many positions after a key or more scores it")
    ap.add_argument("--statistic", default="long_range", choices=["long_range", "reconstruction"],
                    help="long_range: each key's largest attention from a distant prompt query; reconstruction: KVzip's "
                         "(the largest attention from a pass repeating the context, mpcache_zip's score)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="the table as JSON")
    a = ap.parse_args(argv)
    ratios = [float(x) for x in a.ratios.split(",") if x]
    if any(not 0 < r <= 1 for r in ratios) or a.distance < 1:
        ap.error("--ratios must be fractions in (0, 1] and --distance positive")
    res = calibrate(str(Path(a.bundle).absolute()), a.split, ratios, a.distance, a.threads,
                    log=lambda m: print(m, file=sys.stderr, flush=True), statistic=a.statistic)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"    {tuple(res['geometry'])}: {{")
    for r, s in res["shares"].items():
        print(f"        {r}: (")
        for i in range(0, len(s), 10):
            print("            " + ", ".join(f"{x:.3f}" for x in s[i:i + 10]) + ",")
        print("        ),")
    print("    },")
    return 0


if __name__ == "__main__":
    sys.exit(main())
