"""``benchmarks.attention_ab`` on the tiny generate bundle: the core it cuts from the bundle is the bundle's attention,
and every fused variant it times computes the same attention output (so its timings compare like with like)."""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")

VARIANTS = {"core", "core_fp16_cache", "gqa", "gqa_fp16", "attention24", "attention24_probs", "attention24_fp16"}


def test_every_variant_computes_the_bundles_attention(gen_llama_bundle):
    from benchmarks.attention_ab import measure

    r = measure(str(gen_llama_bundle), slots=80, threads=1, rounds=2)
    assert set(r["us_per_layer"]) == VARIANTS and all(t > 0 for t in r["us_per_layer"].values())
    diff = r["max_abs_diff_vs_core"]
    for name in ("gqa", "attention24", "attention24_probs"):  # float32: the same numbers up to summation order
        assert diff[name] < 1e-5, (name, diff)
    for name in ("core_fp16_cache", "gqa_fp16", "attention24_fp16"):  # the cache rounded to float16
        assert diff[name] < 1e-2, (name, diff)


def test_the_core_is_the_graphs_own(gen_llama_bundle):
    """Fed a layer's real inputs, the cut-out core gives the attention the whole attn graph feeds o_proj."""
    import numpy as np
    import onnxruntime as ort

    from benchmarks.attention_ab import _core_model

    core, dims = _core_model(str(gen_llama_bundle))
    rng = np.random.default_rng(1)
    S, n = 40, 33
    feeds = {"q": rng.standard_normal((1, dims.heads, 1, dims.head_dim), dtype=np.float32),
             "k_cache": rng.standard_normal((1, dims.kv_heads, S, dims.head_dim), dtype=np.float32),
             "v_cache": rng.standard_normal((1, dims.kv_heads, S, dims.head_dim), dtype=np.float32),
             "key_pos": np.where(np.arange(S) < n, np.arange(S), 1 << 40)[None, None].repeat(dims.kv_heads, 1).astype(np.int64),
             "position_ids": np.array([[n - 1]], np.int64)}
    out, asum, amax = ort.InferenceSession(core.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    # the same attention by hand: query head h reads kv head h // G, empty slots masked
    G = dims.heads // dims.kv_heads
    ref = []
    for h in range(dims.heads):
        k, v = feeds["k_cache"][0, h // G, :n], feeds["v_cache"][0, h // G, :n]
        s = feeds["q"][0, h, 0] @ k.T / np.sqrt(dims.head_dim)
        p = np.exp(s - s.max())
        ref.append((p / p.sum()) @ v)
    np.testing.assert_allclose(out.reshape(-1), np.concatenate(ref), atol=1e-5)
