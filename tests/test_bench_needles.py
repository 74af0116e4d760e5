"""The held-out needle / decode benchmark (``python -m benchmarks.needles_heldout``): its cases differ from the tuning
needles in wording, keys, depths and haystack, and its lockstep generation equals ``Generator.generate`` per
configuration (a tiny random-weight Llama generate bundle)."""

from __future__ import annotations

from benchmarks import generate as tuning
from benchmarks import needles_heldout as nh
from benchmarks.ppl_lockstep import generate_lockstep
from edge_sel.runtime.generate import Generator

from gen_tiny import long_text


def _char_codec():
    encode = lambda t, bos: ([0] if bos else []) + [ord(c) for c in t]  # noqa: E731
    decode = lambda ids: "".join(chr(i) for i in ids if i)  # noqa: E731
    return encode, decode


def test_cases_are_held_out_from_the_tuning_needles_and_hide_the_needle_at_its_depth():
    encode, decode = _char_codec()
    hay = encode(long_text(20000), False)
    cs = nh.cases(encode, decode, hay, [600, 900], 8)
    assert len(cs) == 16 and {c["length"] for c in cs} == {600, 900}
    assert not set(nh.KEYS) & set(tuning.WORDS) and not set(nh.DEPTHS) & {0.1, 0.5, 0.9}
    assert all("magic number" not in n + q for n, q in nh.TEMPLATES)
    per = [c for c in cs if c["length"] == 600]
    assert {c["template"] for c in per} == set(range(len(nh.TEMPLATES))) and {c["depth"] for c in per} == set(nh.DEPTHS)
    assert len({(c["template"], c["depth"]) for c in per}) == 8  # each template at two depths
    for c in cs:
        ctx = decode(c["context_ids"])
        at = ctx.index(c["number"]) / len(ctx)
        assert abs(at - c["depth"]) < 0.1 and len(c["context_ids"]) + len(c["question_ids"]) <= c["length"] + 1
        assert c["key"] in decode(c["question_ids"])


def test_the_tuning_split_shares_nothing_with_the_held_out_needles():
    encode, decode = _char_codec()
    hay = encode(long_text(20000), False)
    tune = nh.cases(encode, decode, hay, [600], 8, split="tune")
    held = nh.cases(encode, decode, hay, [600], 8)
    assert not set(nh.TUNE_KEYS) & set(nh.KEYS) and not set(nh.TUNE_DEPTHS) & set(nh.DEPTHS)
    assert not {w for t in nh.TUNE_TEMPLATES for w in t} & {w for t in nh.TEMPLATES for w in t}
    assert {c["key"] for c in tune} <= set(nh.TUNE_KEYS) and {c["depth"] for c in tune} == set(nh.TUNE_DEPTHS)
    assert not {c["number"] for c in tune} & {c["number"] for c in held}
    for c in tune:
        assert c["number"] in decode(c["context_ids"]) and c["key"] in decode(c["question_ids"])


POLICIES = ["full", "mpcache_ea", "mpcache_recall", "mpcache_ea_recall", "snapkv"]


def test_generate_lockstep_equals_the_engine_per_configuration(gen_llama_bundle):
    g = Generator(gen_llama_bundle)
    ids = g.encode(long_text(3000))[:560]
    context, question = ids[:540], ids[540:]
    configs = [(p, p, None if p == "full" else 0.1) for p in POLICIES]
    got = generate_lockstep(g, context, question, configs, max_new=6)
    for name, spec, r in configs:
        want = Generator(gen_llama_bundle, policy=spec, kv_budget=r).generate(context + question, max_new_tokens=6,
                                                                               stop=False, protect_suffix=len(question))
        assert got[name]["tokens"] == want.tokens, name
        assert len(got[name]["step_ms"]) == 5 and all(ms > 0 for ms in got[name]["step_ms"])
    assert got["mpcache_ea"]["kept"] < got["full"]["kept"] == len(context)


def test_the_table_says_within_one_miss_only_for_question_aware_policies():
    res = lambda ok, ms: {"ok": ok, "step_ms": [ms]}  # noqa: E731
    doc = {"cases": [{"length": 2048, "results": {"edge_sel full": res(True, 10.0), "edge_sel mpcache_recall @0.05": res(True, 4.0),
                                                  "edge_sel snapkv @0.05": res(False, 3.0)}},
                     {"length": 2048, "results": {"edge_sel full": res(True, 10.0), "edge_sel mpcache_recall @0.05": res(False, 4.0),
                                                  "edge_sel snapkv @0.05": res(False, 3.0)}}]}
    md = nh.markdown(doc)
    assert "`edge_sel mpcache_recall @0.05` 1/2 vs full 2/2: within one miss" in md
    assert "snapkv @0.05 (question-agnostic) | 0/2 | 3.0 (0.30×)" in md and "`edge_sel snapkv" not in md
