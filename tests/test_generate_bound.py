"""The decode step over IO bindings (``BoundDecoder``) against the step with feeds (``decode_step``) on a tiny
random-weight Llama generate bundle: the same tokens and logits under every kind of policy (cache read in place,
per-step gathered selections, decode-time observation, evictions during decode, recall's fetch area, skipped layers),
and the engine really takes the bound path."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sel.runtime.generate import Generator
from edge_sel.runtime.generate import api as gen_api
from edge_sel.runtime.policies import LayerSkip

from gen_tiny import long_text, make_gen_decoder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edge_sel.export import export

    root = tmp_path_factory.mktemp("gen_bound")
    return export(make_gen_decoder(root / "hf", kind="llama", layers=5), root / "bundle", task="generate")


def _run(bundle, policy, budget, prompt, bound: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not bound:
            m.setattr(gen_api, "bindable", lambda model: False)
        g = Generator(bundle, kv_budget=budget, policy=policy)
        res = g.generate(prompt, max_new_tokens=40, stop=False, return_logits=True)
        g.close()
    return res


@pytest.mark.parametrize("policy,budget", [("full", None), ("h2o", 300), ("mpcache", 300), ("mpcache_recall", 300),
                                           ("snapkv", 300), ("windowkv", 300), ("streaming_llm", 300), ("layer_skip", None)])
def test_bound_step_is_the_feeds_step(bundle, policy, budget, monkeypatch):
    prompt = long_text(3000) if budget else "Sort a list in place, stable, with an optional key function."
    if policy == "layer_skip":
        policy = LayerSkip(fraction=0.4, protect=1)
    calls = []
    real = gen_api.BoundDecoder.step

    def counted(self, tok, pos):
        calls.append(pos)
        return real(self, tok, pos)

    monkeypatch.setattr(gen_api.BoundDecoder, "step", counted)
    a = _run(bundle, policy, budget, prompt, True, monkeypatch)
    assert len(calls) == 39  # every decode step took the bound path
    b = _run(bundle, policy, budget, prompt, False, monkeypatch)
    assert len(calls) == 39
    assert a.tokens == b.tokens
    np.testing.assert_allclose(np.stack(a.logits), np.stack(b.logits), rtol=0, atol=1e-5)
    if budget:
        assert a.stats["evictions"] == b.stats["evictions"] > 0


@pytest.mark.parametrize("policy", ["h2o", "mpcache"])
def test_bound_step_observes_the_same_attention(bundle, policy, monkeypatch):
    """Decode-time observers (H2O's sums, MPCache's maxima) see the same statistics from the bound buffers."""
    from edge_sel.runtime.policies.base import Policy

    seen: list = []
    real = Policy.observe

    def recorded(self, layer, cache, attn_sum, attn_max, slots, phase):
        if phase == "decode":
            seen.append((layer, attn_sum.copy(), attn_max.copy()))
        return real(self, layer, cache, attn_sum, attn_max, slots, phase)

    monkeypatch.setattr(Policy, "observe", recorded)
    _run(bundle, policy, 300, long_text(3000), True, monkeypatch)
    a, seen[:] = list(seen), []
    _run(bundle, policy, 300, long_text(3000), False, monkeypatch)
    assert len(a) == len(seen) > 0
    for (la, sa, ma), (lb, sb, mb) in zip(a, seen):
        assert la == lb and sa.shape == sb.shape and ma.shape == mb.shape
        np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ma, mb, rtol=0, atol=1e-6)
