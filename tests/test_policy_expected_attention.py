"""``mpcache_ea``: expected attention (future queries from the prompt's query statistics) inside MPCache's static eviction."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sel.runtime.generate import Generator
from edge_sel.runtime.kvcache import LayerCache
from edge_sel.runtime.policies import Context, MPCacheEA, make_policy
from edge_sel.runtime.policies.expected_attention import rope_tables, rotate_half

from gen_tiny import long_text

THETA = 10000.0


def _rotate(x, pos):
    cos, sin = rope_tables(pos, x.shape[-1], THETA)
    return x * cos + rotate_half(x) * sin


def test_query_statistics_are_taken_before_the_rotation():
    rng = np.random.default_rng(0)
    H, T, D = 4, 200, 16
    content = rng.normal(size=(H, T, D)) + np.linspace(-1, 1, D)  # a mean the rotation would smear
    pos = np.arange(T) + 7
    q = np.stack([_rotate(content[h], pos) for h in range(H)])[None].astype(np.float32)
    p = MPCacheEA(skip_first=0)
    p.begin(Context(1, 2, H, D, 64, T + 7, 1, rope_theta=THETA))
    p.queries(0, q[:, :, :120], pos[:120], "prefill")
    p.queries(0, q[:, :, 120:], pos[120:], "window")
    st = p.qstats[0]
    np.testing.assert_allclose(st["sum"] / st["n"], content.mean(axis=1), atol=1e-4)
    assert st["next"] == T + 7


def test_the_key_the_expected_query_prefers_stays():
    rng = np.random.default_rng(1)
    kv, H, D, n = 1, 2, 16, 300
    mu = np.zeros(D)
    mu[0] = 4.0  # every future query points along channel 0 (low frequency: barely rotated)
    q = (mu + 0.1 * rng.normal(size=(H, 64, D)))[None].astype(np.float32)
    keys = rng.normal(size=(kv, n, D)).astype(np.float32)
    keys[0, 150] = 0.0
    keys[0, 150, 0] = 6.0  # aligned with the expected query
    cache = LayerCache(kv, n, D)
    cache.append(keys[None], np.ones((1, kv, n, D), np.float32), np.arange(n))
    p = MPCacheEA(recent_frac=0.0, recent=0, value_norm=False)
    p.begin(Context(1, kv, H, D, 64, n, 1, rope_theta=None))  # no rotation known: statistics as they come
    p.queries(0, q, np.arange(n - 64, n), "window")
    ea = p.expected(0, cache.k[0, :, :n])
    assert ea.shape == (kv, n) and np.allclose(ea.sum(axis=1), 1.0) and int(ea[0].argmax()) == 150
    kept = p.keep(0, cache, 32, "final")
    assert 150 in kept[0]
    assert p.cost["exp_div"] > 0  # not MPC-friendly: counted


@pytest.mark.parametrize("ratio", [0.2, 0.1])
def test_mpcache_ea_generates_within_the_budget(gen_llama_bundle, ratio):
    g = Generator(gen_llama_bundle, kv_budget=ratio, policy="mpcache_ea")
    ids = g.encode(long_text(4000))[:700]
    r = g.generate(ids, max_new_tokens=6, stop=False)
    assert len(r.tokens) == 6
    assert r.stats["kv_tokens_peak_per_layer"] <= r.stats["kv_capacity_tokens"]
    assert max(r.stats["kv_tokens_kept"]) <= r.stats["kv_capacity_tokens"]
    assert r.stats["cost_prefill"]["exp_div"] > 0
    assert make_policy("mpcache_ea").label == "mpcache_ea"


def test_query_statistics_leave_with_the_layers_compression(gen_llama_bundle):
    from edge_sel.runtime.policies import mpcache_ea

    pol = mpcache_ea()
    g = Generator(gen_llama_bundle, kv_budget=0.2, policy=pol)
    ids = g.encode(long_text(4000))[:600]
    g.generate(ids, max_new_tokens=2, stop=False)
    assert pol.parts[0].qstats == {} and pol.held_bytes() == 0  # look-once: no layer's statistics outlive its compression


@pytest.mark.parametrize("prefill", ["layer", "rolling"])
def test_a_byte_budget_bounds_the_cache_the_scratch_and_the_query_statistics(gen_llama_bundle, prefill):
    from edge_sel.runtime.policies import mpcache_ea

    probe = Generator(gen_llama_bundle, kv_budget="1MB", prefill=prefill)
    ids = probe.encode(long_text(4000))[:600]
    step = probe.planner.bytes_per_token(mpcache_ea())  # budgets a few bytes apart around capacity boundaries
    base = probe.planner.minimum_bytes(mpcache_ea(), len(ids), 4) + (probe.planner.scratch_bytes(len(ids)) if prefill == "layer" else 0)
    checked = 0
    for extra in range(0, 160 * step, 23 * step + 997):
        budget = base + extra
        pol = mpcache_ea()
        r = Generator(gen_llama_bundle, kv_budget=f"{budget}B", policy=pol, prefill=prefill).generate(ids, max_new_tokens=4, stop=False)
        st = r.stats
        stats_peak = pol.parts[0].stats_peak
        assert stats_peak > 0 and st["kv_bytes_peak"] <= st["kv_bytes_allocated"] + st["prefill_scratch_bytes"]
        assert st["kv_bytes_allocated"] + st["prefill_scratch_bytes"] + stats_peak <= budget, (budget, st["prefill_mode"])
        checked += st["prefill_mode"] == prefill
    assert checked >= 3
