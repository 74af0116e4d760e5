"""``mpcache_ea_survey``: the layers' shares of the KV budget measured on the prompt by a survey pass before the plan;
the KV budget a hard bound."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sel.runtime.generate import Generator
from edge_sel.runtime.policies.layer_allocation import LongRangeAttention, global_shares, temper_at
from edge_sel.runtime.policies.prompt_allocation import MPCacheEASurvey, mpcache_ea_survey
from edge_sel.runtime.planning.kv import split_layers

from gen_tiny import long_text


def _own_split(bundle, ids, n_ctx, kept, res, base, lo, hi):
    """Reference: the context's long-range attention from a plain full-cache run, one top-k over all layers."""
    rec = LongRangeAttention(distance=32)
    Generator(bundle, policy=rec).generate(ids[:n_ctx], max_new_tokens=1, stop=False)
    s = global_shares(rec.stacked(n_ctx), kept) ** temper_at(kept)
    return split_layers(res, base, s / s.mean(), lo, hi, 1)


def test_the_layers_follow_the_prompts_own_survey(gen_llama_bundle):
    g0 = Generator(gen_llama_bundle)
    caps = {}
    for text in (long_text(4000), " ".join(reversed(long_text(4000).split()))):
        ids = g0.encode(text)[:420]
        pol = mpcache_ea_survey()
        g = Generator(gen_llama_bundle, kv_budget=0.2, policy=pol)
        g.score(ids[:380], ids[380:], compress_continuation=False)
        got = pol.parts[0].ctx.capacities
        res = pol.parts[0].ctx.capacity
        kept = (res - 40 - 1) / 380
        assert got and sum(got) <= 4 * res and len(set(got)) > 1
        assert got == _own_split(gen_llama_bundle, ids, 380, kept, res, 41, 49, -(-421 // 32) * 32)
        assert pol.parts[0].measured is None  # the call is over: a reused instance starts afresh
        caps[text[:10]] = got
    assert len(set(caps.values())) == 2  # another prompt, another split


@pytest.mark.parametrize("prefill", ["layer", "rolling"])
def test_the_survey_stays_inside_a_byte_budget(gen_llama_bundle, prefill):
    probe = Generator(gen_llama_bundle, kv_budget="1MB", prefill=prefill)
    ids = probe.encode(long_text(4000))[:500]
    pol0 = mpcache_ea_survey()
    step = probe.planner.bytes_per_token(pol0)
    base = probe.planner.minimum_bytes(pol0, len(ids), 4) + (probe.planner.scratch_bytes(len(ids)) if prefill == "layer" else 0)
    unequal = 0
    for extra in range(0, 400 * step, 41 * step + 613):
        budget = base + extra
        pol = mpcache_ea_survey()
        g = Generator(gen_llama_bundle, kv_budget=f"{budget}B", policy=pol, prefill=prefill)
        st = g.generate(ids, max_new_tokens=4, stop=False).stats
        static = pol.parts[0]
        survey_bytes = 4 * g.kv_heads * len(ids) * 4
        assert st["kv_bytes_allocated"] + st["prefill_scratch_bytes"] + static.stats_peak + survey_bytes <= budget, budget
        assert st["kv_bytes_peak"] <= st["kv_bytes_allocated"] + st["prefill_scratch_bytes"]
        unequal += len(set(static.ctx.capacities)) > 1
    assert (unequal >= 2) == (prefill == "layer")  # a rolling prefill runs no survey: the tiny model has no calibration


def test_bad_options_are_refused_in_one_line():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="distance must be a positive integer") as e:
            MPCacheEASurvey(distance=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no option 'distnace'"):
        mpcache_ea_survey(distnace=3)
