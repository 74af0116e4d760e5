"""The perplexity benchmark (``python -m benchmarks.perplexity``): fixed windows and splits, and the lockstep scorer
equal to the engine's own ``Generator.score`` per configuration (a tiny random-weight Llama generate bundle)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import ppl_texts
from benchmarks.ppl_lockstep import score_lockstep
from edge_sel.runtime.generate import Generator

from gen_tiny import long_text


def test_windows_are_fixed_spread_and_split_in_halves():
    tune, held = ppl_texts.windows("tune"), ppl_texts.windows("held")
    assert len(tune) + len(held) == len(ppl_texts.windows("all"))
    assert not {w.name for w in tune} & {w.name for w in held}
    for split in (tune, held):
        books = [w.book for w in split]
        assert books.count("botchan") >= 4 and books.count("alice") >= 2
    starts = [w.start for w in ppl_texts.windows("all") if w.book == "botchan"]
    assert starts == sorted(starts) and all(b - a >= ppl_texts.PREFIX + ppl_texts.CONT for a, b in zip(starts, starts[1:]))
    extra = ppl_texts.windows("extra")
    assert [w.book for w in extra].count("botchan") == 3 and [w.book for w in extra].count("alice") == 2
    for e in extra:  # a robustness check: no token shared with a window either half used
        assert all(abs(e.start - w.start) >= ppl_texts.PREFIX + ppl_texts.CONT for w in ppl_texts.windows("all") if w.book == e.book)


def test_window_ids_cut_the_same_tokens_and_refuse_a_window_past_the_end(monkeypatch):
    text = {"botchan": list(range(70000)), "alice": list(range(40000))}
    monkeypatch.setattr(ppl_texts, "book_text", lambda b: b)
    ids = ppl_texts.window_ids(lambda b: text[b], ppl_texts.windows("all"), bos=-1)
    w = ppl_texts.windows("all")[1]
    got = ids[w.name]
    assert got["prefix"][0] == -1 and len(got["prefix"]) == ppl_texts.PREFIX and len(got["cont"]) == ppl_texts.CONT
    assert got["prefix"][1:] + got["cont"] == list(range(w.start, w.start + ppl_texts.PREFIX - 1 + ppl_texts.CONT))
    with pytest.raises(ValueError, match="past the end"):
        ppl_texts.window_ids(lambda b: list(range(1000)), ppl_texts.windows("held"))


POLICIES = ["full", "mpcache", "snapkv", "streaming_llm", "mpcache_recall", "knorm", "mpcache_ea", "mpcache_ea_recall",
            "mpcache_ea_survey_recall"]


def test_lockstep_equals_the_engine_per_configuration(gen_llama_bundle):
    g = Generator(gen_llama_bundle)
    ids = g.encode(long_text(3000))[:600]
    prefix, cont = ids[:520], ids[520:]
    configs = [(f"{p}@{r}", p, None if p == "full" else r) for p in POLICIES for r in ((0.2,) if p == "full" else (0.2, 0.1))]
    got = score_lockstep(g, prefix, cont, configs)
    for name, spec, r in configs:
        want = Generator(gen_llama_bundle, policy=spec, kv_budget=r).score(prefix, cont, compress_continuation=False)
        np.testing.assert_allclose(got[name]["nll_tokens"], want["nll_tokens"], rtol=2e-4, atol=2e-4, err_msg=name)
    assert got["mpcache@0.1"]["ppl"] != got["full@0.2"]["ppl"]  # the compression changes the continuation's scores


def test_ratios_are_to_each_systems_own_full_cache_and_windows_missing_anywhere_are_left_out():
    import math

    from benchmarks import perplexity as bp

    wins = {"botchan@1": {"book": "botchan", "split": "held"}, "alice@2": {"book": "alice", "split": "held"},
            "botchan@3": {"book": "botchan", "split": "held"}}
    es = {"edge_sel full": {"botchan@1": {"nll": 3.0}, "alice@2": {"nll": 2.0}, "botchan@3": {"nll": 3.0}},
          "edge_sel p @0.2": {"botchan@1": {"nll": 3.02}, "alice@2": {"nll": 2.04}, "botchan@3": {"nll": 3.1}}}
    kp = {"kvpress full": {"botchan@1": {"nll": 3.1}, "alice@2": {"nll": 2.1}},  # botchan@3 not measured by kvpress
          "kvpress X @0.2": {"botchan@1": {"nll": 3.13}, "alice@2": {"nll": 2.13}}}
    doc = {"windows": wins, "edge_sel": es, "kvpress": kp}
    assert bp.measured(doc) == {"botchan@1", "alice@2"}
    s = bp.summarize(doc)
    assert s["edge_sel p @0.2"]["held"] == pytest.approx(math.exp((0.02 + 0.04) / 2))
    assert s["kvpress X @0.2"]["held"] == pytest.approx(math.exp(0.03))
    assert s["edge_sel p @0.2"]["held botchan"] == pytest.approx(math.exp(0.02))
    md = bp.markdown(doc, "held", chosen="p")
    assert "2 `held` windows" in md and "0.2 kept: edge_sel `p` (chosen on the tuning half) 1.030 vs the best press here, X, 1.030: met" in md


def test_policy_options_parse_to_a_fresh_policy_each_time():
    from benchmarks import perplexity as bp

    label, make = bp.parse_policy("mpcache_ea:recent_frac=0.25:value_norm=false")
    a, b = make(), make()
    assert label == "mpcache_ea:recent_frac=0.25:value_norm=false" and a is not b
    assert a.parts[0].recent_frac == 0.25 and a.parts[0].value_norm is False
    assert bp.parse_policy("snapkv") == ("snapkv", "snapkv")
    mix = bp.parse_policy("mpcache_ea_mix:mix_value_norm=false|true:mix_recent=0.125|0.5")[1]().parts[0]
    assert mix.mix_value_norm == (False, True) and mix.mix_recent == (0.125, 0.5)


def test_runs_of_one_system_merge_window_by_window():
    from benchmarks import perplexity as bp

    doc = {}
    bp.merge_runs(doc, {"edge_sel": {"edge_sel p @0.2": {"a@1": {"nll": 1.0}}}, "commit": "x"}, ["kvpress"], "one.json")
    bp.merge_runs(doc, {"edge_sel": {"edge_sel p @0.2": {"b@2": {"nll": 2.0}}}, "commit": "y"}, ["kvpress"], "two.json")
    bp.merge_runs(doc, {"kvpress": {"kvpress full": {"a@1": {"nll": 3.0}}}}, ["kvpress"], "three.json")  # being run now
    assert doc["edge_sel"] == {"edge_sel p @0.2": {"a@1": {"nll": 1.0}, "b@2": {"nll": 2.0}}} and "kvpress" not in doc
    assert [m["commit"] for m in doc["merged"]["edge_sel"]] == ["x", "y"]


def test_press_options_reach_the_worker_as_keyword_arguments():
    from benchmarks import perplexity as bp

    run = bp.press_run("KVzipPress:layerwise=true", 0.1)
    assert run == {"name": "kvpress KVzip:layerwise=true @0.1", "press": "KVzipPress", "press_kw": {"layerwise": True},
                   "compression_ratio": pytest.approx(0.9)}
    assert bp.press_run("SnapKVPress", 0.2)["press_kw"] == {} and bp.press_run("SnapKVPress", 0.2)["name"] == "kvpress SnapKV @0.2"
