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


POLICIES = ["full", "mpcache", "snapkv", "streaming_llm", "mpcache_recall", "knorm", "mpcache_ea"]


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
