"""benchmarks/act_int8_probe.py: per-token int8 activations rewrite real exported graphs and rank close to float."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from benchmarks.act_int8_probe import main as probe
from edge_sel import Bundle
from edge_sel.runtime import Reranker


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.parametrize("keep_float", [None, "down_proj"])
def test_probe_bundle_multiplies_in_integers(llama_bundle, tmp_path, docs, keep_float):
    out = tmp_path / "act8"
    assert probe([str(llama_bundle), str(out)] + (["--keep-float", keep_float] if keep_float else [])) == 0
    src, q = Bundle.open(llama_bundle), Bundle.open(out, verify=True)
    assert "act_int8_probe" in q.spec.quantization.method
    for i in range(len(q.layers)):
        ops = _ops(q.layer_path(i))
        # o_proj, gate, up, down in the layer graph; down stays float when kept
        assert ops.count("MatMulInteger") == (3 if keep_float else 4), ops
        assert ("MatMul" in ops) == bool(keep_float)
    texts, queries = docs
    a = Reranker(src, pruning="off").predict(queries[0], texts[:12])
    b = Reranker(q, pruning="off").predict(queries[0], texts[:12])
    assert not np.array_equal(a, b)
    assert np.corrcoef(a, b)[0, 1] > 0.9  # per-token int8 noise is small against random tiny weights' score spread


def test_dynamic_quantize_keeps_onnxruntime_advice_quiet(bert_bi_bundle, tmp_path, caplog):
    from edge_sel.export.passes.quantize import quantize_bundle

    with caplog.at_level(logging.WARNING):
        quantize_bundle(bert_bi_bundle, tmp_path / "q", measure=False)
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert logging.root.manager.disable == logging.NOTSET  # logging is left as it was
