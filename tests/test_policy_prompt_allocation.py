"""``mpcache_ea_survey``: the layers' shares of the KV budget measured on the prompt by a survey pass before the plan;
the KV budget a hard bound."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from edge_sel.runtime.generate import Generator
from edge_sel.runtime.policies.layer_allocation import LongRangeAttention, global_shares, temper_at
from edge_sel.runtime.policies.prompt_allocation import ZIP_TEMPER, MPCacheEASurvey, mpcache_ea_survey
from edge_sel.runtime.planning.kv import split_layers

from gen_tiny import long_text
from test_policy_reconstruction import SeenZip


def _own_split(bundle, ids, n_ctx, kept, res, base, lo, hi, statistic):
    """Reference: the context's statistic from a run without a survey, one top-k over all layers."""
    if statistic == "long_range":
        rec = LongRangeAttention(distance=32)
        Generator(bundle, policy=rec).generate(ids[:n_ctx], max_new_tokens=1, stop=False)
        scores, temper = rec.stacked(n_ctx), temper_at(kept)
    else:  # every layer compressed (equal shares), so each one's scores are read
        rec = SeenZip(shares=(1.0,) * 4)
        Generator(bundle, policy=rec, kv_budget=0.5).generate(ids[:n_ctx], max_new_tokens=1, stop=False)
        scores, temper = np.stack([rec.seen[L] for L in range(4)]), float(np.interp(np.log(kept), *ZIP_TEMPER))
    s = global_shares(scores, kept) ** temper
    return split_layers(res, base, s / s.mean(), lo, hi, 1)


