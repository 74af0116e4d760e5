"""``benchmarks.head_split_probe``: unequal KV-head counts inside a layer, measured with valid slots as the accounting.
The probe must keep each layer's planned total, split it unequally, mask the padding, and equal the survey policy when
the heads stay equal (a tiny random-weight Llama generate bundle)."""

from __future__ import annotations

import numpy as np

from benchmarks.head_split_probe import head_counts, probe, split_total
from benchmarks.ppl_lockstep import score_lockstep
from edge_sel.runtime.generate import Generator

from gen_tiny import long_text


def test_split_total_keeps_the_total_and_the_bounds():
    c = split_total(300, np.array([0.7, 0.2, 0.1]), 40, 200)
    assert c.sum() == 300 and c.min() >= 40 and c.max() <= 200 and c[0] > c[1] >= c[2]
    assert list(split_total(30, np.ones(3) / 3, 4, 100)) == [10, 10, 10]
    counts = head_counts(np.random.default_rng(0).random((2, 3, 50)), 0.2)
    assert counts.sum() == 60 and (counts >= 4).all()  # the sinks always win


def test_the_probe_keeps_each_layers_total_and_masks_the_padding(gen_llama_bundle):
    g = Generator(gen_llama_bundle)
    ids = g.encode(long_text(4000))[:420]
    prefix, cont = ids[:380], ids[380:]
    made = {}

    def make(name, kw):
        def f():
            made[name] = probe(**kw)
            return made[name]
        return f

    configs = [("survey", "mpcache_ea_survey", 0.2), ("equal", make("equal", {"head_temper": 0.0}), 0.2),
               ("ragged", make("ragged", {"head_temper": 1.0, "head_min": 4}), 0.2)]
    got = score_lockstep(g, prefix, cont, configs)
    # equal heads: the survey policy's own eviction (same counts, same kept keys)
    np.testing.assert_allclose(got["equal"]["nll_tokens"], got["survey"]["nll_tokens"], rtol=1e-5, atol=1e-5)
    static = made["ragged"].parts[0]
    assert static.counts and any(len(set(c.tolist())) > 1 for c in static.counts.values())
    caps = static.ctx.capacities
    for L, c in static.counts.items():
        target = caps[L] - len(cont) - 1  # the look-once target with the suffix and one new token on top
        assert c.sum() == g.kv_heads * target
        # head 0's padding holds EMPTY_POS (masked), so it attends over exactly its own count of context keys
        assert got["ragged"]["kept"][L] == c[0]
    assert any(c[0] < c.max() for c in static.counts.values())  # head 0 was padded somewhere
    assert got["ragged"]["nll"] != got["equal"]["nll"]

