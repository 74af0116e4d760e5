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