@pytest.mark.parametrize("statistic", ["reconstruction", "long_range"])
def test_the_layers_follow_the_prompts_own_survey(gen_llama_bundle, statistic):
    g0 = Generator(gen_llama_bundle)
    caps = {}
    for text in (long_text(4000), " ".join(reversed(long_text(4000).split()))):
        ids = g0.encode(text)[:420]
        pol = mpcache_ea_survey(statistic=statistic)
        g = Generator(gen_llama_bundle, kv_budget=0.2, policy=pol)
        g.score(ids[:380], ids[380:], compress_continuation=False)
        got = pol.parts[0].ctx.capacities
        res = pol.parts[0].ctx.capacity
        kept = (res - 40 - 1) / 380
        assert got and sum(got) <= 4 * res and len(set(got)) > 1
        want = _own_split(gen_llama_bundle, ids, 380, kept, res, 41, 49, -(-421 // 32) * 32, statistic)
        # the reference run chunks the context differently (float rounding may move a key across the top-k's edge)
        assert list(np.argsort(got)) == list(np.argsort(want)) and np.abs(np.subtract(got, want)).max() <= 0.05 * res
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
    for kw in ({"distance": 0}, {"distance": 2.5}, {"repeat_tokens": True}, {"statistic": "votes"}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be") as e:
            MPCacheEASurvey(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no option 'distnace'"):
        mpcache_ea_survey(distnace=3)


def test_blend_mixes_the_prompts_split_with_the_calibrated_one(gen_llama_bundle, monkeypatch):
    from edge_sel.runtime.policies import layer_allocation

    g = Generator(gen_llama_bundle)
    geometry = (g.n_layers, g.heads, g.kv_heads, g.head_dim)
    monkeypatch.setitem(layer_allocation.CALIBRATED, geometry, {0.2: (3.0, 0.25, 1.5, 0.5)})
    measured = np.zeros((4, 2, 100), np.float32)
    measured[1] = np.linspace(0, 1, 100)  # this prompt: layer 1 holds every key above the sinks
    got = {}
    for blend in (0.0, 0.5, 1.0):
        pol = MPCacheEASurvey(blend=blend, temper=1.0)
        pol.measured = measured
        got[blend] = pol.layer_shares(4, 0.2, geometry)
    cal = np.asarray((3.0, 0.25, 1.5, 0.5)) ** temper_at(0.2)
    np.testing.assert_allclose(got[0.0], cal / cal.mean(), rtol=1e-6)
    assert np.argmax(got[1.0]) == 1 and np.argmax(got[0.0]) == 0
    np.testing.assert_allclose(got[0.5] / got[0.5].mean(), np.sqrt(got[0.0] * np.maximum(got[1.0], 1e-3))
                               / np.sqrt(got[0.0] * np.maximum(got[1.0], 1e-3)).mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="blend must be in"):
        MPCacheEASurvey(blend=1.5)


def test_no_survey_below_min_kept(gen_llama_bundle):
    ids = Generator(gen_llama_bundle).encode(long_text(8000))[:1300]
    caps = {}
    for min_kept in (0.075, 0.01):
        pol = mpcache_ea_survey(min_kept=min_kept)
        Generator(gen_llama_bundle, kv_budget=0.05, policy=pol).score(ids[:1200], ids[1200:], compress_continuation=False)
        caps[min_kept] = pol.parts[0].ctx.capacities
    assert caps[0.075] == () and len(set(caps[0.01])) > 1  # the tiny model has no calibration: equal layers unless surveyed


def test_below_min_kept_it_is_mpcache_ea_alloc(gen_llama_bundle, monkeypatch):
    """No survey and no reconstruction pass reach the prefill: the same losses as the calibrated policy."""
    from edge_sel.runtime.policies import layer_allocation

    g0 = Generator(gen_llama_bundle)
    monkeypatch.setitem(layer_allocation.CALIBRATED, (g0.n_layers, g0.heads, g0.kv_heads, g0.head_dim),
                        {0.05: (3.0, 0.25, 1.5, 0.5)})
    ids = g0.encode(long_text(8000))[:1300]
    nll = {}
    for name in ("mpcache_ea_survey", "mpcache_ea_alloc", "mpcache_ea"):
        g = Generator(gen_llama_bundle, kv_budget=0.05, policy=name)
        nll[name] = g.score(ids[:1200], ids[1200:], compress_continuation=False)["nll_tokens"]
    np.testing.assert_array_equal(nll["mpcache_ea_survey"], nll["mpcache_ea_alloc"])
    assert not np.allclose(nll["mpcache_ea_alloc"], nll["mpcache_ea"], rtol=1e-4)  # the calibrated split is in use


@dataclass
class SeenScore(MPCacheEASurvey):
    """Keeps each layer's eviction score, the slots' positions and the survey's scores as the eviction reads them."""

    def begin(self, ctx):
        super().begin(ctx)
        self.seen = {}

    def score(self, layer, keys, votes):
        out = super().score(layer, keys, votes)
        self.seen[layer] = (np.array(out), self._pos[:, :keys.shape[1]].copy(), self.measured[layer].copy())
        return out


def test_zip_weight_mixes_the_surveys_reconstruction_score_into_the_eviction(gen_llama_bundle):
    g0 = Generator(gen_llama_bundle)
    ids = g0.encode(long_text(4000))[:420]
    runs = {}
    for w in (0.0, 1.0):
        pol = SeenScore(zip_weight=w)
        res = Generator(gen_llama_bundle, kv_budget=0.2, policy=pol).score(ids[:380], ids[380:],
                                                                           compress_continuation=False)
        runs[w] = (pol, res["nll_tokens"])
    pol1 = runs[1.0][0]
    assert len(pol1.seen) == 4
    for L, (out, pos, m) in pol1.seen.items():  # weight 1: the reconstruction score of each slot's position alone
        z = np.take_along_axis(m, pos, axis=1).astype(np.float64)
        np.testing.assert_allclose(out, z / z.sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-9)
    for L, (out, pos, m) in runs[0.0][0].seen.items():  # weight 0: mpcache_ea's score, not normalised per head
        assert not np.allclose(out / out.sum(axis=-1, keepdims=True), np.take_along_axis(m, pos, axis=1)
                               / np.take_along_axis(m, pos, axis=1).sum(axis=-1, keepdims=True))
    assert runs[0.0][0].ctx.capacities == pol1.ctx.capacities  # the same split: the same bytes
    assert not np.allclose(runs[0.0][1], runs[1.0][1])


def test_head_reduce_and_zip_weight_refuse_bad_values():
    for kw, msg in (({"head_reduce": "min"}, "head_reduce must be"), ({"zip_weight": 1.5}, "zip_weight must be in"),
                    ({"zip_weight": True}, "zip_weight must be in")):
        with pytest.raises(ValueError, match=msg) as e:
            MPCacheEASurvey(**kw)
        assert "\n" not in str(e.value)


def test_with_a_survey_the_recent_window_and_vote_share_follow_the_kept_fraction(gen_llama_bundle):
    from edge_sel.runtime.policies.prompt_allocation import SURVEY_RECENT_FRAC, SURVEY_VOTE_WEIGHT

    ids = Generator(gen_llama_bundle).encode(long_text(4000))[:420]
    seen = {}

    @dataclass
    class Knobs(MPCacheEASurvey):
        def score(self, layer, keys, votes):
            seen.setdefault(self.kept_seen, set()).add((self.recent_frac, self.vote_weight))
            return super().score(layer, keys, votes)

    for min_kept, label in ((0.075, "surveyed"), (0.9, "calibrated")):
        pol = Knobs(min_kept=min_kept)
        pol.kept_seen = label
        Generator(gen_llama_bundle, kv_budget=0.2, policy=pol).score(ids[:380], ids[380:], compress_continuation=False)
        assert (pol.recent_frac, pol.vote_weight) == (0.25, 0.5)  # the call is over: mpcache_ea's knobs again
    (rf, vw), = seen["surveyed"]
    assert rf < 0.25 and vw < 0.5 and min(SURVEY_RECENT_FRAC[1]) <= rf and min(SURVEY_VOTE_WEIGHT[1]) <= vw
    assert seen["calibrated"] == {(0.25, 0.5)}  # no survey: exactly mpcache_ea_alloc's eviction
    pinned = MPCacheEASurvey(recent_frac=0.4)
    pinned.surveyor(0.2)
    assert (pinned.recent_frac, pinned.vote_weight) == (0.4, 0.25)  # a knob given by the caller stays
    assert pinned.surveyor(0.05) is None and (pinned.recent_frac, pinned.vote_weight) == (0.4, 0.5)  # no survey
