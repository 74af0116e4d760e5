"""GGUF blocks kept as they are: a small synthetic GGUF written with the ``gguf`` package, repacked into the bundle's
block layout and checked tensor by tensor against ``gguf``'s own dequantization (exact: no requantization)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from edge_sel.export.gguf_blocks import repack, table_blocks  # noqa: E402
from edge_sel.runtime.blocks import BlockTable, decode  # noqa: E402

KINDS = ("Q8_0", "Q4_0", "Q4_1")


def _write(path, tensors):
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (kind, x) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)  # byte shape: the writer derives [rows, cols]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_repacked_blocks_decode_to_gguf_dequantization(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"blk.{i}.{kind}": (kind, (rng.standard_normal((24, 96)) * rng.uniform(0.01, 2)).astype(np.float32))
               for i, kind in enumerate(KINDS)}
    tensors["token_embd.weight"] = ("Q8_0", rng.standard_normal((40, 64)).astype(np.float32))
    _write(tmp_path / "m.gguf", tensors)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    checked = 0
    for t in reader.tensors:
        kind = t.tensor_type.name
        cols, rows = (int(x) for x in t.shape[:2])
        values, scales, mins, bits = repack(np.asarray(t.data), kind, rows, cols)
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(rows, cols)
        np.testing.assert_array_equal(decode(values, scales, mins, bits, 32), ref, err_msg=t.name)
        assert np.abs(ref - tensors[t.name][1]).max() > 0  # the file really is quantized (not a float copy)
        checked += 1
    assert checked == len(tensors)
    # the token embedding as the exporter takes it: gathered rows equal gguf's rows
    values, scales, mins, bits, block, source = table_blocks(tmp_path / "m.gguf")
    assert source == "gguf:Q8_0" and bits == 8 and block == 32
    table = BlockTable(values, scales, mins, bits, block, (40, 64))
    ref = gguf.quants.dequantize(np.asarray(reader.tensors[-1].data), reader.tensors[-1].tensor_type).reshape(40, 64)
    ids = np.array([[5, 0, 39]])
    np.testing.assert_array_equal(table[ids], ref[ids])


def test_block_type_that_does_not_map_is_not_kept(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "llama")
    w.add_tensor("token_embd.weight", x.astype(np.float16))  # F16: no block layout -> converted like float weights
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert table_blocks(tmp_path / "f.gguf") is None


# ---- MatMul weights: the file's blocks as MatMulNBits --------------------------------------------------------------
def _matmul_model(w: np.ndarray):
    """``y = x @ w`` with ``x`` ``[batch, seq, K]`` (a layer graph's rank) and the weight a float32 initializer."""
    from onnx import TensorProto, helper, numpy_helper

    K, N = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def layer_gguf(tmp_path_factory):
    rng = np.random.default_rng(2)
    tensors = {f"blk.0.{kind}": (kind, (rng.standard_normal((40, 96)) * rng.uniform(0.05, 1.5)).astype(np.float32))
               for kind in KINDS}
    tensors["blk.0.q5"] = ("Q5_0", rng.standard_normal((16, 64)).astype(np.float32))  # a type with no such layout
    path = tmp_path_factory.mktemp("gguf") / "layers.gguf"
    _write(path, tensors)
    reader = gguf.GGUFReader(str(path))
    deq = {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
           for t in reader.tensors}
    return path, deq


@pytest.mark.parametrize("kind", KINDS)
def test_matmul_weight_keeps_the_files_blocks(layer_gguf, kind):
    from edge_sel.export.gguf_blocks import RowIndex, keep_blocks

    path, deq = layer_gguf
    index = RowIndex.build(path)
    assert index.skipped == {"blk.0.q5": "Q5_0"}
    ref = deq[f"blk.0.{kind}"]                                      # [N, K], rows = output features
    perm = np.random.default_rng(3).permutation(ref.shape[0])       # an exporter's row order (llama's q/k rotary layout)
    w = np.ascontiguousarray(ref[perm].T)                           # the float graph's [K, N] weight
    bits = 8 if kind == "Q8_0" else 4
    found = index.find(w, bits)
    assert found is not None and found.kind == kind
    np.testing.assert_array_equal(found.dequantize(), w)            # tensor by tensor: exactly gguf's dequantization
    assert index.find(w, 12 - bits) is None                         # another width: not these blocks
    model = _matmul_model(w)
    kept = keep_blocks(model, index, bits, accuracy_level=0)
    assert (kept.count, kept.kinds, kept.max_abs_diff) == (1, {kind}, 0.0)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulNBits" in ops and ("MatMul" in ops) == (kind == "Q4_1")  # Q4_1: the block-minimum term
    x = np.random.default_rng(4).standard_normal((2, 3, w.shape[0])).astype(np.float32)
    y = _run(model, x)
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_weight_not_in_the_file_is_left_for_the_quantizer(layer_gguf):
    from edge_sel.export.gguf_blocks import RowIndex, keep_blocks

    path, deq = layer_gguf
    index = RowIndex.build(path)
    w = np.ascontiguousarray(deq["blk.0.Q4_1"].T) + np.float32(1e-3)  # near, but not the file's values
    model = _matmul_model(w)
    assert keep_blocks(model, index, 4, 0).count == 0
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    q5 = np.ascontiguousarray(deq["blk.0.q5"].T)                      # Q5_0: no MatMulNBits layout -> not found
    assert index.find(q5, 4) is None and index.find(q5, 8) is None


def test_tied_head_reads_the_tables_files(tmp_path):
    """An LM head tied to a Q8_0 token embedding: the head graph's MatMulNBits reads the table's uint8 codes and float32
    scales (external data), and both decode to gguf's dequantization."""
    import onnx

    from edge_sel.export.gguf_blocks import RowIndex, tie_head, unsigned_table

    rng = np.random.default_rng(5)
    _write(tmp_path / "m.gguf", {"token_embd.weight": ("Q8_0", rng.standard_normal((50, 64)).astype(np.float32))})
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    table = gguf.quants.dequantize(np.asarray(reader.tensors[0].data), reader.tensors[0].tensor_type).reshape(50, 64)
    codes, scales, mins, bits, block, _ = unsigned_table(table_blocks(tmp_path / "m.gguf"))
    assert codes.dtype == np.uint8 and scales.dtype == np.float32
    np.testing.assert_array_equal(BlockTable(codes, scales, mins, bits, block, (50, 64))[np.arange(50)], table)
    (tmp_path / "b" / "embed").mkdir(parents=True)
    codes.tofile(tmp_path / "b" / "embed" / "codes.bin")
    scales.tofile(tmp_path / "b" / "embed" / "scales.bin")
    onnx.save(_matmul_model(np.ascontiguousarray(table.T)), str(tmp_path / "src.onnx"))
    head = tmp_path / "b" / "head.onnx"
    index = RowIndex.build(tmp_path / "m.gguf")
    diff = tie_head(tmp_path / "src.onnx", None, head, tmp_path / "b" / "embed" / "codes.bin",
                    tmp_path / "b" / "embed" / "scales.bin", codes, scales, index, accuracy_level=0)
    assert diff == 0.0
    assert head.stat().st_size < 4096  # no weights of its own
    import onnxruntime as ort

    x = rng.standard_normal((1, 2, 64)).astype(np.float32)
    y = ort.InferenceSession(str(head), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x.astype(np.float64) @ table.T.astype(np.float64)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # another table (not the head's rows): not tied, nothing written
    assert tie_head(tmp_path / "src.onnx", None, tmp_path / "b" / "other.onnx", tmp_path / "b" / "embed" / "codes.bin",
                    tmp_path / "b" / "embed" / "scales.bin", codes[::-1].copy(), scales[::-1].copy(), index, 0) is None
    assert not (tmp_path / "b" / "other.onnx").exists()


def test_block_type_that_cannot_be_kept_is_named_in_a_warning(layer_gguf, capsys):
    from edge_sel.export.gguf_blocks import RowIndex, warn

    warn(RowIndex.build(layer_gguf[0]).warning())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: 1 tensors of layers.gguf are Q5_0") and "requantized" in err[0]
