"""``mpcache_ea_alloc``: per-layer budgets from a calibrated global top-k; the KV budget a hard bound."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sel.runtime.errors import InputError
from edge_sel.runtime.generate import Generator
from edge_sel.runtime.policies import layer_allocation, make_policy
from edge_sel.runtime.policies.layer_allocation import (LongRangeAttention, MPCacheEAAlloc, global_shares,
                                                        mpcache_ea_alloc, shares_at)

from gen_tiny import long_text

UNEQUAL = (3.0, 0.25, 1.5, 0.5)  # the tiny model's 4 layers


def test_global_topk_counts_each_layers_winners():
    s = np.zeros((3, 2, 10))
    s[0, :, 4:] = 0.5           # layer 0: 12 keys at 0.5
    s[2, 0, 4:8] = 0.9          # layer 2: 4 keys above everything else
    got = global_shares(s, kept=(3 * 2 * 4 + 16) / s.size, sinks=4)  # sinks (8 per layer) + 16 more
    counts = got * (3 * 8 + 16) / 3
    np.testing.assert_allclose(counts, [8 + 12, 8, 8 + 4])
    assert np.isclose(got.mean(), 1.0)


def test_a_layers_count_by_its_heads_sum_its_hungriest_head_or_its_ranked_slots():
    s = np.zeros((2, 2, 10))
    s[0, 0, 4:] = 0.9           # layer 0: one KV head holds the 6 best keys
    s[1, :, 4:7] = 0.5          # layer 1: both heads hold 3 good keys
    kept = (2 * 2 * 4 + 6) / s.size  # the sinks (4 per head) + 6 more
    np.testing.assert_allclose(global_shares(s, kept) * (16 + 6) / 2, [8 + 6, 8])  # the 6 best all in layer 0
    np.testing.assert_allclose(global_shares(s, kept, head_reduce="max") * (10 + 4) / 2, [4 + 6, 4])  # layer 0's head 0
    # ranked slots: slot j of layer 0 is worth 0.9 (one head), of layer 1 1.0 (0.5 + 0.5): layer 1's 3 slots first
    counts = global_shares(s, (2 * 4 + 3) / 20, head_reduce="rank") * (8 + 3) / 2
    np.testing.assert_allclose(counts, [4, 4 + 3])
    assert np.isclose(global_shares(s, 0.5, head_reduce="rank").mean(), 1.0)


def test_shares_interpolate_between_calibrated_fractions_and_flatten_towards_all_kept():
    table = {0.05: (2.0, 0.0), 0.2: (0.0, 2.0)}
    np.testing.assert_allclose(shares_at(table, 0.01), [2.0, 0.0])
    np.testing.assert_allclose(shares_at(table, 0.1), [1.0, 1.0])  # halfway in log(fraction)
    np.testing.assert_allclose(shares_at(table, 1.0), [1.0, 1.0])
    np.testing.assert_allclose(shares_at(table, 0.6), [0.5, 1.5])


def test_the_temper_follows_the_budget():
    assert layer_allocation.temper_at(0.01) == 0.5 and layer_allocation.temper_at(0.3) == 0.75
    assert 0.5 < layer_allocation.temper_at(0.07) < 0.75
    table = {0.05: (4.0, 1.0), 0.2: (4.0, 1.0)}
    small, large = (np.asarray(shares_at(table, k)) ** layer_allocation.temper_at(k) for k in (0.05, 0.2))
    assert small[0] / small[1] == pytest.approx(2.0) and large[0] / large[1] == pytest.approx(4.0 ** 0.75)


def test_bad_options_are_refused_in_one_line(gen_llama_bundle):
    for bad in [(1.0, -1.0), (1.0, float("nan")), (), ("a", "b"), (True, False)]:
        with pytest.raises(ValueError, match="shares must be positive numbers") as e:
            MPCacheEAAlloc(shares=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="temper must be in"):
        MPCacheEAAlloc(temper=1.5)
    with pytest.raises(ValueError, match="temper must be in"):
        MPCacheEAAlloc(temper="high")
    with pytest.raises(ValueError, match="no option 'slpoe'"):
        mpcache_ea_alloc(slpoe=1)
    g = Generator(gen_llama_bundle, kv_budget=0.3, policy=mpcache_ea_alloc(shares=(1.0, 2.0)))
    with pytest.raises(InputError, match="shares has 2 values but the model has 4 layers") as e:
        g.generate(g.encode(long_text(2000))[:300], max_new_tokens=2)
    assert "\n" not in str(e.value)


def test_an_uncalibrated_model_keeps_equal_layers(gen_llama_bundle):
    pol = make_policy("mpcache_ea_alloc")
    g = Generator(gen_llama_bundle, kv_budget=0.3, policy=pol)
    assert g.planner.plan(pol, 400, 4).layers == ()


@pytest.mark.parametrize("prefill", ["layer", "rolling"])
def test_unequal_layers_stay_inside_a_byte_budget(gen_llama_bundle, prefill):
    probe = Generator(gen_llama_bundle, kv_budget="1MB", prefill=prefill)
    ids = probe.encode(long_text(4000))[:600]
    pol0 = mpcache_ea_alloc(shares=UNEQUAL)
    step = probe.planner.bytes_per_token(pol0)
    base = probe.planner.minimum_bytes(pol0, len(ids), 4) + (probe.planner.scratch_bytes(len(ids)) if prefill == "layer" else 0)
    unequal = 0
    for extra in range(0, 300 * step, 41 * step + 613):
        budget = base + extra
        pol = mpcache_ea_alloc(shares=UNEQUAL)
        g = Generator(gen_llama_bundle, kv_budget=f"{budget}B", policy=pol, prefill=prefill)
        st = g.generate(ids, max_new_tokens=4, stop=False).stats
        assert st["kv_bytes_allocated"] + st["prefill_scratch_bytes"] + pol.parts[0].stats_peak <= budget, budget
        assert st["kv_bytes_peak"] <= st["kv_bytes_allocated"] + st["prefill_scratch_bytes"]
        caps = g.planner.plan(pol, len(ids), 4).layers
        if caps:
            assert all(k <= c for k, c in zip(st["kv_tokens_kept"], caps))
            unequal += caps[0] > caps[2] > caps[3] > caps[1]  # the shares' order
    assert unequal >= 2


def test_the_calibration_table_shapes_the_layers_of_its_model_only(gen_llama_bundle, monkeypatch):
    g = Generator(gen_llama_bundle, kv_budget=0.25)
    geometry = (g.n_layers, g.heads, g.kv_heads, g.head_dim)
    monkeypatch.setitem(layer_allocation.CALIBRATED, geometry, {0.1: UNEQUAL, 0.3: UNEQUAL[::-1]})
    pol = make_policy("mpcache_ea_alloc")
    caps = g.planner.plan(pol, 1000, 4, suffix=100).layers
    assert caps and sum(caps) <= g.n_layers * g.planner.plan(make_policy("mpcache_ea"), 1000, 4, suffix=100).resident
    assert caps[3] > caps[1] > caps[0] > caps[2]  # kept 0.25: mostly the 0.3 row
    monkeypatch.setitem(layer_allocation.CALIBRATED, (g.n_layers + 1,) + geometry[1:], {0.1: UNEQUAL + (1.0,)})
    monkeypatch.delitem(layer_allocation.CALIBRATED, geometry)
    assert g.planner.plan(pol, 1000, 4, suffix=100).layers == ()


def test_everything_kept_gives_the_full_cache_logits(gen_llama_bundle):
    ids = Generator(gen_llama_bundle).encode(long_text(3000))[:400]
    prefix, cont = ids[:340], ids[340:]
    want = Generator(gen_llama_bundle).score(prefix, cont, compress_continuation=False)
    got = Generator(gen_llama_bundle, policy=mpcache_ea_alloc(shares=UNEQUAL), kv_budget=1.0).score(
        prefix, cont, compress_continuation=False)
    np.testing.assert_allclose(got["nll_tokens"], want["nll_tokens"], rtol=1e-5, atol=1e-5)
    low = Generator(gen_llama_bundle, policy=mpcache_ea_alloc(shares=UNEQUAL), kv_budget=0.2).score(
        prefix, cont, compress_continuation=False)
    assert not np.allclose(low["nll_tokens"], want["nll_tokens"], rtol=1e-5, atol=1e-5)  # the test can tell


def test_long_range_attention_scores_only_keys_a_distant_query_saw(gen_llama_bundle):
    ids = Generator(gen_llama_bundle).encode(long_text(3000))[:300]
    rec = LongRangeAttention(distance=40)
    Generator(gen_llama_bundle, policy=rec, chunk_tokens=64).generate(ids, max_new_tokens=1, stop=False)
    s = rec.stacked(len(ids))
    assert s.shape == (4, 2, 300) and np.all(s >= 0) and np.all(s <= 1)
    last_chunk = (300 - 1) // 64 * 64
    assert np.all(s[..., last_chunk - 40:] == 0) and np.all(s[..., :last_chunk - 40].max(axis=1) > 0)
    shares = global_shares(s, 0.2)
    assert shares.shape == (4,) and np.isclose(shares.mean(), 1.0)
