"""MPCache recall (``mpcache_recall``): evicted K/V go to a per-call cold store on disk and the top groups
by the linear similarity are read back into a fetch area inside the budget. Tiny random-weight Llama."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from edge_sel.runtime.errors import BudgetError
from edge_sel.runtime.generate import Generator
from edge_sel.runtime.manifest import EMPTY_POS
from edge_sel.runtime.policies import MPCacheRecall, mpcache_recall

from gen_tiny import long_text

QUESTION = "\nQuestion: what is the special magic number for apple?\nAnswer: it is"


@pytest.fixture(scope="module")
def llama(gen_llama_bundle):
    return gen_llama_bundle


@pytest.fixture(scope="module")
def ids(llama):
    return Generator(llama).encode(long_text(5000))


@pytest.fixture(scope="module")
def question(llama):
    return Generator(llama).encode(QUESTION)[1:]


def _recall_part(policy):
    return next(p for p in policy.parts if isinstance(p, MPCacheRecall))


def _spy(gen, snapshot):
    """Wrap ``gen.run`` so ``snapshot(call)`` runs at every yield (the call's cold store still exists)."""
    orig = gen.run

    def run(*a, **k):
        for item in orig(*a, **k):
            snapshot(item[2])
            yield item
    gen.run = run


def _cold_snapshot(out):
    def snap(call):
        rec = _recall_part(call.policy)
        out["cold"] = [rec.store.read_all(L) for L in range(len(call.caches))]
        out["mix"] = {L: m[:, :rec.store.groups(L)].copy() for L, m in rec.store.mix.items()}
        out["resident"] = [(c.pos[:, :c.n].copy(), c.k[0, :, :c.n].copy()) for c in call.caches]
        out.setdefault("n_after_prefill", list(rec.store.n))
        out["call"] = call
    return snap


def _full_kv(llama, prompt, forced=None, max_new=8):
    """Every layer's K/V per position from a full-cache run (slot == position)."""
    g = Generator(llama)
    got = {}
    _spy(g, lambda call: got.__setitem__("call", call))
    if forced is None:
        g.generate(prompt, max_new_tokens=max_new, stop=False)
    else:
        g.score(prompt, forced)
    return [(c.k[0, :, :c.n].copy(), c.v[0, :, :c.n].copy(), c.pos[0, :c.n].copy()) for c in got["call"].caches]


def test_cold_store_holds_exactly_the_prefill_evicted_tokens(llama, ids, question):
    """Layer-mode prefill evicts from an exact one-layer scratch: every cold token's K/V, in every layer,
    equals the full-cache run's at its position, and cold + resident context = the whole context."""
    prompt = ids + question
    full = _full_kv(llama, prompt)
    g = Generator(llama, kv_budget=0.2, policy="mpcache_recall")
    out: dict = {}
    _spy(g, _cold_snapshot(out))
    res = g.generate(prompt, max_new_tokens=8, stop=False, protect_suffix=len(question))
    n_ctx = len(ids)
    assert res.stats["cold"]["tokens_per_layer_max"] > 0.7 * n_ctx
    for L, (ck, cv, cp) in enumerate(out["cold"]):
        rpos = out["resident"][L][0]
        assert ck.shape[1] > 0
        for h in range(ck.shape[0]):
            cold, kept = cp[h].tolist(), [p for p in rpos[h].tolist() if p < n_ctx]
            assert cold == sorted(cold) and not set(cold) & set(kept)
            assert sorted(cold + kept) == list(range(n_ctx))  # nothing lost, nothing twice
            fk, fv, fp = full[L]
            np.testing.assert_array_equal(fp[cp[h]], cp[h])
            np.testing.assert_allclose(ck[h], fk[h, cp[h]], atol=1e-4)
            np.testing.assert_allclose(cv[h], fv[h, cp[h]], atol=1e-4)


def test_decode_evictions_go_to_the_store_too(llama, ids):
    """A token budget with decode-time evictions: cold = everything fed that is not resident; layer 0's
    K/V depend only on token and position, so they equal the full run's for every cold token."""
    prompt, cont = ids[:700], ids[700:760]
    full = _full_kv(llama, prompt, forced=cont)
    g = Generator(llama, kv_budget=256, policy="mpcache_recall")
    out: dict = {}
    _spy(g, _cold_snapshot(out))
    g.score(prompt, cont)
    fed = len(prompt) + len(cont) - 1
    for L in range(len(out["cold"])):
        ck, cv, cp = out["cold"][L]
        rpos = out["resident"][L][0]
        for h in range(ck.shape[0]):
            assert sorted(cp[h].tolist() + rpos[h].tolist()) == list(range(fed))
    ck, cv, cp = out["cold"][0]
    assert ck.shape[1] > out["n_after_prefill"][0]  # decode steps evicted too
    fk, fv, _ = full[0]
    for h in range(ck.shape[0]):
        np.testing.assert_allclose(ck[h], fk[h, cp[h]], atol=1e-5)
        np.testing.assert_allclose(cv[h], fv[h, cp[h]], atol=1e-5)


@pytest.mark.parametrize("score", ["mix", "bound"])
def test_group_statistics_equal_brute_force(llama, ids, question, score):
    """The linear selection's group statistics (the exact selection keeps none in RAM); share=2: the paper's
    cross-layer sharing (static eviction and selection replayed in layer pairs), so only leaders keep statistics."""
    g = Generator(llama, kv_budget=0.2, policy=mpcache_recall(score=score, selection="linear", share=2))
    out: dict = {}
    _spy(g, _cold_snapshot(out))
    if score == "bound":
        snap = _cold_snapshot(out)

        def both(call):
            snap(call)
            st = _recall_part(call.policy).store
            out["minmax"] = {L: (st.kmax[L][:, :st.groups(L)].copy(), st.kmin[L][:, :st.groups(L)].copy()) for L in st.kmax}
        g = Generator(llama, kv_budget=0.2, policy=mpcache_recall(score=score, selection="linear", share=2))
        _spy(g, both)
    res = g.generate(ids + question, max_new_tokens=4, stop=False, protect_suffix=len(question))
    assert set(out["mix"]) == {0, 2}  # only the leaders of the share=2 layer groups keep statistics
    for L, mix in out["mix"].items():
        ck = out["cold"][L][0]
        n = ck.shape[1]
        G = 16  # the default cold group
        assert mix.shape[1] == -(-n // G)
        for gi in range(mix.shape[1]):
            blk = ck[:, gi * G:(gi + 1) * G]
            np.testing.assert_allclose(mix[:, gi], 0.6 * blk.max(axis=1) + 0.4 * blk.min(axis=1), rtol=0, atol=1e-6)
            if score == "bound":
                np.testing.assert_array_equal(out["minmax"][L][0][:, gi], blk.max(axis=1))
                np.testing.assert_array_equal(out["minmax"][L][1][:, gi], blk.min(axis=1))
    if score == "bound":
        return
    # the statistics are 1/16 of the cold keys of the leader layers, and counted in the KV bytes
    st = res.stats
    assert st["cold"]["stats_bytes"] > 0
    assert st["cold"]["stats_bytes"] <= 2 * 2 * 8 * 4 * (-(-(len(ids) + len(question) + 4) // 16) + 1)
    assert st["kv_bytes_allocated"] >= st["kv_capacity_tokens"] * 4 * 2 * 2 * 8 + st["cold"]["stats_bytes"]


class _AttnSpy:
    def __init__(self, sess, log):
        self.sess, self.log = sess, log

    def run(self, names, feeds):
        kp = feeds["key_pos"][0]
        self.log.append((kp.shape[1], int((kp != EMPTY_POS).sum(axis=1).max()), feeds["q"].shape[2]))
        return self.sess.run(names, feeds)


@pytest.mark.parametrize("selection", ["exact", "linear"])
@pytest.mark.parametrize("budget,suffix", [(256, False), (0.2, True), ("1MB", False)])
def test_resident_plus_fetched_never_exceed_the_budget(llama, ids, question, budget, suffix, selection):
    g = Generator(llama, kv_budget=budget, policy=mpcache_recall(selection=selection))
    log: list = []
    g.model.layers = [(qkv, _AttnSpy(attn, log)) for qkv, attn in g.model.layers]
    prompt = ids + question if suffix else ids
    res = g.generate(prompt, max_new_tokens=40, stop=False, protect_suffix=len(question) if suffix else 0)
    st = res.stats
    cap = st["kv_capacity_tokens"]
    assert st["kv_fetch_tokens"] > 0 and st["kv_resident_tokens"] + st["kv_fetch_tokens"] == cap
    if isinstance(budget, int):
        assert cap <= budget
    if budget == "1MB":
        pol = mpcache_recall(selection=selection)
        fixed = pol.fixed_bytes(g.n_layers, g.kv_heads, g.head_dim, len(prompt) + 40)
        assert cap * g.bytes_per_token(pol) + fixed <= 1_000_000  # the exact scoring's scratch is in `fixed`
        assert st["cold"]["stats_bytes"] <= fixed
        assert st["kv_bytes_allocated"] <= 1_000_000 and st["kv_bytes_peak"] <= 1_000_000
    decode = [x for x in log if x[2] == 1]
    assert decode and max(x[0] for x in decode) <= cap and max(x[1] for x in decode) <= cap
    assert st["kv_tokens_peak_per_layer"] <= cap
    # the fetch area was used: attention read more than the resident part can hold (when the resident
    # part is read whole: from 512 tokens on, the dynamic selection reads a subset of it)
    if st["kv_resident_tokens"] < 512:
        assert max(x[1] for x in decode) > st["kv_resident_tokens"]
    if selection == "linear":  # MPCache's similarity at every step: reads from disk, no exponentials
        assert st["cold"]["bytes_read_per_decode_step"] > 0
        assert st["cost_per_decode_step"]["gathers"] > 0 and st["cost_per_decode_step"]["exp_div"] == 0
    elif suffix:  # exact scoring at the question (exponentials), then nothing read while decoding
        assert st["cold"]["bytes_read_suffix"] > 0 and st["cost_prefill"]["exp_div"] > 0
        assert st["cold"]["bytes_read_per_decode_step"] == 0 and st["cost_per_decode_step"]["exp_div"] == 0
    else:  # no question: the first decode step's query selects, once
        assert 0 < st["cold"]["bytes_read_per_decode_step"] * 39 <= 3 * st["cold"]["file_bytes"]


def test_fetching_everything_reproduces_the_full_cache(llama, ids, question):
    """A fetch area as large as everything evicted: attention sees every token again -> full-cache logits."""
    ctx = ids[:580]
    prompt = ctx + question[:20]
    ref = Generator(llama).generate(prompt, max_new_tokens=25, stop=False, return_logits=True)
    for sfx in (0, 20):  # 640 slots: 192 resident (the prefill keeps 160 / 147 context tokens) + 448 fetched
        pol = mpcache_recall(fetch=448)
        g = Generator(llama, kv_budget=640, policy=pol)
        res = g.generate(prompt, max_new_tokens=25, stop=False, return_logits=True, protect_suffix=sfx)
        st = res.stats
        assert st["kv_fetch_tokens"] == 448 and st["cold"]["tokens_per_layer_max"] > 300  # really evicted
        assert st["cold"]["tokens_per_layer_max"] <= 448
        assert res.tokens == ref.tokens
        assert np.max(np.abs(np.stack(res.logits) - np.stack(ref.logits))) < 1e-4
    # the same for the causal, block-by-block recall of score(compress_continuation=False)
    P = 500
    full_nll = Generator(llama).score(ids[:P], ids[P:P + 100], compress_continuation=False)["nll"]
    g = Generator(llama, kv_budget=P + 101, policy=mpcache_recall(fetch=448))
    mine = g.score(ids[:P], ids[P:P + 100], compress_continuation=False)["nll"]
    assert abs(mine - full_nll) < 1e-4
    # and without the fetch area the same budget loses information (the test can fail)
    plain = Generator(llama, kv_budget=192, policy="mpcache").generate(prompt, max_new_tokens=25, stop=False,
                                                                       return_logits=True)
    assert np.max(np.abs(np.stack(plain.logits) - np.stack(ref.logits))) > 1e-3


def _cold_dirs(root):
    return [d for d in os.listdir(root) if d.startswith("edge_sel-cold-")]


def test_cold_files_are_removed_after_the_call_and_after_an_exception(llama, ids, question, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    g = Generator(llama, kv_budget=0.2, policy="mpcache_recall")
    seen = []
    _spy(g, lambda call: seen.append(sorted(os.listdir(_recall_part(call.policy).store.root))))
    g.generate(ids + question, max_new_tokens=4, stop=False, protect_suffix=len(question))
    assert seen and seen[-1] == [f"layer{L:03d}.kv" for L in range(4)]  # the files existed during the call
    assert _cold_dirs(tmp_path) == []
    g.score(ids[:600], ids[600:700], compress_continuation=False)
    assert _cold_dirs(tmp_path) == []

    class Boom:
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feeds):
            if feeds["q"].shape[2] == 1 and int(feeds["position_ids"][0, 0]) == len(ids) + 2:
                assert _cold_dirs(tmp_path)  # mid-decode: the store is there
                raise RuntimeError("boom")
            return self.sess.run(names, feeds)
    g2 = Generator(llama, kv_budget=0.2, policy="mpcache_recall")
    g2.model.layers = [(qkv, Boom(attn)) for qkv, attn in g2.model.layers]
    with pytest.raises(RuntimeError, match="boom"):
        g2.generate(ids, max_new_tokens=8, stop=False)
    assert _cold_dirs(tmp_path) == []
    # a stream abandoned half way closes its generator: files go too
    it = g.stream(ids, max_new_tokens=8, stop=False)
    next(it)
    it.close()
    assert _cold_dirs(tmp_path) == []


def test_recall_is_deterministic(llama, ids, question):
    runs = [Generator(llama, kv_budget=0.2, policy="mpcache_recall").generate(
        ids + question, max_new_tokens=12, stop=False, protect_suffix=len(question)) for _ in range(2)]
    a, b = runs
    assert a.tokens == b.tokens
    assert a.stats["cost_per_decode_step"] == b.stats["cost_per_decode_step"]
    assert a.stats["cold"] == b.stats["cold"]


def test_fetch_area_never_takes_the_resident_minimum(llama, ids, caplog):
    g = Generator(llama, kv_budget=64, policy="mpcache_recall")  # 64 = the resident minimum: no room to fetch
    r = g.generate(ids, max_new_tokens=4, stop=False)
    assert r.stats["kv_fetch_tokens"] == 0 and r.stats["kv_resident_tokens"] == 64 and "cold" not in r.stats
    r = Generator(llama, kv_budget=128, policy="mpcache_recall").generate(ids, max_new_tokens=4, stop=False)
    assert r.stats["kv_fetch_tokens"] == 64 and r.stats["kv_resident_tokens"] == 64  # half wanted, 64 left
    r = Generator(llama, kv_budget=192, policy="mpcache_recall").generate(ids, max_new_tokens=4, stop=False)
    assert r.stats["kv_fetch_tokens"] == 96 and r.stats["kv_resident_tokens"] == 96
    # less than a group left: the exact selection (tokens) still takes it, the linear one (groups) cannot
    # (a question keeps the token budget exact instead of rounded down to the 32-token alignment)
    q = Generator(llama).encode(QUESTION)[1:]
    r = Generator(llama, kv_budget=76, policy="mpcache_recall").generate(ids + q, max_new_tokens=4, stop=False,
                                                                         protect_suffix=len(q))
    assert r.stats["kv_fetch_tokens"] == 12 and r.stats["kv_resident_tokens"] == 64
    assert r.stats["kv_tokens_peak_per_layer"] <= 76
    r = Generator(llama, kv_budget=76, policy=mpcache_recall(selection="linear")).generate(
        ids + q, max_new_tokens=4, stop=False, protect_suffix=len(q))
    assert r.stats["kv_fetch_tokens"] == 0
    # the 1k-token needle at 10% (a 140-slot budget): the 64-token minimum leaves a 48-token area (was 12)
    r = Generator(llama, kv_budget=140, policy="mpcache_recall").generate(ids + q, max_new_tokens=4, stop=False,
                                                                          protect_suffix=len(q))
    assert r.stats["kv_fetch_tokens"] == 48 and r.stats["kv_tokens_peak_per_layer"] <= 140
    caplog.clear()
    with pytest.raises(BudgetError, match="minimum") as e:
        Generator(llama, kv_budget=32, policy="mpcache_recall").generate(ids, max_new_tokens=4, stop=False)
    assert "running without recall" not in caplog.text  # a refused budget is one line, not a warning and then it
    per_tok = g.bytes_per_token()
    assert e.value.minimum_bytes >= 64 * per_tok
    ok = Generator(llama, kv_budget=f"{e.value.minimum_bytes}B", policy="mpcache_recall")
    r = ok.generate(ids, max_new_tokens=4, stop=False)
    assert r.stats["kv_bytes_allocated"] <= e.value.minimum_bytes
    # the plain variant (no offload) is still selectable and keeps every slot resident
    plain = Generator(llama, kv_budget=0.2, policy="mpcache").generate(ids, max_new_tokens=4, stop=False)
    assert plain.stats["kv_fetch_tokens"] == 0 and "cold" not in plain.stats


@pytest.mark.parametrize("score,head_reduce", [("mix", "sum"), ("mix", "max"), ("bound", "max")])
def test_recall_fetches_the_best_groups_by_definition(tmp_path, score, head_reduce):
    """Synthetic cache: evict 320 tokens, query, and the fetched groups are the top ones by
    sum_d q_d (a kmax_d + (1-a) kmin_d) (or Quest's bound) over each head's cold groups (brute force)."""
    from edge_sel.runtime.kvcache import LayerCache
    from edge_sel.runtime.policies import Context

    rng = np.random.default_rng(1)
    kv, heads, D = 2, 4, 8
    rec = MPCacheRecall(share=1, score=score, head_reduce=head_reduce, group=32, selection="linear")
    rec.begin(Context(1, kv, heads, D, 64, 384, 8, fetch=64))
    c = LayerCache(kv, 384, D, fetch=64)
    k = rng.standard_normal((1, kv, 384, D)).astype(np.float32)
    v = rng.standard_normal((1, kv, 384, D)).astype(np.float32)
    c.append(k, v, np.arange(384))
    keep = np.arange(320, 384)
    rec.evicted(0, c, keep)
    c.compact(keep)
    q = rng.standard_normal((1, heads, 1, D)).astype(np.float32)
    rec.recall(0, q, c, "decode")
    assert c.nf == 64
    qg = q[0, :, 0].reshape(kv, heads // kv, D)
    for h in range(kv):
        grp = k[0, h, :320].reshape(10, 32, D)
        mx, mn = grp.max(1), grp.min(1)
        qs = qg[h].sum(0, keepdims=True) if head_reduce == "sum" else qg[h]
        if score == "mix":
            sc = (qs @ (0.6 * mx + 0.4 * mn).T).max(0)
        else:
            sc = np.maximum(qs[:, None] * mx[None], qs[:, None] * mn[None]).sum(-1).max(0)
        best = sorted(np.argsort(-sc)[:2].tolist())
        fetched = c.pos[h, 384:384 + 64]
        assert sorted(set((fetched // 32).tolist())) == best
        np.testing.assert_array_equal(c.k[0, h, 384:448], k[0, h, fetched])
        np.testing.assert_array_equal(c.v[0, h, 384:448], v[0, h, fetched])
    rec.end()


def test_recall_expand_fetches_the_neighbours_of_the_best_group(tmp_path):
    from edge_sel.runtime.kvcache import LayerCache
    from edge_sel.runtime.policies import Context

    rng = np.random.default_rng(2)
    kv, heads, D = 2, 4, 8
    rec = MPCacheRecall(share=1, group=16, expand=1, selection="linear")
    rec.begin(Context(1, kv, heads, D, 64, 384, 8, fetch=48))
    c = LayerCache(kv, 384, D, fetch=48)
    k = rng.standard_normal((1, kv, 384, D)).astype(np.float32)
    c.append(k, k, np.arange(384))
    keep = np.arange(320, 384)
    rec.evicted(0, c, keep)
    c.compact(keep)
    q = rng.standard_normal((1, heads, 1, D)).astype(np.float32)
    rec.recall(0, q, c, "decode")
    qs = q[0, :, 0].reshape(kv, 2, D).sum(1)
    for h in range(kv):
        grp = k[0, h, :320].reshape(20, 16, D)
        sc = qs[h] @ (0.6 * grp.max(1) + 0.4 * grp.min(1)).T
        want: list = []
        for g in np.argsort(-sc):  # best first, each with its neighbours (at an edge the next best fills in)
            for x in (g - 1, g, g + 1):
                if 0 <= x < 20 and x not in want and len(want) < 3:
                    want.append(int(x))
        assert sorted(set((c.pos[h, 384:432] // 16).tolist())) == sorted(want)
    rec.end()


# ---- exact question-time selection (the default) ---------------------------------------------------
def _synthetic(tmp_path, rec, n=384, keep_from=320, fetch=64, kv=2, heads=4, D=8, seed=3, layers=1, stream=False):
    from edge_sel.runtime.kvcache import LayerCache
    from edge_sel.runtime.policies import Context

    rng = np.random.default_rng(seed)
    rec.begin(Context(layers, kv, heads, D, n - keep_from, n, 8, fetch=fetch, stream_suffix=stream))
    k = rng.standard_normal((1, kv, n, D)).astype(np.float32)
    v = rng.standard_normal((1, kv, n, D)).astype(np.float32)
    caches = []
    for L in range(layers):
        c = LayerCache(kv, n, D, fetch=fetch)
        c.append(k, v, np.arange(n))
        keep = np.arange(keep_from, n)
        rec.evicted(L, c, keep)
        c.compact(keep)
        caches.append(c)
    return k, v, caches, rng


def _brute_force_votes(q, k, keep_from, pool, vote="sum", follow=0):
    """softmax(q.k/sqrt(d)) of every query over all keys of its KV head, voted per cold key, max-pooled."""
    kv, D = k.shape[1], k.shape[3]
    H = q.shape[1]
    out = []
    for h in range(kv):
        Q = q[0, h * (H // kv):(h + 1) * (H // kv)].reshape(-1, D).astype(np.float64)
        lg = Q @ k[0, h].astype(np.float64).T / np.sqrt(D)
        p = np.exp(lg - lg.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        s = (p.sum(0) if vote == "sum" else p.max(0))[:keep_from]
        r = pool // 2
        pooled = np.array([s[max(0, i - r):i + r + 1].max() for i in range(keep_from)])
        out.append(np.array([pooled[max(0, i - follow):i + 1].max() for i in range(keep_from)]))
    return np.stack(out)


@pytest.mark.parametrize("vote,pool,follow,fetch,stream,tail", [
    ("sum", 7, 0, 48, False, 0), ("max", 1, 0, 48, False, 0), ("sum", 3, 0, 48, False, 0), ("sum", 7, 12, 48, False, 0),
    ("max", 7, 12, 12, False, 0), ("max", 7, 12, 48, True, 0), ("max", 7, 12, 48, False, 2), ("max", 7, 12, 48, True, 2)])
def test_exact_selection_fetches_the_top_tokens_by_softmax_votes(tmp_path, vote, pool, follow, fetch, stream, tail):
    """The fetched cold tokens are the top ones by the question's softmax votes over the whole context
    (resident + cold keys), max-pooled: brute force in float64. Blocks of the cold store are smaller
    than the cold set (fetch 48 < 320), so the two-pass block scoring is exercised. Text being scored
    (``stream``: score()'s causal blocks) votes with ``stream_pool``/``stream_follow`` (1/0) instead.
    ``question_tail`` (``tail``) votes with the question's last queries only; text being scored ignores it."""
    rec = MPCacheRecall(share=1, group=16, vote=vote, vote_pool=pool, vote_follow=follow, question_tail=tail)
    k, v, (c,), rng = _synthetic(tmp_path, rec, fetch=fetch, stream=stream)  # fetch 12 < a group: blocks of 12 tokens
    q = rng.standard_normal((1, 4, 5, 8)).astype(np.float32) * 2  # a 5-token question
    rec.recall(0, q, c, "suffix")
    if tail and not stream:
        everyone = _brute_force_votes(q, k, 320, pool, vote, follow)  # all five queries would pick other tokens
        assert not np.array_equal(np.sort(c.pos[0, 384:384 + fetch]), np.sort(np.argsort(-everyone[0])[:fetch]))
        q = q[:, :, -tail:]
    assert c.nf == fetch
    if stream:
        pool, follow = rec.stream_pool, rec.stream_follow
        assert (pool, follow) == (1, 0)
        other = _brute_force_votes(q, k, 320, 7, vote, 12)  # the question's rule would pick other tokens
        got = c.pos[0, 384:384 + fetch]
        assert not np.array_equal(np.sort(got), np.sort(np.argsort(-other[0])[:fetch]))
    want = _brute_force_votes(q, k, 320, pool, vote, follow)
    for h in range(2):
        got = c.pos[h, 384:384 + fetch]
        assert len(set(got.tolist())) == fetch and got.max() < 320
        # every fetched token scores at least as well as every token left on disk (ties aside)
        left = np.setdiff1d(np.arange(320), got)
        assert want[h, got].min() >= want[h, left].max() - 1e-5
        np.testing.assert_array_equal(c.k[0, h, 384:384 + fetch], k[0, h, got])
        np.testing.assert_array_equal(c.v[0, h, 384:384 + fetch], v[0, h, got])
    st = rec.report(0)["cold"]
    # the cold keys were read twice (two passes) plus the chosen tokens, and the scratch stayed small
    assert st["bytes_read_suffix"] >= 2 * 320 * 2 * (8 * 4 * 2 + 8)
    assert st["select_scratch_bytes_peak"] <= rec.fixed_bytes(1, 2, 8, 384 + 8)
    assert rec.cost["exp_div"] > 0 and rec.cost["multiplications"] > 0
    rec.end()


@pytest.mark.parametrize("pool,follow,want", [(7, 0, range(93, 100)), (1, 12, range(96, 109))])
def test_exact_selection_fetches_a_planted_key_with_its_neighbours(tmp_path, pool, follow, want):
    """A cold key planted along the question's query is fetched, with its pooled neighbours (or the
    ``follow`` tokens after it), also across a cold-group boundary (position 95/96 with 16-token groups),
    in every KV head; a 16-slot area."""
    rec = MPCacheRecall(share=1, group=16, vote_pool=pool, vote_follow=follow)
    from edge_sel.runtime.kvcache import LayerCache
    from edge_sel.runtime.policies import Context

    rng = np.random.default_rng(5)
    kv, heads, D, n = 2, 4, 8, 384
    k = rng.standard_normal((1, kv, n, D)).astype(np.float32) * 0.3
    v = rng.standard_normal((1, kv, n, D)).astype(np.float32)
    q = rng.standard_normal((1, heads, 3, D)).astype(np.float32)
    for h in range(kv):
        k[0, h, 96] = 3.0 * q[0, h * 2, -1]  # matches the question's last query of that KV head's first head
    rec.begin(Context(1, kv, heads, D, 64, n, 8, fetch=16))
    c = LayerCache(kv, n, D, fetch=16)
    c.append(k, v, np.arange(n))
    keep = np.arange(320, n)
    rec.evicted(0, c, keep)
    c.compact(keep)
    rec.recall(0, q, c, "suffix")
    for h in range(kv):
        got = set(c.pos[h, 384:400].tolist())
        assert set(want) <= got  # the hit and its neighbours (groups 5 and 6)
    rec.end()


def test_exact_selection_shared_by_a_layer_group(tmp_path):
    """``select_share=2``: the follower layer's fetch area holds the leader's token ids (its cold store
    holds the same tokens in the same order) and it scores nothing itself."""
    rec = MPCacheRecall(share=2, group=16, select_share=2)
    k, v, caches, rng = _synthetic(tmp_path, rec, fetch=32, layers=2)
    q = rng.standard_normal((1, 4, 4, 8)).astype(np.float32)
    rec.recall(0, q, caches[0], "suffix")
    cost = dict(rec.cost)
    rec.recall(1, rng.standard_normal((1, 4, 4, 8)).astype(np.float32), caches[1], "suffix")
    np.testing.assert_array_equal(caches[0].pos[:, 384:416], caches[1].pos[:, 384:416])
    assert rec.cost["exp_div"] == cost["exp_div"]  # the follower paid no scoring
    rec.end()


def test_exact_selection_stays_fixed_while_decoding(llama, ids, question):
    """After the question the fetch area of every layer holds the same tokens at every decode step and
    nothing is read from disk; ``refresh=4`` re-reads the area's tail every 4 steps (linear groups) and
    never attends to a token twice."""
    areas: list = []

    def snap(call):
        areas.append([c.pos[:, c.capacity:c.capacity + c.fetch].copy() for c in call.caches])
    g = Generator(llama, kv_budget=0.2, policy="mpcache_recall")
    _spy(g, snap)
    res = g.generate(ids + question, max_new_tokens=12, stop=False, protect_suffix=len(question))
    assert res.stats["kv_fetch_tokens"] > 0 and res.stats["cold"]["bytes_read_per_decode_step"] == 0
    for a in areas[1:]:
        for L in range(len(a)):
            np.testing.assert_array_equal(a[L], areas[0][L])
    assert (areas[0][0] != EMPTY_POS).all()  # the whole area is used
    seen: list = []

    def snap2(call):
        seen.append([(c.pos[:, :c.n].copy(), c.pos[:, c.capacity:c.capacity + c.nf].copy()) for c in call.caches])
    g = Generator(llama, kv_budget=0.2, policy=mpcache_recall(refresh=4))
    _spy(g, snap2)
    res = g.generate(ids + question, max_new_tokens=12, stop=False, protect_suffix=len(question))
    assert res.stats["cold"]["bytes_read_per_decode_step"] > 0 and res.stats["cold"]["stats_bytes"] > 0
    for layers in seen:
        for rp, fp in layers:
            for h in range(rp.shape[0]):
                live = np.concatenate([rp[h], fp[h][fp[h] != EMPTY_POS]])
                assert len(np.unique(live)) == len(live)
    assert any(not np.array_equal(seen[0][0][1], s[0][1]) for s in seen[1:])  # the tail changed


@pytest.mark.parametrize("policy", ["mpcache_recall", "mpcache_ea_survey_recall"])
def test_score_recall_is_causal_no_token_sees_a_later_one(llama, ids, policy):
    """score(compress_continuation=False) with recall: the fetch area of each continuation block is selected
    by the queries before it, so changing the continuation from token 60 on leaves the NLL of tokens 0..59
    bit-identical. The same check on the question path (every suffix query selects, up front) fails."""
    P = 500
    cont = ids[P:P + 100]
    other = cont[:60] + ids[P + 200:P + 240]
    g = Generator(llama, kv_budget=0.2, policy=policy)
    a = g.score(ids[:P], cont, compress_continuation=False)
    assert g.last_stats["kv_fetch_tokens"] > 0 and g.last_stats["cold"]["bytes_read_suffix"] > 0  # really recalls
    b = g.score(ids[:P], other, compress_continuation=False)
    assert len(a["nll_tokens"]) == 100 and a["nll"] == pytest.approx(np.mean(a["nll_tokens"]))
    assert np.array_equal(np.array(a["nll_tokens"][:60]), np.array(b["nll_tokens"][:60]))
    assert np.max(np.abs(np.array(a["nll_tokens"][60:]) - np.array(b["nll_tokens"][60:]))) > 1e-3

    def hidden(c, causal):  # the last layer's hidden states of the continuation, via the internal path
        with __import__("contextlib").closing(g.run(ids[:P] + c, 1, 0.0, 1.0, None, False, None, False, suffix=len(c),
                                                     suffix_hidden=True, causal_suffix=causal)) as run:
            for _, _, call in run:
                return call.suffix_hidden[0, 1:61].copy()
    assert np.array_equal(hidden(cont, True), hidden(other, True))
    assert np.max(np.abs(hidden(cont, False) - hidden(other, False))) > 1e-4  # look-ahead is detectable


def _planted(rec, layers, plant, n=384, keep_from=320, fetch=16, seed=5):
    """``layers`` layers of random keys (every token from ``keep_from`` on resident, the rest cold); ``plant``:
    ``{(layer, kv head): position}`` keys set along the question's last query of that KV head's first head."""
    from edge_sel.runtime.kvcache import LayerCache
    from edge_sel.runtime.policies import Context

    rng = np.random.default_rng(seed)
    kv, heads, D = 2, 4, 8
    q = rng.standard_normal((1, heads, 3, D)).astype(np.float32)
    rec.begin(Context(layers, kv, heads, D, n - keep_from, n, 8, fetch=fetch))
    caches = []
    for L in range(layers):
        k = rng.standard_normal((1, kv, n, D)).astype(np.float32) * 0.3
        for (pl, h), p in plant.items():
            if pl == L:
                k[0, h, p] = 3.0 * q[0, h * 2, -1]
        c = LayerCache(kv, n, D, fetch=fetch)
        c.append(k, rng.standard_normal((1, kv, n, D)).astype(np.float32), np.arange(n))
        keep = np.arange(keep_from, n)
        rec.evicted(L, c, keep)
        c.compact(keep)
        caches.append(c)
    return q, caches


@pytest.mark.parametrize("head_mix", [0.0, 4.0])
def test_exact_selection_head_mix_brings_one_heads_hit_to_every_head(tmp_path, head_mix):
    """``head_mix``: a key only KV head 0 finds (planted at 96) is fetched by KV head 1 too, with its followers;
    without it head 1 fetches its own (random) best."""
    rec = MPCacheRecall(share=1, group=16, vote_pool=1, vote_follow=12, head_mix=head_mix)
    q, (c,) = _planted(rec, 1, {(0, 0): 96})
    rec.recall(0, q, c, "suffix")
    assert set(range(96, 109)) <= set(c.pos[0, 384:400].tolist())
    assert (set(range(96, 109)) <= set(c.pos[1, 384:400].tolist())) == (head_mix > 0)
    assert rec.report(0)["cold"]["select_scratch_bytes_peak"] <= rec.fixed_bytes(1, 2, 8, 384 + 8)
    rec.end()


@pytest.mark.parametrize("carry", [0.0, 4.0])
def test_exact_selection_carry_brings_an_earlier_layers_hit_to_later_layers(tmp_path, carry):
    """``carry``: a passage the question found in layer 0 (planted at 96 in both KV heads) is fetched by layer 1,
    whose own keys hold no hit; layer 0 itself is unchanged (no earlier layer)."""
    rec = MPCacheRecall(share=1, group=16, vote_pool=1, vote_follow=12, carry=carry)
    q, caches = _planted(rec, 2, {(0, 0): 96, (0, 1): 96})
    for L in range(2):
        rec.recall(L, q, caches[L], "suffix")
    want = set(range(96, 109))
    for h in range(2):
        assert want <= set(caches[0].pos[h, 384:400].tolist())
        assert (want <= set(caches[1].pos[h, 384:400].tolist())) == (carry > 0)
    rec.end()


def test_carry_and_head_mix_stay_inside_a_byte_budget(llama, ids, question):
    """Their scratch (positions and per-position votes) is counted before allocation: the byte budget still
    bounds everything, and the same budget leaves fewer cache slots than without them."""
    caps = {}
    for kw in ({"carry": 0.0}, {"carry": 1.0, "head_mix": 1.0}):
        pol = mpcache_recall(**kw)
        g = Generator(llama, kv_budget="1MB", policy=pol)
        prompt = ids + question
        res = g.generate(prompt, max_new_tokens=8, stop=False, protect_suffix=len(question))
        st = res.stats
        assert st["kv_fetch_tokens"] > 0
        assert st["kv_bytes_allocated"] <= 1_000_000 and st["kv_bytes_peak"] <= 1_000_000
        caps[kw["carry"] > 0] = st["kv_capacity_tokens"]
        fixed = pol.fixed_bytes(g.n_layers, g.kv_heads, g.head_dim, len(prompt) + 8)
        assert st["kv_capacity_tokens"] * g.bytes_per_token(pol) + fixed <= 1_000_000
    assert caps[True] <= caps[False]
    assert mpcache_recall(carry=1.0).fixed_bytes(2, 2, 8, 1000) > mpcache_recall(carry=0.0).fixed_bytes(2, 2, 8, 1000)
