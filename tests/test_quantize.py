"""`edge-sel quantize`: int8 layer weights via onnxruntime's dynamic quantization, on real exported graphs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edge_sel import Bundle
from edge_sel.runtime.errors import InputError
from edge_sel.export.passes.quantize import quantize_bundle
from edge_sel.runtime import Reranker


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("fixture", ["bert_bi_bundle", "llama_bundle"])
def test_quantized_bundle_runs_close_to_float(fixture, request, tmp_path, docs):
    src = Bundle.open(request.getfixturevalue(fixture))
    out = quantize_bundle(src.root, tmp_path / "q", measure=False)
    q = Bundle.open(out, verify=True)
    assert q.spec.quantization.weights == "int8"
    # every layer graph (and a decoder's qkv graph) now multiplies int8 weights, and its weight file shrank
    for i in range(len(q.layers)):
        assert "MatMulInteger" in _ops(q.layer_path(i)), f"layer {i} not quantized"
        assert q.layer_weight_bytes(i) < 0.8 * src.layer_weight_bytes(i)  # tiny layers: graph overhead; MiniLM: 4x
    assert len(q.spec.extra_graphs) == len(src.spec.extra_graphs)
    for g in q.spec.extra_graphs.values():
        assert "MatMulInteger" in _ops(q.path(g.file))
    texts, queries = docs
    a, b = Reranker(src, pruning="off").predict(queries[0], texts[:12]), Reranker(q, pruning="off").predict(queries[0], texts[:12])
    assert not np.array_equal(a, b)  # it did change the arithmetic
    # ... but not the ranking signal (random tiny weights give near-equal scores, so int8 noise shows; MiniLM: see RESULTS)
    assert np.corrcoef(a, b)[0, 1] > 0.7
    # under a budget the smaller layers stream too
    c = Reranker(q, memory_budget=int(2.5 * max(q.layer_weight_bytes(i) for i in range(len(q.layers)))) + (64 << 20),
                 pruning="off").predict(queries[0], texts[:12])
    np.testing.assert_allclose(c, b, atol=1e-5)


def test_quantize_records_measured_agreement(bert_ce_bundle, tmp_path):
    out = quantize_bundle(bert_ce_bundle, tmp_path / "q")
    a = Bundle.open(out).spec.quantization.agreement
    assert a.queries > 0 and 0.0 <= a.top10_overlap <= 1.0 and a.max_abs_score_diff > 0


def test_quantize_bad_input(bert_bi_bundle, tmp_path):
    with pytest.raises(InputError, match="weight type"):
        quantize_bundle(bert_bi_bundle, tmp_path / "x", weight_type="int4")
    with pytest.raises(InputError, match="must differ"):
        quantize_bundle(bert_bi_bundle, bert_bi_bundle)
    out = quantize_bundle(bert_bi_bundle, tmp_path / "q", measure=False)
    with pytest.raises(InputError, match="already quantized"):
        quantize_bundle(out, tmp_path / "qq", measure=False)
    assert not (tmp_path / "qq").exists() and not list(tmp_path.glob(".qq.partial-*"))


def test_quantize_cli(bert_bi_bundle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edge_sel.cli", "quantize", str(bert_bi_bundle), "--out", str(tmp_path / "q"),
                        "--no-measure", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["weights"]["format"] == "int8"  # weight-only (MatMulNBits) by default
    r = subprocess.run([sys.executable, "-m", "edge_sel.cli", "quantize", str(bert_bi_bundle), "--out", str(tmp_path / "d"),
                        "--method", "dynamic", "--no-measure", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quantization"]["weights"] == "int8"
    r = subprocess.run([sys.executable, "-m", "edge_sel.cli", "quantize", str(bert_bi_bundle), "--out", str(tmp_path / "q"),
                        "--no-measure"], capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_quantize_generate_bundle_with_hard_linked_weights(gen_llama_bundle, tmp_path):
    """Bundles share unchanged files by hard links (the bench cache, quantize, drop-layers); onnx refuses external
    data with several links, so quantize must read a private copy -- and the int8 generate bundle must generate."""
    import os
    import shutil

    from edge_sel.runtime.generate import Generator

    linked = tmp_path / "linked"
    shutil.copytree(gen_llama_bundle, linked, copy_function=os.link)
    assert os.stat(Bundle.open(linked).layer_path(0)).st_nlink > 1
    out = quantize_bundle(linked, tmp_path / "q", measure=False)
    q = Bundle.open(out, verify=True)
    assert all("MatMulInteger" in _ops(q.layer_path(i)) for i in range(len(q.layers)))
    a = Generator(gen_llama_bundle, policy="full").generate([1, 5, 9, 14, 3, 7], max_new_tokens=4, return_logits=True)
    b = Generator(q, policy="full").generate([1, 5, 9, 14, 3, 7], max_new_tokens=4, return_logits=True)
    assert len(b.tokens) == 4 and not np.array_equal(a.logits[0], b.logits[0])  # int8 arithmetic, same interface
    # the source's files are untouched (still the same inodes as the fixture's)
    assert os.path.samefile(Bundle.open(linked).layer_path(0), Bundle.open(gen_llama_bundle).layer_path(0))


def test_quantizing_a_fused_bundle_drops_its_fused_graph(bert_bi_bundle, tmp_path):
    """The fused graph reads the float layers' weight files at their offsets: the dynamic int8 copy must not keep it
    (it kept it listed and hashed, and the file then failed to load)."""
    import shutil

    from edge_sel.export.passes.fused import fuse_bundle

    src = tmp_path / "src"
    shutil.copytree(bert_bi_bundle, src, ignore=shutil.ignore_patterns(".verified"))
    fuse_bundle(src)
    assert Bundle.open(src).spec.fused is not None
    s = Bundle.open(quantize_bundle(src, tmp_path / "q", measure=False), verify=True).spec
    assert s.fused is None and "fused.onnx" not in s.files and not (tmp_path / "q" / "fused.onnx").exists()


def test_agreement_does_not_warn_per_call(bert_ce_bundle, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="edge_sel"):
        quantize_bundle(bert_ce_bundle, tmp_path / "q")
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]
