"""``mpcache_ea_mix``: the share of the votes in the score is chosen per head by the prompt's observation window."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sel.runtime.generate import Generator
from edge_sel.runtime.kvcache import LayerCache
from edge_sel.runtime.policies import Context, MPCacheEAMix, make_policy, mpcache_ea_mix

from gen_tiny import long_text


def _layer(window_attends: list[int]):
    """One layer's look-once prompt: the prompt's votes favour tokens 100-119, its query statistics key 150; the
    observation window (the last 50 queries) attends ``window_attends``."""
    rng = np.random.default_rng(3)
    kv, H, D, n, w0 = 1, 2, 16, 300, 250
    mu = np.zeros(D)
    mu[0] = 4.0
    keys = rng.normal(size=(kv, n, D)).astype(np.float32)
    keys[0, 150] = 0.0
    keys[0, 150, 0] = 6.0  # the key the expected query prefers
    cache = LayerCache(kv, n, D)
    cache.append(keys[None], np.ones((1, kv, n, D), np.float32), np.arange(n))
    p = MPCacheEAMix(value_norm=False)
    p.begin(Context(1, kv, H, D, 64, n, 1, look_once=True))
    q = (mu + 0.1 * rng.normal(size=(H, n, D)))[None].astype(np.float32)
    votes = np.full((1, kv, n), 0.01, np.float32)
    votes[0, 0, 100:120] = 1.0
    votes[0, 0, w0:] = 0.0
    p.queries(0, q[:, :, :w0], np.arange(w0), "prefill")
    p.observe(0, cache, votes, votes, None, "prefill")
    window = np.full((1, kv, n), 0.001, np.float32)
    window[0, 0, window_attends] = 1.0
    p.queries(0, q[:, :, w0:], np.arange(w0, n), "window")
    p.observe(0, cache, window, window, None, "window")
    kept = p.keep(0, cache, 32, "final")
    return p, kept


def test_the_window_picks_the_votes_when_it_attends_what_they_favour():
    p, kept = _layer(list(range(100, 120)))
    assert p.chosen[0].tolist() == [1.0]
    assert set(range(100, 120)) <= set(kept[0].tolist())


def test_the_window_picks_expected_attention_when_it_attends_its_key():
    p, kept = _layer([150])
    assert p.chosen[0][0] < 1.0 and 150 in kept[0]
    assert p.pre == {} and p.win is None  # the copies leave with the layer's compression


def test_options_are_checked_and_named():
    with pytest.raises(ValueError):
        MPCacheEAMix(mix_weights=(0.5, 1.5))
    with pytest.raises(ValueError):
        MPCacheEAMix(mix_per="token")
    assert make_policy("mpcache_ea_mix").label == "mpcache_ea_mix"


def test_a_byte_budget_bounds_the_cache_the_scratch_the_window_row_and_the_statistics(gen_llama_bundle):
    probe = Generator(gen_llama_bundle, kv_budget="1MB")
    ids = probe.encode(long_text(4000))[:600]
    step = probe.planner.bytes_per_token(mpcache_ea_mix())
    base = probe.planner.minimum_bytes(mpcache_ea_mix(), len(ids), 4) + probe.planner.scratch_bytes(len(ids))
    chose = 0
    for extra in range(0, 160 * step, 29 * step + 613):
        budget = base + extra
        pol = mpcache_ea_mix()
        r = Generator(gen_llama_bundle, kv_budget=f"{budget}B", policy=pol).generate(ids, max_new_tokens=4, stop=False)
        st = r.stats
        static = pol.parts[0]
        assert st["kv_bytes_allocated"] + st["prefill_scratch_bytes"] + static.stats_peak <= budget, budget
        # what the planner counted for the policy covers what it held at its peak: statistics, their copy, the window row
        assert probe.planner.fixed_bytes(pol, len(ids) + 4) >= static.stats_peak > 0
        chose += len(static.chosen)
        assert static.pre == {} and static.win is None
    assert chose > 0
