"""``protect_suffix``: the question after a long context is not compressed (kvpress's "context compressed,
question not"), on a tiny random-weight Llama generate bundle."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sel.runtime.errors import InputError
from edge_sel.runtime.generate import Generator

from gen_tiny import long_text

QUESTIONS = ["\nQuestion: what is the special magic number for apple?\nAnswer: it is",
             "\nQuestion: which river flows past the old town, and why?\nAnswer:"]


@pytest.fixture(scope="module")
def llama(gen_llama_bundle):
    return gen_llama_bundle


@pytest.fixture(scope="module")
def context_ids(llama):
    return Generator(llama).encode(long_text(5000))


def _prefilled(gen, ids, suffix, max_new=8):
    """The call state right after prefill (before any decode step)."""
    for _, _, call in gen.run(ids, max_new, 0.0, 1.0, None, False, None, False, suffix=suffix):
        return call


@pytest.mark.parametrize("prefill", ["layer", "rolling"])
@pytest.mark.parametrize("policy", ["snapkv", "mpcache", "h2o", "streaming_llm"])
def test_suffix_is_kept_whole_and_context_gets_its_fraction(llama, context_ids, policy, prefill):
    g = Generator(llama, kv_budget=0.2, policy=policy, prefill=prefill)
    q = g.encode(QUESTIONS[0])[1:]  # no second BOS
    ids = context_ids + q
    n_ctx, s = len(context_ids), len(q)
    call = _prefilled(g, ids, s)
    assert call.capacity == int(np.ceil(0.2 * n_ctx)) + s + 8  # the fraction is of the context; suffix + new tokens on top
    for c in call.caches:
        pos = c.pos[:, :c.n]
        for h in range(c.kv_heads):
            assert set(range(n_ctx, n_ctx + s)) <= set(pos[h].tolist())  # every question token, every head
        kept_ctx = int((pos[0] < n_ctx).sum())
        if prefill == "layer":
            assert kept_ctx == int(np.ceil(0.2 * n_ctx))  # exactly the context's share: new tokens fit without eviction
        assert c.n <= call.capacity
    res = g.generate(ids, max_new_tokens=8, stop=False, protect_suffix=s)
    assert res.stats["evictions"] == (len(call.caches) if prefill == "layer" else res.stats["evictions"])
    assert len(res.tokens) == 8


@pytest.mark.parametrize("policy", ["snapkv", "mpcache", "mpcache_last_window"])
def test_compression_does_not_see_the_suffix(llama, context_ids, policy):
    """The context is compressed the same whatever question follows (the observation window ends with the context)."""
    from edge_sel.runtime.policies import mpcache

    steers = policy != "mpcache"  # mpcache's default sums every prompt query's attention: the question's few queries
    if policy == "mpcache_last_window":  # barely move it; the paper's last-20% window rule shows the look-ahead
        policy = mpcache(window="last", reduce="max", per_head=False, pool=15)
    g = Generator(llama, kv_budget=0.2, policy=policy)
    q0 = g.encode(QUESTIONS[0])[1:]
    q1 = list(q0)
    q1[2:8] = context_ids[100:106]  # another question of the same length (the budget counts the suffix's length)
    kept = []
    for q in (q0, q1):
        call = _prefilled(g, context_ids + q, len(q))
        kept.append([c.pos[:, :c.n][c.pos[:, :c.n] < len(context_ids)].tolist() for c in call.caches])
    assert kept[0] == kept[1]
    # without protection the question is part of the compressed prompt and steers the selection
    plain = []
    for q in (q0, q1):
        call = _prefilled(g, context_ids + q, 0)
        plain.append([c.pos[:, :c.n][c.pos[:, :c.n] < len(context_ids)].tolist() for c in call.caches])
    if steers:
        assert plain[0] != plain[1]


def test_suffix_with_room_for_everything_equals_plain(llama, context_ids):
    g = Generator(llama)
    ids = context_ids[:300] + g.encode(QUESTIONS[0])[1:]
    a = g.generate(ids, max_new_tokens=12, stop=False, return_logits=True)
    b = g.generate(ids, max_new_tokens=12, stop=False, return_logits=True, protect_suffix=20)
    assert a.tokens == b.tokens
    assert np.max(np.abs(np.stack(a.logits) - np.stack(b.logits))) < 1e-4


def test_score_with_uncompressed_continuation(llama, context_ids):
    ids = context_ids[:700]
    P = 600
    full = Generator(llama)
    ref = full.score(ids[:P], ids[P:])
    mine = full.score(ids[:P], ids[P:], compress_continuation=False)
    assert mine["n"] == ref["n"] == 100 and abs(mine["nll"] - ref["nll"]) < 1e-4
    g = Generator(llama, kv_budget=0.2, policy="snapkv")
    a = g.score(ids[:P], ids[P:], compress_continuation=False)
    assert np.isfinite(a["ppl"]) and g.last_stats["kv_capacity_tokens"] == int(np.ceil(0.2 * P)) + 100 + 1


def test_bad_suffix_is_refused(llama, context_ids):
    g = Generator(llama, kv_budget=0.2, policy="snapkv")
    for bad in (-1, len(context_ids), 1.5, True):
        with pytest.raises(InputError, match="protect_suffix"):
            g.generate(context_ids, max_new_tokens=4, protect_suffix=bad)


def test_infeasible_budget_with_suffix_is_refused_with_the_minimum(llama, context_ids):
    from edge_sel.runtime.errors import BudgetError

    g = Generator(llama, kv_budget=16, policy="mpcache")
    with pytest.raises(BudgetError, match="minimum") as e:
        g.generate(context_ids, max_new_tokens=4, protect_suffix=30)
    assert e.value.minimum_bytes > 0
    # a small context share is fine as long as the whole cache meets the policy's minimum
    g = Generator(llama, kv_budget=0.08, policy="mpcache")
    r = g.generate(context_ids[:1500], max_new_tokens=4, stop=False, protect_suffix=30)
    assert r.stats["kv_capacity_tokens"] == int(np.ceil(0.08 * 1470)) + 30 + 4
