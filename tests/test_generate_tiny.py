"""Generation on tiny random-weight Llama / Qwen2 / Qwen3 generate bundles: parity with transformers,
the budget as a hard bound, and each policy's defining property (real onnxruntime sessions)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sel.runtime.errors import BudgetError, InputError
from edge_sel.runtime.generate import Generator
from edge_sel.runtime.policies import REGISTRY, LayerSkip, MPCacheDynamic, MPCacheStatic, make_policy, mpcache

from gen_tiny import long_text, make_gen_decoder

_MODELS: dict = {}


def _bundle(tmp_path_factory, kind="llama", layers=4):
    key = (kind, layers)
    if key not in _MODELS:
        from edge_sel.export import export

        root = tmp_path_factory.mktemp(f"gen_{kind}_{layers}")
        hf = make_gen_decoder(root / "hf", kind=kind, layers=layers)
        _MODELS[key] = (export(hf, root / "bundle", task="generate", verify=True), hf)
    return _MODELS[key]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _bundle(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def gen_full(llama):
    g = Generator(llama)
    yield g
    g.close()


PROMPTS = ["Return the number of items in a container.", "Open a file and return a stream.",
           "Sort a list in place, stable, with an optional key function."]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_full_policy_matches_transformers(tmp_path_factory, kind):
    import torch
    from transformers import AutoModelForCausalLM

    from edge_sel.export.adapters import adapter_for

    bundle, hf = _bundle(tmp_path_factory, kind)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    gen = Generator(bundle, policy="full", chunk_tokens=7)  # several prefill chunks
    for p in PROMPTS:
        res = gen.generate(p, max_new_tokens=24, return_logits=True, stop=False)
        ref = adapter_for(kind).reference_logits(model, res.prompt_ids, res.tokens[:-1])
        mine = np.stack(res.logits)
        assert np.max(np.abs(mine - ref)) < 1e-3
        assert res.tokens == [int(np.argmax(r)) for r in ref]  # same greedy tokens
    gen.close()


def test_attention_never_copies_the_cache_over_the_group(llama):
    """A kv head's query heads multiply its cached keys and values as broadcast views (the tiny Llama groups 2 query
    heads per kv head): no node widens or copies the cache over the group (no Expand / Tile / Concat of it), and the
    key product is unscaled (the scaling is on q), so onnxruntime reads the keys in place one row at a time."""
    import onnx

    from edge_sel.runtime.bundle import Bundle

    b = Bundle.open(llama)
    assert b.spec.dims.heads > b.spec.dims.kv_heads
    g = onnx.load(str(b.path(b.spec.layers[0].file)), load_external_data=False).graph
    users = lambda name: [n for n in g.node if name in n.input]  # noqa: E731
    for cache, path in (("v_cache", ["MatMul"]), ("k_cache", ["Transpose", "MatMul"])):
        views = users(cache)
        assert [n.op_type for n in views] == ["Unsqueeze"], cache
        n = views[0]
        for op in path:
            nxt = users(n.output[0])
            assert [x.op_type for x in nxt] == [op], cache
            n = nxt[0]
    qk = users(users(users("k_cache")[0].output[0])[0].output[0])[0]
    assert not [x for x in users(qk.output[0]) if x.op_type == "Mul"]  # no scalar scaling to fold into the product


def test_manifest_and_chat_template(llama, gen_full):
    from edge_sel.runtime.bundle import Bundle

    b = Bundle.open(llama, verify=True)
    assert b.task == "generate" and b.scoring == "lm"
    assert b.manifest["export"]["verified_max_abs_diff"] < 1e-3
    chat = b.manifest["chat"]
    assert chat["before"].endswith("<|im_start|>user\n") and chat["after"] == "<|im_end|>\n<|im_start|>assistant\n"
    ids = gen_full.encode("hello", chat=True)
    assert ids[0] == gen_full.tokenizer.token_to_id("<|im_start|>")


def test_stream_equals_generate_and_sampling_is_seeded(gen_full):
    res = gen_full.generate(PROMPTS[0], max_new_tokens=20, stop=False)
    assert "".join(gen_full.stream(PROMPTS[0], max_new_tokens=20, stop=False)) == res.text
    a = gen_full.generate(PROMPTS[1], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7, stop=False).tokens
    b = gen_full.generate(PROMPTS[1], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7, stop=False).tokens
    c = gen_full.generate(PROMPTS[1], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=8, stop=False).tokens
    assert a == b and a != c


def test_stop_tokens_end_generation(llama):
    g = Generator(llama)
    free = g.generate(PROMPTS[0], max_new_tokens=10, stop=False).tokens
    stop_tok = free[-1]
    g.stop_ids = {stop_tok}
    res = g.generate(PROMPTS[0], max_new_tokens=10)
    assert res.finish_reason == "stop" and res.tokens == free[: free.index(stop_tok) + 1]
    assert stop_tok not in g.tokenizer.encode(res.text, add_special_tokens=False) or res.text == ""


LONG = None


def _long_prompt():
    global LONG
    if LONG is None:
        LONG = long_text(16000)
    return LONG


@pytest.mark.parametrize("policy", [p for p in REGISTRY if p != "full"] + ["snapkv+mpcache_dynamic", "mpcache+layer_skip"])
def test_budget_is_a_hard_bound_on_a_4k_prompt(llama, policy):
    g = Generator(llama, kv_budget="1MB", policy=policy)
    res = g.generate(_long_prompt(), max_new_tokens=48, stop=False)
    st = res.stats
    assert st["prompt_tokens"] >= 4000
    per_tok = g.bytes_per_token(make_policy(policy))
    assert st["kv_capacity_tokens"] * per_tok <= 1_000_000
    assert st["kv_bytes_allocated"] <= 1_000_000 and st["kv_bytes_peak"] <= 1_000_000
    assert st["kv_tokens_peak_per_layer"] <= max(st["kv_capacity_tokens_per_layer"])
    assert sum(st["kv_capacity_tokens_per_layer"]) <= st["kv_capacity_tokens"] * len(st["kv_tokens_kept"])
    assert st["evictions"] > 0 and len(res.tokens) == 48
    assert set(st["cost_per_decode_step"]) == {"comparisons", "multiplications", "exp_div", "gathers"}


def test_budget_forms_and_refusals(llama):
    prompt = PROMPTS[2]
    n = len(Generator(llama).encode(prompt))
    assert Generator(llama, kv_budget=0.5, policy="h2o").generate(_long_prompt()[:2000], max_new_tokens=4).stats["kv_capacity_tokens"] > 0
    assert Generator(llama, kv_budget="64", policy="h2o").generate(prompt, max_new_tokens=4).stats["kv_capacity_tokens"] <= 64
    for bad in (0, -5, "0", "-1MB", 1.5, 0.0):
        with pytest.raises((BudgetError, InputError)):
            Generator(llama, kv_budget=bad)
    with pytest.raises(BudgetError) as e:  # full must hold prompt + new tokens
        Generator(llama, kv_budget=n + 3, policy="full").generate(prompt, max_new_tokens=8)
    g = Generator(llama, policy="full")
    assert e.value.minimum_bytes == (n + 8) * g.bytes_per_token()
    assert "minimum" in str(e.value)
    with pytest.raises(BudgetError) as e2:
        Generator(llama, kv_budget=40, policy="mpcache").generate(_long_prompt()[:3000], max_new_tokens=8)
    assert e2.value.minimum_bytes > 0
    with pytest.raises(InputError, match="unknown policy 'nope'.*streaming_llm"):
        Generator(llama, policy="nope")
    with pytest.raises(InputError, match="empty"):
        g.generate("   ")
    with pytest.raises(InputError, match="refusing"):
        g.generate(long_text(60000))


def test_rerank_bundle_is_refused(llama_bundle):
    with pytest.raises(InputError, match="generate"):
        Generator(llama_bundle)


def _run_with(llama, policy, budget=300, n_new=40, prompt_chars=6000):
    g = Generator(llama, kv_budget=budget, policy=policy)
    calls = []
    orig = g.run

    def spy(*a, **k):
        for item in orig(*a, **k):
            calls.append(item[2])
            yield item
    g.run = spy
    res = g.generate(_long_prompt()[:prompt_chars], max_new_tokens=n_new, stop=False)
    return g, res, calls[-1]


def test_streaming_llm_keeps_sinks_and_recent(llama):
    _, res, call = _run_with(llama, "streaming_llm")
    last = res.stats["prompt_tokens"] + len(res.tokens) - 2  # position of the last token fed
    for c in call.caches:
        assert list(c.pos[0, :4]) == [0, 1, 2, 3]
        assert c.pos[0, c.n - 1] == last
        assert np.all(np.diff(c.pos[0, 4:c.n]) == 1)  # a contiguous recent window


def test_h2o_keeps_recent_window_and_evicts_per_head(llama):
    _, res, call = _run_with(llama, "h2o")
    c = call.caches[1]
    assert c.n <= call.capacity
    assert not np.array_equal(c.pos[0, :c.n], c.pos[1, :c.n])  # heads keep different heavy hitters
    assert np.all(np.diff(c.pos[:, :c.n], axis=1) > 0)         # slots stay in position order


def test_mpcache_group_minmax_equal_brute_force_and_shared_indices(llama):
    pol = mpcache(share=2, min_tokens_to_select=64)
    g, res, call = _run_with(llama, pol)
    dyn = pol.parts[1]
    assert isinstance(dyn, MPCacheDynamic) and isinstance(pol.parts[0], MPCacheStatic)
    for L in (0, 2):
        c, st = call.caches[L], dyn.stats[L]
        k = c.k[0, :, :c.n]
        for g16 in range(-(-c.n // 16)):
            blk = k[:, g16 * 16:(g16 + 1) * 16]
            np.testing.assert_array_equal(st["max16"][:, g16], blk.max(axis=1))
            np.testing.assert_array_equal(st["min16"][:, g16], blk.min(axis=1))
        for g32 in range(-(-c.n // 32)):
            blk = k[:, g32 * 32:(g32 + 1) * 32]
            np.testing.assert_array_equal(st["max32"][:, g32], blk.max(axis=1))
            np.testing.assert_array_equal(st["min32"][:, g32], blk.min(axis=1))
    # cross-layer sharing: layers 0/1 and 2/3 hold identical token sets and read one selection
    for a, b in ((0, 1), (2, 3)):
        np.testing.assert_array_equal(call.caches[a].pos, call.caches[b].pos)
    assert set(dyn.last) == {0, 2}
    # the selection always reads the first and the most recent group, and reads less than the cache
    sel = dyn.last[0]
    n = call.caches[0].n
    assert np.all((sel == 0).any(axis=1)) and np.all((sel == n - 1).any(axis=1))
    assert sel.shape[1] < n
    assert res.stats["cost_per_decode_step"]["exp_div"] == 0  # linear scoring: no exponentials
    assert res.stats["cost_per_decode_step"]["multiplications"] > 0


def test_mpcache_selection_scores_match_definition():
    """Σ q·(α·kmax + (1−α)·kmin) picks the best 32-groups (brute force on a synthetic cache)."""
    from edge_sel.runtime.kvcache import LayerCache
    from edge_sel.runtime.policies import Context

    rng = np.random.default_rng(0)
    dyn = MPCacheDynamic(min_tokens_to_select=0, share=1, keep_groups=0.25, keep_sub=1.0)
    dyn.begin(Context(1, 2, 4, 8, 512, 500, 10))
    c = LayerCache(2, 512, 8)
    k = rng.standard_normal((1, 2, 512, 8)).astype(np.float32)
    s = c.append(k, k, np.arange(512))
    dyn.appended(0, c, s)
    q = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
    slots = dyn.select(0, q, c)
    qs = q[0, :, 0].reshape(2, 2, 8).sum(1)
    for h in range(2):
        grp = k[0, h].reshape(16, 32, 8)
        score = qs[h] @ (0.6 * grp.max(1) + 0.4 * grp.min(1)).T
        score[0] = score[-1] = np.inf
        best = set(np.argsort(-score)[:4])
        assert set(np.unique(slots[h] // 32)) == best


def test_mpcache_dynamic_keeps_no_statistics_when_the_cache_can_never_select():
    """A capacity below ``min_tokens_to_select`` reads the whole cache every step, so the group statistics
    would be pure cost: none are kept and no work is counted; at or above it they are."""
    from edge_sel.runtime.kvcache import LayerCache
    from edge_sel.runtime.policies import Context

    rng = np.random.default_rng(1)
    k = rng.standard_normal((1, 2, 64, 8)).astype(np.float32)
    for cap, active in ((64, False), (128, True)):
        dyn = MPCacheDynamic(min_tokens_to_select=128)
        dyn.begin(Context(1, 2, 4, 8, cap, 64, 4))
        c = LayerCache(2, cap, 8)
        dyn.appended(0, c, c.append(k, k, np.arange(64)))
        assert dyn.active is active and bool(dyn.stats) is active
        assert (sum(dyn.cost.values()) > 0) is active
        assert dyn.select(0, rng.standard_normal((1, 4, 1, 8)).astype(np.float32), c) is None  # 64 < 128 cached


def test_windowkv_keeps_whole_windows_shared_in_layer_groups(llama):
    _, _, call = _run_with(llama, "windowkv")
    for L in (1, 2, 3):
        np.testing.assert_array_equal(call.caches[0].pos, call.caches[L].pos)  # share=4: one group
    assert call.capacity % 8 == 0


def test_prompt_distill_drops_prompt_tokens_for_later_layers(tmp_path_factory):
    bundle, _ = _bundle(tmp_path_factory, "llama", layers=6)
    g = Generator(bundle, policy="prompt_distill")
    calls = []
    orig = g.run

    def spy(*a, **k):
        for item in orig(*a, **k):
            calls.append(item[2])
            yield item
    g.run = spy
    res = g.generate(_long_prompt()[:2000], max_new_tokens=4, stop=False)
    kept = [c.n for c in calls[-1].caches]
    at = calls[-1].policy.at
    assert kept[at + 1] < kept[at] and kept[at + 1] >= 36
    assert len(res.tokens) == 4


def test_layer_skip_skips_layers_at_decode(tmp_path_factory):
    bundle, _ = _bundle(tmp_path_factory, "llama", layers=6)
    pol = LayerSkip(fraction=0.34, protect=1)
    g = Generator(bundle, policy=pol)
    res = g.generate(PROMPTS[2], max_new_tokens=10, stop=False)
    skipped = res.stats["skipped_layers"]
    assert len(skipped) == 2 and all(1 <= s <= 4 for s in skipped)
    n = res.stats["prompt_tokens"]
    for L, kept in enumerate(res.stats["kv_tokens_kept"]):
        assert kept == (n if L in skipped else n + 9)


def test_policies_are_deterministic(llama):
    for p in ("mpcache", "snapkv", "h2o", "windowkv"):
        a = Generator(llama, kv_budget=200, policy=p).generate(_long_prompt()[:3000], max_new_tokens=16, stop=False)
        b = Generator(llama, kv_budget=200, policy=p).generate(_long_prompt()[:3000], max_new_tokens=16, stop=False)
        assert a.tokens == b.tokens and a.stats["cost_per_decode_step"] == b.stats["cost_per_decode_step"]


def test_policies_with_room_for_everything_equal_full(llama, gen_full):
    ref = gen_full.generate(PROMPTS[0], max_new_tokens=16, stop=False).tokens
    for p in ("streaming_llm", "h2o", "snapkv", "mpcache_static", "windowkv"):
        assert Generator(llama, policy=p).generate(PROMPTS[0], max_new_tokens=16, stop=False).tokens == ref


def test_score_is_teacher_forced_nll(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    bundle, hf = _bundle(tmp_path_factory)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    g = Generator(bundle)
    ids = g.encode(_long_prompt()[:600])
    P = len(ids) - 20
    with torch.no_grad():
        lg = model(input_ids=torch.as_tensor(ids)[None]).logits[0].double()
    ref = float((torch.logsumexp(lg[P - 1:-1], -1) - lg[P - 1:-1].gather(1, torch.as_tensor(ids[P:])[:, None])[:, 0]).mean())
    assert abs(g.score(ids[:P], ids[P:])["nll"] - ref) < 1e-4
    compressed = Generator(bundle, kv_budget=64, policy="streaming_llm").score(ids[:P], ids[P:])
    assert compressed["n"] == 20 and np.isfinite(compressed["ppl"])


@pytest.mark.parametrize("policy", ["mpcache", "snapkv"])
def test_rolling_prefill_never_holds_more_than_the_budget(llama, policy):
    """prefill="rolling": no one-layer scratch either — every byte of KV lives in the budgeted buffers."""
    g = Generator(llama, kv_budget="1MB", policy=policy, prefill="rolling")
    res = g.generate(_long_prompt(), max_new_tokens=8, stop=False)
    st = res.stats
    assert st["prefill_mode"] == "rolling" and st["prefill_scratch_bytes"] == 0
    assert st["kv_bytes_peak"] <= st["kv_bytes_allocated"] <= 1_000_000
    layer = Generator(llama, kv_budget="1MB", policy=policy).generate(_long_prompt(), max_new_tokens=8, stop=False).stats
    assert layer["prefill_mode"] == "layer" and layer["kv_bytes_peak"] <= 1_000_000
    assert layer["kv_capacity_tokens"] < st["kv_capacity_tokens"]  # the scratch is paid from the same budget


@pytest.mark.parametrize("reduce,per_head", [("max", False), ("max", True), ("sum", False), ("sum", True)])
def test_mpcache_static_keeps_sinks_recent_and_the_best_scored(reduce, per_head):
    """MPCacheStatic.keep = the first ``sinks`` + the last ``max(recent, recent_frac * target)`` + the best others by
    the window's attention: maxed (the paper's "any query above a threshold") or summed (accumulated), over the
    layer's heads or per KV head (brute force on a synthetic cache)."""
    from edge_sel.runtime.kvcache import LayerCache
    from edge_sel.runtime.policies import Context

    rng = np.random.default_rng(1)
    kv, n, target = 3, 400, 100
    st = MPCacheStatic(reduce=reduce, per_head=per_head, sinks=4, recent=32, recent_frac=0.5, pool=1, share=1)
    st.begin(Context(1, kv, 2 * kv, 8, 512, n, 1))
    c = LayerCache(kv, 512, 8)
    k = rng.standard_normal((1, kv, n, 8)).astype(np.float32)
    c.append(k, k, np.arange(n))
    chunks = [rng.random((1, kv, n)).astype(np.float32) ** 8 for _ in range(3)]  # three window chunks
    for a in chunks:
        st.observe(0, c, a, a, None, "window")
    idx = st.keep(0, c, target, "final")
    acc = np.sum(chunks, axis=0)[0] if reduce == "sum" else np.max(chunks, axis=0)[0]  # [kv, n]
    rows = acc if per_head else (acc.sum(0) if reduce == "sum" else acc.max(0))[None]
    assert idx.ndim == (2 if per_head else 1)
    for h, row in enumerate(rows):
        got = idx[h] if per_head else idx
        rest = np.argsort(-row[4:n - 50])[:target - 54] + 4
        assert set(got.tolist()) == set(range(4)) | set(range(n - 50, n)) | set(rest.tolist())
    if per_head:
        assert len({tuple(r) for r in idx.tolist()}) > 1  # the heads keep different tokens


