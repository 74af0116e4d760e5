"""Decode-step variants measured in one process: the engine's step with feeds (``decode_step``) against the step over
IO bindings (``BoundDecoder``), on the same prefilled call, interleaved in rounds, after checking both give the same
logits from the same cache state.

    python -m benchmarks.decode_ab BUNDLE [BUNDLE ...] --prompt-tokens 2048 --threads 2 --policy full
    python -m benchmarks.decode_ab A B --bundles --prompt-tokens 2048     # bundle A's step against bundle B's

Prints one JSON line per bundle: median ms per step of each variant and their ratio. ``--bundles``: the engine's
(bound) steps of the given bundles (e.g. the same weights in two graph forms), all open in one process, interleaved;
the ratios are against the first bundle.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np

from edge_sel.runtime.generate import Generator
from edge_sel.runtime.generate.decode import BoundDecoder, decode_step


def _prompt(g: Generator, n: int) -> list[int]:
    from edge_sel.export.textdata import botchan

    return g.tokenizer.encode_prompt(botchan(), False, None)[:n]


def ab(bundle: str, n: int, threads: int, policy: str, budget, rounds: int, steps: int) -> dict:
    g = Generator(bundle, policy=policy, kv_budget=budget, threads=threads)
    ids = _prompt(g, n)
    it = g.run(ids, rounds * steps * 2 + 4, 0.0, 1.0, None, False, None, False)
    tok, logits, call = next(it)
    m = g.model
    bound = BoundDecoder(m, call, g.H, g.heads, g.kv_heads, g.head_dim)
    tok, pos = int(np.argmax(logits)), len(ids)
    # the same state through both: the logits agree
    saved = copy.deepcopy(call.caches)
    a = decode_step(m, call, tok, pos)
    call.caches = saved
    bound.call = call
    b = bound.step(tok, pos)
    diff = float(np.abs(a - b).max())
    tok, pos = int(np.argmax(b)), pos + 1
    run = {"feeds": lambda t, at: decode_step(m, call, t, at), "bound": bound.step}
    times = {k: [] for k in run}
    for r in range(rounds):
        for k in (list(run) if r % 2 == 0 else list(reversed(run))):
            for _ in range(steps):
                t0 = time.perf_counter()
                lg = run[k](tok, pos)
                times[k].append(time.perf_counter() - t0)
                tok, pos = int(np.argmax(lg)), pos + 1
    it.close()
    f, b = statistics.median(times["feeds"]), statistics.median(times["bound"])
    g.close()
    return {"bundle": bundle, "prompt_tokens": len(ids), "policy": policy, "threads": threads, "shared_pool": m.shared_pool,
            "feeds_ms": round(1e3 * f, 3), "bound_ms": round(1e3 * b, 3), "ratio": round(b / f, 3), "logits_max_abs_diff": diff}


def bundles_ab(paths: list[str], n: int, threads: int, rounds: int, steps: int) -> dict:
    gens, state = [], []
    for path in paths:
        g = Generator(path, policy="full", threads=threads)
        ids = _prompt(g, n)
        it = g.run(ids, rounds * steps + 4, 0.0, 1.0, None, False, None, False)
        tok, logits, call = next(it)
        gens.append((g, it, BoundDecoder(g.model, call, g.H, g.heads, g.kv_heads, g.head_dim)))
        state.append((int(np.argmax(logits)), len(ids)))
    times: list[list[float]] = [[] for _ in paths]
    for r in range(rounds):
        for i in (range(len(paths)) if r % 2 == 0 else reversed(range(len(paths)))):
            tok, pos = state[i]
            for _ in range(steps):
                t0 = time.perf_counter()
                lg = gens[i][2].step(tok, pos)
                times[i].append(time.perf_counter() - t0)
                tok, pos = int(np.argmax(lg)), pos + 1
            state[i] = (tok, pos)
    med = [statistics.median(t) for t in times]
    for g, it, _ in gens:
        it.close()
        g.close()
    return {"prompt_tokens": n, "threads": threads, "shared_pool": gens[0][0].model.shared_pool,
            "bundles": paths, "ms": [round(1e3 * m, 3) for m in med], "ratio": [round(m / med[0], 3) for m in med]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles_", nargs="+", metavar="bundles")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policy", default="full")
    p.add_argument("--kv-budget", default=None)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--bundles", action="store_true", help="the bundles' steps against each other (full cache)")
    args = p.parse_args(argv)
    if args.bundles:
        print(json.dumps(bundles_ab(args.bundles_, args.prompt_tokens, args.threads, args.rounds, args.steps)), flush=True)
        return 0
    for b in args.bundles_:
        print(json.dumps(ab(b, args.prompt_tokens, args.threads, args.policy, args.kv_budget, args.rounds, args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    from edge_sel.runtime.sessions import own_process

    own_process()  # measured as the edge-sel command runs: the thread-pool rule applies
    raise SystemExit(main())
