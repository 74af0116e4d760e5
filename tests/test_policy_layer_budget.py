"""``mpcache_ea_layers``: unequal per-layer budgets (PyramidKV's shares) with the same total, the KV budget a hard bound."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sel.runtime.generate import Generator
from edge_sel.runtime.planning.kv import split_layers
from edge_sel.runtime.policies import make_policy
from edge_sel.runtime.policies.layer_budget import MPCacheEALayers, mpcache_ea_layers

from gen_tiny import long_text


@pytest.mark.parametrize("res,base,lo,step", [(616, 257, 265, 1), (128, 0, 64, 32), (96, 0, 64, 32), (64, 0, 64, 32)])
def test_split_keeps_the_total_the_minimum_and_the_order_of_the_shares(res, base, lo, step):
    shares = MPCacheEALayers(slope=0.6).layer_shares(30)
    caps = np.array(split_layers(res, base, shares, lo, 4096, step))
    assert len(caps) == 30 and caps.sum() <= 30 * res and caps.min() >= lo
    assert np.all(caps % step == 0) and np.all(np.diff(caps) <= 0)  # the first layers keep the most
    if res - lo >= 2 * step:
        assert caps[0] > caps[-1]
    assert 30 * res - caps.sum() < step or caps.min() == lo  # nothing left over that a layer could take


def test_shares_are_checked():
    with pytest.raises(ValueError):
        MPCacheEALayers(slope=1.5)
    with pytest.raises(ValueError):
        split_layers(100, 0, np.array([1.0, -1.0]), 8, 512, 1)
    assert MPCacheEALayers(slope=0.0).layer_shares(30) is None
    assert make_policy("mpcache_ea_layers").label == "mpcache_ea_layers"


@pytest.mark.parametrize("prefill", ["layer", "rolling"])
def test_unequal_layers_stay_inside_a_byte_budget(gen_llama_bundle, prefill):
    probe = Generator(gen_llama_bundle, kv_budget="1MB", prefill=prefill)
    ids = probe.encode(long_text(4000))[:600]
    pol0 = mpcache_ea_layers(slope=0.8)
    step = probe.planner.bytes_per_token(pol0)
    base = probe.planner.minimum_bytes(pol0, len(ids), 4) + (probe.planner.scratch_bytes(len(ids)) if prefill == "layer" else 0)
    unequal = 0
    for extra in range(0, 300 * step, 37 * step + 811):
        budget = base + extra
        pol = mpcache_ea_layers(slope=0.8)
        g = Generator(gen_llama_bundle, kv_budget=f"{budget}B", policy=pol, prefill=prefill)
        r = g.generate(ids, max_new_tokens=4, stop=False)
        st = r.stats
        assert st["kv_bytes_allocated"] + st["prefill_scratch_bytes"] + pol.parts[0].stats_peak <= budget, budget
        assert st["kv_bytes_peak"] <= st["kv_bytes_allocated"] + st["prefill_scratch_bytes"]
        caps = g.planner.plan(pol, len(ids), 4).layers
        if caps:
            assert all(k <= c for k, c in zip(st["kv_tokens_kept"], caps))
            unequal += caps[0] > caps[-1]
    assert unequal >= 2


def test_unequal_layers_generate_and_score_like_the_lockstep_benchmark(gen_llama_bundle):
    from benchmarks.ppl_lockstep import score_lockstep

    g = Generator(gen_llama_bundle)
    ids = g.encode(long_text(3000))[:600]
    prefix, cont = ids[:520], ids[520:]
    got = score_lockstep(g, prefix, cont, [("layers", "mpcache_ea_layers", 0.2), ("equal", "mpcache_ea", 0.2)])
    want = Generator(gen_llama_bundle, policy="mpcache_ea_layers", kv_budget=0.2).score(prefix, cont, compress_continuation=False)
    np.testing.assert_allclose(got["layers"]["nll_tokens"], want["nll_tokens"], rtol=2e-4, atol=2e-4)
    kept = got["layers"]["kept"]
    assert kept[0] > kept[-1] and sum(kept) <= sum(got["equal"]["kept"]) and got["layers"]["nll"] != got["equal"]["nll"]
