"""The one-row MatMulNBits forms (edge_sel.export.nbits_forms) on a GGUF Q4_1 matrix kept as it is: the symmetric
form computes the same product from the same stored blocks, and the float-activation product as two int8 rows stays
as close to the float product as the float kernel (far closer than int8 activations alone)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")


def _q4_1_model(tmp_path, level: int):
    """``y = x @ w`` for a Q4_1 weight from a synthetic GGUF, kept as MatMulNBits (zero points 0 + minimum term)."""
    from onnx import TensorProto, helper, numpy_helper

    from edge_sel.export.gguf_blocks import RowIndex, keep_blocks

    rng = np.random.default_rng(7)
    K, N = 256, 48
    w_rows = (rng.standard_normal((N, K)) * 0.3 + 0.05).astype(np.float32)
    path = tmp_path / "w.gguf"
    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(w_rows, gguf.GGMLQuantizationType.Q4_1),
                  raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    t = gguf.GGUFReader(str(path)).tensors[0]
    w = np.ascontiguousarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(N, K).T)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="down")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    assert keep_blocks(m, RowIndex.build(path), 4, level).count == 1
    return m, w


def _run(model, x):
    import onnxruntime as ort

    from edge_sel.runtime.sessions import session_options

    so = session_options(1, prepack=True)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _x(rows: int, K: int = 256):
    x = np.random.default_rng(8).standard_normal((1, rows, K)).astype(np.float32)
    x[..., 5] *= 40.0  # an outlier feature, as the MLP's gated activation carries
    return x


@pytest.mark.parametrize("level", [0, 4])
def test_symmetric_form_is_the_same_product(tmp_path, level):
    from edge_sel.export.nbits_forms import symmetric_offsets

    m, w = _q4_1_model(tmp_path, level)
    old = copy.deepcopy(m)
    assert symmetric_offsets(m) == 1
    nb = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nb) == 1 and len(nb[0].input) == 3  # no zero points: the kernel's default 8
    assert symmetric_offsets(m) == 0  # already in the form
    stored = {t.name for t in m.graph.initializer}
    assert stored >= {t.name for t in old.graph.initializer if not t.name.endswith("_zp")}  # the same blocks on disk
    x = _x(3)
    want = x.astype(np.float64) @ w.astype(np.float64)
    tol = np.abs(want).max()
    if level == 0:
        np.testing.assert_allclose(_run(m, x), _run(old, x), rtol=0, atol=1e-5 * tol)
        np.testing.assert_allclose(_run(m, x), want, rtol=0, atol=1e-5 * tol)
    else:  # int8 activations: the symmetric kernel is at least as close to the float product as the zero-point one
        assert np.abs(_run(m, x) - want).max() <= 1.5 * np.abs(_run(old, x) - want).max()


def test_float_activation_product_as_two_int8_rows(tmp_path):
    from edge_sel.export.nbits_forms import split_float_activations, symmetric_offsets, with_float_activations

    m, w = _q4_1_model(tmp_path, 0)
    int8 = copy.deepcopy(m)
    for n in int8.graph.node:
        for a in n.attribute:
            if a.name == "accuracy_level":
                a.i = 4
    assert split_float_activations(copy.deepcopy(m)) == 0  # zero points: the kernel's two-row path is slow there
    assert symmetric_offsets(m) + split_float_activations(m) == 2
    nb = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert [a.i for a in nb[0].attribute if a.name == "accuracy_level"] == [4]
    for rows in (1, 5):
        x = _x(rows)
        want = x.astype(np.float64) @ w.astype(np.float64)
        err_split = np.abs(_run(m, x) - want).max()
        err_int8 = np.abs(_run(int8, x) - want).max()
        assert err_split < err_int8 / 20, (rows, err_split, err_int8)
        assert err_split < 1e-4 * np.abs(want).max()
        # at float activations the rewrite is exact: x_q + r = x
        np.testing.assert_allclose(_run(with_float_activations(m), x), want, rtol=0, atol=1e-5 * np.abs(want).max())
    zero = np.zeros((1, 2, 256), np.float32)  # an all-zero block: no division by zero
    assert np.array_equal(_run(m, zero), np.zeros((1, 2, 48), np.float32))


def test_two_rows_joined_back_into_the_float_product(tmp_path):
    """decode_forms keeps a float-activation product as one float row (faster than two int8 rows on AVX-512 VNNI, and
    exact); an older graph's two rows are joined back into exactly that product, its helper nodes and constants gone."""
    from edge_sel.export.nbits_forms import decode_forms, join_float_activations, split_float_activations, symmetric_offsets

    m, w = _q4_1_model(tmp_path, 0)
    fresh = copy.deepcopy(m)
    assert decode_forms(fresh) == 1  # the symmetric form only
    nb = [n for n in fresh.graph.node if n.op_type == "MatMulNBits"]
    assert [a.i for a in nb[0].attribute if a.name == "accuracy_level"] == [0]
    old = copy.deepcopy(m)
    assert symmetric_offsets(old) + split_float_activations(old) == 2  # the two-row form of earlier bundles
    assert decode_forms(old) == 1 and join_float_activations(old) == 0  # joined once, then current
    assert sorted(n.op_type for n in old.graph.node) == sorted(n.op_type for n in fresh.graph.node)
    assert {t.name for t in old.graph.initializer} == {t.name for t in fresh.graph.initializer}
    for rows in (1, 5):
        x = _x(rows)
        want = x.astype(np.float64) @ w.astype(np.float64)
        np.testing.assert_array_equal(_run(old, x), _run(fresh, x))
        np.testing.assert_allclose(_run(old, x), want, rtol=0, atol=1e-5 * np.abs(want).max())
