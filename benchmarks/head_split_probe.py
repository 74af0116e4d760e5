"""``python -m benchmarks.head_split_probe``: what unequal KV-head counts in a layer would give ``mpcache_ea_survey``.

KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction") and Ada-KV (Feng
et al., 2024) let every KV head compete in one top-k, so a layer's heads keep very different counts; edge_sel's
cache gives every KV head of a layer the same slots (``LayerCache``: the byte budget is a hard bound on allocated
bytes). This probe measures the perplexity such a split would reach before anyone builds a byte-bounded ragged cache:
each layer keeps the planner's total (``kv x target``), split between its heads in proportion to the survey's one
top-k over every (layer, KV head) score (KVzip's, :func:`head_counts`) raised to ``head_temper``; each head then keeps
its count by ``mpcache_ea``'s own score (sinks and a recent window per head). The split is realised by **growing
the layer's cache** to the largest head's count, the other heads padded with ``EMPTY_POS`` slots (masked by the
attention graph): the accounting is valid slots, not allocated bytes, so this is a measurement, not a policy.
``head_source="ea"`` splits by a top-k over the layer's own eviction scores instead (Ada-KV's rule, ``head_floor``
its uniform safeguard). Below the survey's ``min_kept`` (7.5 %) there is no survey and the layers stay equal.

Scored on the perplexity benchmark's windows in lockstep (:mod:`benchmarks.ppl_lockstep`); ratios to the full cache:

    python -m benchmarks.head_split_probe --bundle B --split tune --out probe.json \
      --configs '[["base", {}, 0.2], ["heads t.25", {"head_temper": 0.25}, 0.2]]'

A config with no options is ``mpcache_ea_survey`` itself. ``pad`` reports the allocated slots over the valid ones
(what a padded cache charged honestly would cost).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from edge_sel.runtime.manifest import EMPTY_POS
from edge_sel.runtime.policies.base import SINKS
from edge_sel.runtime.policies.composite import Composite
from edge_sel.runtime.policies.mpcache import MPCacheDynamic
from edge_sel.runtime.policies.prompt_allocation import MPCacheEASurvey


def head_counts(scores: np.ndarray, kept: float, sinks: int = SINKS) -> np.ndarray:
    """``[layers, kv]`` how many keys each KV head wins in one top-k at ``kept`` over ``scores`` ``[layers, kv, n]``."""
    s = np.array(scores, dtype=np.float64, copy=True)
    s[..., :sinks] = np.inf
    k = max(1, int(round(kept * s.size)))
    pick = np.argpartition(-s.reshape(-1), k - 1)[:k]
    return np.bincount(pick // s.shape[2], minlength=s.shape[0] * s.shape[1]).reshape(s.shape[:2]).astype(np.float64)


def split_total(total: int, frac: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Integer counts summing to ``total`` (when ``[lo, hi]`` allows), each near ``total * frac``."""
    ideal = total * np.asarray(frac, dtype=np.float64)
    c = np.clip(np.floor(ideal), lo, hi).astype(np.int64)
    while c.sum() > total and (c - 1 >= lo).any():
        c[np.argmax(np.where(c - 1 >= lo, c - ideal, -np.inf))] -= 1
    while c.sum() < total and (c + 1 <= hi).any():
        c[np.argmax(np.where(c + 1 <= hi, ideal - c, -np.inf))] += 1
    return c