def _first_call_state(g, prompt, n_new):
    """The call's state at the first yield (right after prefill, before any decode step) and the result."""
    states = []
    orig = g.run

    def spy(*a, **k):
        for item in orig(*a, **k):
            if not states:
                states.append([(c.n, c.pos[:, :c.n].copy(), c.k[0, :, :c.n].copy()) for c in item[2].caches])
            yield item
    g.run = spy
    return g.generate(prompt, max_new_tokens=n_new, stop=False), states[0]


def test_knorm_keeps_exactly_the_lowest_norm_keys_and_generates(llama):
    """Knorm (Devoto et al. 2024) at a 25% budget: after prefill every layer's cache holds, per KV head, exactly
    the prompt tokens whose keys have the smallest L2 norm (brute force over the uncompressed run's keys), and
    decoding goes on over it (evicting by the same rule)."""
    prompt = _long_prompt()[:3000]
    _, full = _first_call_state(Generator(llama), prompt, 1)
    res, knorm = _first_call_state(Generator(llama, kv_budget=0.25, policy="knorm"), prompt, 60)
    assert len(res.tokens) == 60 and res.stats["policy"] == "knorm" and res.stats["evictions"] > 4
    n_prompt = res.stats["prompt_tokens"]
    for (n_all, pos_all, k_all), (n, pos, _) in zip(full, knorm):
        assert n_all == n_prompt and n <= res.stats["kv_capacity_tokens"] < n_prompt
        norms = np.linalg.norm(k_all.astype(np.float64), axis=-1)                  # [kv, prompt]
        for h in range(norms.shape[0]):
            kept = np.isin(pos_all[h], pos[h])
            assert kept.sum() == n  # the kept tokens are prompt tokens, all distinct
            # every kept key is at most as long as every evicted one (float32 ties aside)
            assert norms[h, kept].max() <= norms[h, ~kept].min() * (1 + 1e-6)
            lowest = pos_all[h, np.argsort(norms[h], kind="stable")[:n]]
            assert len(set(pos[h].tolist()) ^ set(lowest.tolist())) <= 2  # the same set but for a tie at the edge
        assert len({tuple(sorted(p.tolist())) for p in pos}) > 1  # per KV head: the heads keep different tokens


