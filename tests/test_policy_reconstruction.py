"""``mpcache_zip``: the eviction scored by context-reconstruction passes run inside the look-once prefill (KVzip);
the passes' scratch counted, the KV budget a hard bound."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from edge_sel.runtime.generate import Generator
from edge_sel.runtime.generate.prefill import plan_chunks
from edge_sel.runtime.generate.reconstruct import repeat_passes
from edge_sel.runtime.policies import Full, make_policy
from edge_sel.runtime.policies.reconstruction import MPCacheZip, mpcache_zip

from gen_tiny import long_text

UNEQUAL = (3.0, 0.25, 1.5, 0.5)  # the tiny model's 4 layers


@dataclass
class SeenZip(MPCacheZip):
    """Keeps a copy of each layer's reconstruction score as the eviction reads it."""

    def begin(self, ctx):
        super().begin(ctx)
        self.seen = {}

    def score(self, layer, keys, votes):
        if layer in self.zip:
            self.seen[layer] = self.zip[layer][:, :keys.shape[1]].copy()
        return super().score(layer, keys, votes)


@dataclass
class _PassAttention(Full):
    """Reference: the full cache over context + pass as one prompt; per layer the max attention the pass's queries
    (the chunks from ``start`` on) pay each of the first ``start`` keys, max over a KV head's query heads."""

    start: int = 0

    def begin(self, ctx):
        super().begin(ctx)
        self.got, self._a = {}, {}

    def queries(self, layer, q, positions, phase):
        self._a[layer] = int(np.min(positions))

    def accumulate(self, layer, cache, attn_sum, attn_max, slots, phase):
        if phase == "decode" or self._a[layer] < self.start:
            return
        a = attn_max[0][:, :self.start]
        self.got[layer] = np.maximum(self.got.get(layer, a), a)


def test_passes_split_the_context_after_the_instruction_and_sit_after_it():
    ps = repeat_passes([7, 8], list(range(100, 200)), length=42, first=1)
    assert [len(p.ids) for p in ps] == [42, 42, 21]
    assert list(ps[0].ids[:4]) == [7, 8, 101, 102] and list(ps[-1].ids[-1:]) == [199]
    assert all(list(p.positions) == list(range(100, 100 + len(p.ids))) for p in ps)
    assert repeat_passes([7] * 20, list(range(100)), length=40, first=0) == []  # no piece worth a pass


def test_the_score_is_the_attention_of_the_context_repeated_after_it(gen_llama_bundle):
    """The passes carried through the layer loop (their keys dropped after each layer) see exactly what one causal
    forward pass over context + instruction + context would: the same per-key maxima, layer by layer."""
    g = Generator(gen_llama_bundle, kv_budget=0.5, policy=SeenZip(), chunk_tokens=32)
    ctx = g.encode(long_text(3000))[:224]
    pol = g.policy_spec
    g.generate(ctx, max_new_tokens=1, stop=False)
    (p,) = g.reconstruction_passes(pol, ctx)
    assert len(p.ids) > 200 and pol.seen.keys() == set(range(4))
    ref = _PassAttention(start=len(ctx))
    assert len(ctx) % 32 == 0 and all(b - a == 32 for a, b, _ in plan_chunks(len(ctx) + len(p.ids), 32, 0)[:-1])
    Generator(gen_llama_bundle, policy=ref, chunk_tokens=32).generate(ctx + [int(t) for t in p.ids], max_new_tokens=1,
                                                                     stop=False)
    for L in range(4):
        np.testing.assert_allclose(pol.seen[L], ref.got[L], rtol=1e-4, atol=1e-6, err_msg=f"layer {L}")
    assert not np.allclose(pol.seen[0], pol.seen[3], atol=1e-3)  # layers differ: the test can tell them apart


def test_the_reconstruction_decides_what_stays_and_a_rolling_prefill_falls_back(gen_llama_bundle):
    ids = Generator(gen_llama_bundle).encode(long_text(3000))[:400]
    prefix, cont = ids[:340], ids[340:]
    nll = {}
    for name, pol, prefill in [("zip", "mpcache_zip", "layer"), ("ea", mpcache_zip(zip_weight=0.0), "layer"),
                               ("alloc", "mpcache_ea_alloc", "layer"), ("zip rolling", "mpcache_zip", "rolling"),
                               ("alloc rolling", "mpcache_ea_alloc", "rolling")]:
        g = Generator(gen_llama_bundle, policy=pol, kv_budget=0.2, prefill=prefill)
        nll[name] = g.score(prefix, cont, compress_continuation=False)["nll_tokens"]
        assert (g.last_stats["prefill_scratch_bytes"] > g.planner.scratch_bytes(len(ids))) == (name == "zip")
    np.testing.assert_allclose(nll["ea"], nll["alloc"], rtol=1e-6)
    np.testing.assert_allclose(nll["zip rolling"], nll["alloc rolling"], rtol=1e-6)
    assert not np.allclose(nll["zip"], nll["alloc"], rtol=1e-4)


@pytest.mark.parametrize("prefill", ["layer", "rolling"])
def test_the_passes_stay_inside_a_byte_budget(gen_llama_bundle, prefill):
    probe = Generator(gen_llama_bundle, kv_budget="1MB", prefill=prefill)
    ids = probe.encode(long_text(4000))[:500]
    pol0 = mpcache_zip(shares=UNEQUAL)
    step = probe.planner.bytes_per_token(pol0)
    base = probe.planner.minimum_bytes(pol0, len(ids), 4) + (probe.planner.scratch_bytes(len(ids)) if prefill == "layer" else 0)
    ran = 0
    for extra in range(0, 600 * step, 53 * step + 677):
        budget = base + extra
        pol = mpcache_zip(shares=UNEQUAL)
        g = Generator(gen_llama_bundle, kv_budget=f"{budget}B", policy=pol, prefill=prefill)
        st = g.generate(ids, max_new_tokens=4, stop=False).stats
        static = pol.parts[0]
        assert st["kv_bytes_allocated"] + st["prefill_scratch_bytes"] + static.stats_peak + static.zip_peak <= budget, budget
        assert st["kv_bytes_peak"] <= st["kv_bytes_allocated"] + st["prefill_scratch_bytes"]
        ran += static.zip_peak > 0 and st["prefill_scratch_bytes"] > g.planner.scratch_bytes(len(ids))
    assert ran >= (3 if prefill == "layer" else 0) and (prefill == "layer" or ran == 0)


def test_bad_options_are_refused_in_one_line():
    for kw, msg in [({"zip_weight": 1.5}, "zip_weight must be in"), ({"repeat_tokens": 10}, "repeat_tokens must be"),
                    ({"repeat_tokens": True}, "repeat_tokens must be")]:
        with pytest.raises(ValueError, match=msg) as e:
            MPCacheZip(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no option 'zpi_weight'"):
        mpcache_zip(zpi_weight=1)
    assert make_policy("mpcache_zip").reconstruction(100, 10_000) == 132
    assert make_policy("mpcache_zip").reconstruction(5000, 1000) == 1000  # never past the model's context
    assert mpcache_zip(zip_weight=0.0).reconstruction(100, 10_000) == 0