@dataclass
class HeadSplitProbe(MPCacheEASurvey):
    """``mpcache_ea_survey`` with per-KV-head counts at the look-once compression (module docstring)."""

    head_temper: float = 1.0     # the survey's per-head counts raised to this (0: equal heads, 1: KVzip's split)
    head_min: int = 16           # the fewest keys a head keeps
    head_source: str = "survey"  # "survey": the survey's global top-k; "ea": a top-k over the layer's eviction scores
    head_floor: float = 0.0      # "ea": this share of the layer's total split equally first (Ada-KV's safeguard)

    def layer_shares(self, n_layers, kept=1.0, model=()):
        self._frac = None
        if self.measured is not None and len(self.measured) == n_layers and kept < 1:
            c = head_counts(self.measured, kept) ** self.head_temper
            self._frac = c / np.maximum(c.sum(axis=1, keepdims=True), 1e-30)
        return super().layer_shares(n_layers, kept, model)

    def begin(self, ctx):
        super().begin(ctx)
        self.counts: dict[int, np.ndarray] = {}  # per layer, the heads' kept counts (read by the probe's report)
        self.grow_into = None
        self._layer = None

    def keep(self, layer, cache, target, phase):
        on = self.head_source == "ea" or getattr(self, "_frac", None) is not None
        self._layer = layer if phase == "final" and on else None
        try:
            return super().keep(layer, cache, target, phase)
        finally:
            self._layer = None

    def choose(self, n, kv_heads, score, target):
        L = self._layer
        if L is None or score.ndim != 2:
            return super().choose(n, kv_heads, score, target)
        if self.head_source == "ea":
            s = np.array(score, dtype=np.float64)
            s = s / np.maximum(s.sum(axis=1, keepdims=True), 1e-30)
            s[:, :SINKS] = np.inf
            k = kv_heads * target
            c = np.bincount(np.argpartition(-s.reshape(-1), k - 1)[:k] // n, minlength=kv_heads) ** self.head_temper
            frac = self.head_floor / kv_heads + (1 - self.head_floor) * c / c.sum()
        else:
            frac = self._frac[L]
        counts = split_total(kv_heads * target, frac, min(target, self.head_min), n)
        m = int(counts.max())
        rows = []
        for h, c in enumerate(int(x) for x in counts):
            first = self.sinks_kept(c)
            idx = self.keep_top(n, score[h], c, recent=min(self.recent_kept(c), c - first), first=first)
            rows.append(np.concatenate([idx, np.full(m - c, idx[-1])]))  # padding, masked in compacted()
        self.counts[L] = counts
        into = self.grow_into
        if into is not None and m > target:  # the measurement's cache grows: valid slots are what is accounted
            into.__init__(into.kv_heads, into.capacity + m - target, into.head_dim, fetch=into.fetch)
        return np.stack(rows)

    def compacted(self, layer, cache):
        super().compacted(layer, cache)
        counts = self.counts.get(layer)
        if counts is not None and cache.n == counts.max():  # right after the split: mask each head's padding
            for h, c in enumerate(counts):
                cache.pos[h, c:cache.n] = EMPTY_POS
                cache.score[h, c:cache.n] = 0.0


class _Growing(Composite):
    """Hands the layer's cache to the probe before the compression (which may grow it)."""

    def compress(self, layer, cache, target, phase, into=None):
        self.parts[0].grow_into = into
        try:
            return super().compress(layer, cache, target, phase, into)
        finally:
            self.parts[0].grow_into = None


def probe(**kw):
    """The probe with MPCache's dynamic selection kept off (its statistics are sized by the planned capacity; the
    perplexity continuation never selects anyway)."""
    parts = (HeadSplitProbe(**kw), MPCacheDynamic(min_tokens_to_select=1 << 62))
    return _Growing(parts=parts, title="head_split_probe")


def main(argv=None) -> int:
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.generate import Generator

    from .generate import _tokenizer
    from .ppl_lockstep import score_lockstep
    from .ppl_texts import window_ids, windows

    ap = argparse.ArgumentParser(prog="python -m benchmarks.head_split_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--split", default="tune", choices=["tune", "held", "extra"])
    ap.add_argument("--windows", help="only these windows (comma-separated names)")
    ap.add_argument("--configs", required=True, help='JSON [[label, {probe options}, kept fraction], ...]')
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    tok = _tokenizer(a.bundle)
    wins = [w for w in windows(a.split) if not a.windows or w.name in a.windows.split(",")]
    ids = window_ids(lambda t: tok.encode(t, add_special_tokens=False).ids, wins, bos=Bundle.open(a.bundle).spec.bos_id)
    gen = Generator(a.bundle, threads=a.threads)
    from edge_sel.runtime.policies import REGISTRY

    made: dict = {}  # the last policy each config made (its per-layer counts, for the padding report)

    def factory(name, kw):
        def make():
            made[name] = probe(**kw)
            return made[name]
        return make if kw else REGISTRY["mpcache_ea_survey"]

    configs = [("full", "full", None)]
    configs += [(f"{label} @{r:g}", factory(f"{label} @{r:g}", kw), r) for label, kw, r in json.loads(a.configs)]
    doc: dict = {"args": vars(a), "nll": {}, "pad": {}}
    for wname, w in ids.items():
        t0 = time.perf_counter()
        got = score_lockstep(gen, w["prefix"], w["cont"], configs)
        for name, r in got.items():
            doc["nll"].setdefault(name, {})[wname] = r["nll"]
            counts = made[name].parts[0].counts if name in made else None
            if counts:  # allocated (largest head x heads) over valid slots, summed over the layers
                doc["pad"].setdefault(name, {})[wname] = sum(len(c) * int(c.max()) for c in counts.values()) / sum(
                    int(c.sum()) for c in counts.values())
        print(f"{wname}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        full = doc["nll"]["full"]
        doc["ratio"] = {n: math.exp(float(np.mean([v[x] - full[x] for x in v]))) for n, v in doc["nll"].items()}
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
    for n, v in doc["ratio"].items():
        pads = doc["pad"].get(n)
        print(f"{n}: {v:.4f}" + (f"  (pad {np.mean(list(pads.values())):.3f})" if pads else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