def test_prefill_chunks_bound_the_score_tensor():
    """A prefill chunk's [heads, chunk, keys] f32 scores stay under PREFILL_SCORES_BYTES (down to 32-token chunks)."""
    from edge_sel.runtime.generate.prefill import PREFILL_SCORES_BYTES, chunk_size

    for keys in (16, 300, 1024, 2048, 4096, 16384):
        c = chunk_size(256, 9, keys)
        assert c <= 256 and c % 32 == 0 and c >= 32
        assert 4 * 9 * c * keys <= PREFILL_SCORES_BYTES or c == 32
    assert chunk_size(256, 9, 16) == 256


@pytest.mark.parametrize("name", ["mpcache", "mpcache_ea", "mpcache_ea_layers", "mpcache_ea_mix", "mpcache_ea_alloc",
                                  "mpcache_ea_survey_recall"])
def test_static_plus_dynamic_policies_refuse_an_unknown_option(name):
    REGISTRY[name](min_tokens_to_select=8)  # a dynamic-selection option is accepted
    with pytest.raises(ValueError, match="no option 'recnet_frac'"):
        REGISTRY[name](recnet_frac=0.5)


def test_the_scratch_is_paid_for_when_the_alignment_forces_an_eviction(llama):
    """A byte budget just above the whole call rounds down to the policy's alignment, below it: the prompt is then
    evicted through the look-once scratch, which the budget must pay for too."""
    from edge_sel.runtime.planning import KVPlanner

    g = Generator(llama)
    pol = make_policy("mpcache")  # align 32
    n, new = 500, 4
    probe = KVPlanner(g.n_layers, g.kv_heads, g.head_dim, g.context, "1MB", heads=g.heads)
    per_tok, fixed = probe.bytes_per_token(pol), probe.fixed_bytes(pol, n + new)
    for cap in range(n + new, n + new + 8):
        budget = cap * per_tok + fixed
        planner = KVPlanner(g.n_layers, g.kv_heads, g.head_dim, g.context, f"{budget}B", heads=g.heads)
        plan = planner.plan(pol, n, new)
        assert plan.resident < n + new and plan.scratch
        assert plan.resident * per_tok + fixed + planner.scratch_bytes(plan.scratch_tokens) <= budget, cap


@pytest.mark.parametrize("policy", ["mpcache_ea", "mpcache"])
def test_decode_selection_with_a_capacity_no_multiple_of_16(llama, policy):
    """A protected suffix makes each layer's capacity exact (no alignment); when the cache fills up, MPCache's last
    16-group runs past the capacity: those entries are no slot (masked), not an index out of range."""
    g = Generator(llama, kv_budget=0.5, policy=policy)
    ids = g.encode(_long_prompt())[:1300]
    res = g.generate(ids, max_new_tokens=8, protect_suffix=20, stop=False)
    st = res.stats
    assert len(res.tokens) == 8 and st["kv_capacity_tokens"] % 16 != 0 and st["kv_capacity_tokens"] >= 512
    assert max(st["kv_tokens_kept"]) > st["kv_capacity_tokens"] // 16 * 16  # filled into the last, partial group
