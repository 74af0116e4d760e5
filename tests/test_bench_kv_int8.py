"""The int8 KV attention core measured by benchmarks/kv_int8_ab.py, on a tiny exported generate bundle run by
onnxruntime: fed a cache stored as int8 per token it computes what its float-input form computes from the float cache
(so the perplexity measured with that form is the stored cache's), and both stay near the float core."""

from __future__ import annotations

import numpy as np
import onnx

from benchmarks.kv_int8_ab import int8_kv_core, quantize_tokens
from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.sessions import load_session


def _feeds(kv: int, heads: int, D: int, H: int, S: int, T: int):
    r = np.random.default_rng(1)
    k, v = (r.standard_normal((kv, S, D)).astype(np.float32) for _ in range(2))
    key_pos = np.broadcast_to(np.arange(S, dtype=np.int64), (1, kv, S)).copy()
    key_pos[0, :, -3:] = 1 << 40  # empty slots: masked
    base = {"hidden": r.standard_normal((1, T, H)).astype(np.float32), "q": r.standard_normal((1, heads, T, D)).astype(np.float32),
            "key_pos": key_pos, "position_ids": np.arange(S - T - 3, S - 3, dtype=np.int64)[None]}
    return base, k, v


def test_int8_core_reads_the_stored_cache_as_its_float_input_form_quantizes_it(gen_llama_bundle, tmp_path):
    b = Bundle.open(gen_llama_bundle)
    d = b.spec.dims
    src = b.layer_path(1)
    paths = {}
    for name, float_inputs in (("stored", False), ("in_graph", True)):
        m = onnx.load(str(src), load_external_data=False)
        assert int8_kv_core(m, d.heads, d.kv_heads, d.head_dim, float_inputs=float_inputs)
        assert not int8_kv_core(m, d.heads, d.kv_heads, d.head_dim)  # already this core
        paths[name] = src.with_name(f".test_{name}.onnx")
        onnx.save_model(m, str(paths[name]))
    try:
        sess = {k: load_session(p) for k, p in paths.items()}
        ref = load_session(src)
        for T in (1, 5):  # a decode step and a prefill chunk
            base, k, v = _feeds(d.kv_heads, d.heads, d.head_dim, d.hidden, 40, T)
            (k8, ks), (v8, vs) = quantize_tokens(k), quantize_tokens(v)
            assert np.abs((k8.astype(np.float32) - 128) * ks[..., None] - k).max() <= np.abs(k).max() / 254 + 1e-6
            stored = sess["stored"].run(None, {**base, "k_cache": np.ascontiguousarray(k8.transpose(0, 2, 1))[None],
                                               "k_scale": ks[None], "v_cache": v8[None], "v_scale": vs[None]})
            in_graph = sess["in_graph"].run(None, {**base, "k_cache": k[None], "v_cache": v[None]})
            exact = ref.run(None, {**base, "k_cache": k[None], "v_cache": v[None]})
            for a, c, e in zip(stored, in_graph, exact):
                assert np.allclose(a, c, rtol=1e-5, atol=1e-5)
                assert np.linalg.norm(a - e) <= 0.05 * np.linalg.norm(e)  # 8-bit queries and weights: within 5 %
            assert np.allclose(stored[1].sum(-1), d.heads // d.kv_heads * T, rtol=1e-4)  # attention sums: a softmax per row
    finally:
        for p in paths.values():
            p.unlink(missing_ok=True)
