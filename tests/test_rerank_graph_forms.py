"""The rerank form of split decoder layers (export/prefix_layers.py) and the atomic upgrade pass that brings older
bundles to it (export/passes/upgrade.py), on real exported graphs run by onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sel.runtime import Reranker
from edge_sel.runtime.bundle import Bundle


def _rerank_form_checks(b: Bundle) -> None:
    """The current rerank form: attn graphs keep only hidden_out and run their attention core as one MultiHeadAttention
    node over the KV heads (each group's query heads stacked as rows); qkv graphs rotate q and k with RotaryEmbedding."""
    import onnx

    io = b.manifest["layer_io"]
    assert io["attn"]["outputs"] == ["hidden_out"] and io["attn_core"] == "MultiHeadAttention"
    assert io["qkv_rotary"] == "RotaryEmbedding" and io["rerank_form"] == 4
    kv_heads = b.manifest["dims"]["kv_heads"]
    for i, entry in enumerate(b.layers):
        g = onnx.load(str(b.layer_path(i)), load_external_data=False).graph
        ops = [n.op_type for n in g.node]
        assert [o.name for o in g.output] == ["hidden_out"]
        assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops
        mha = next(n for n in g.node if n.op_type == "MultiHeadAttention")
        assert next(a.i for a in mha.attribute if a.name == "num_heads") == kv_heads
        q = onnx.load(str(b.path(b.manifest["extra_graphs"][entry["qkv"]]["file"])), load_external_data=False).graph
        qops = [n.op_type for n in q.node]
        assert qops.count("RotaryEmbedding") == 2 and "Neg" not in qops and "Slice" not in qops


def _old_forms(hf, tmp_path, monkeypatch, which=("gen", "first", "second")) -> dict:
    """Bundles as earlier exporters wrote them: the generation form, the first rerank form (op-by-op rotary),
    form 2 (attention core over the KV heads) and form 3 (core over K/V copied per query head, RotaryEmbedding)."""
    import edge_sel.export.prefix_layers as pl
    from edge_sel.export import export

    out = {}
    with monkeypatch.context() as m:
        m.setattr(pl, "fuse_attn_file", lambda path, dims: False)
        m.setattr(pl, "fuse_qkv_file", lambda path, dims: False)
        out["gen"] = export(hf, tmp_path / "gen", verify=True)
    io = Bundle.open(out["gen"]).manifest["layer_io"]
    assert io["attn"]["outputs"] == ["hidden_out", "attn_sum", "attn_max"] and "attn_core" not in io and "rerank_form" not in io
    if "first" not in which:
        return out
    def attn_core(grouped: bool):  # the attn rewrite of an older exporter: the core over copied or grouped K/V
        return lambda path, dims: pl.rewrite_file(
            path, "attn", lambda g: pl.fuse_rerank_attention(g, *pl.heads_of(dims), grouped=grouped), dims)

    with monkeypatch.context() as m:
        m.setattr(pl, "fuse_attn_file", attn_core(False))
        m.setattr(pl, "fuse_qkv_file", lambda path, dims: False)
        out["first"] = export(hf, tmp_path / "first", verify=True)
    io = Bundle.open(out["first"]).manifest["layer_io"]
    assert io["attn_core"] == "MultiHeadAttention" and "rerank_form" not in io and "qkv_rotary" not in io
    with monkeypatch.context() as m:
        m.setattr(pl, "fuse_attn_file", attn_core(True))
        m.setattr(pl, "RERANK_FORM", 2)
        out["second"] = export(hf, tmp_path / "second", verify=True)
    assert Bundle.open(out["second"]).manifest["layer_io"]["rerank_form"] == 2
    with monkeypatch.context() as m:
        m.setattr(pl, "fuse_attn_file", attn_core(False))
        m.setattr(pl, "RERANK_FORM", 3)
        out["third"] = export(hf, tmp_path / "third", verify=True)
    assert Bundle.open(out["third"]).manifest["layer_io"]["rerank_form"] == 3
    return out


def test_rerank_graphs_are_fused_and_old_bundles_upgrade(llama_bundle, tmp_path, docs, monkeypatch):
    """Rerank bundles are exported in the current rerank form (GQA: 6 query heads over 2 KV heads here); bundles in the
    generation form, in the first rerank form and in forms 2 and 3 upgrade in place to the same scores (within 1e-4, same
    top-3), verify, and a second upgrade is a no-op."""
    from edge_sel.export.passes.upgrade import fuse_bundle_attention
    from tiny_models import make_decoder

    _rerank_form_checks(Bundle.open(llama_bundle))
    documents, queries = docs
    current = Reranker(llama_bundle, pruning="off").predict(queries[1], documents)
    for old in _old_forms(make_decoder(tmp_path / "hf"), tmp_path, monkeypatch).values():
        before = Reranker(old, pruning="off").predict(queries[1], documents)
        assert fuse_bundle_attention(old) is True
        assert fuse_bundle_attention(old) is False
        after_b = Bundle.open(old, verify=True)
        _rerank_form_checks(after_b)
        after = Reranker(after_b, pruning="off").predict(queries[1], documents)
        assert np.std(before) > 1e-3
        np.testing.assert_allclose(after, before, atol=1e-4)
        np.testing.assert_allclose(after, current, atol=1e-4)
        assert set(np.argsort(-after)[:3]) == set(np.argsort(-before)[:3])
        assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".*old*"))


def test_upgrade_is_atomic(tmp_path, monkeypatch):
    """An upgrade that fails on a later layer leaves the bundle exactly as it was (files, manifest, hard links)."""
    import os
    import shutil

    import edge_sel.export.prefix_layers as pl
    from edge_sel.export.passes.upgrade import fuse_bundle_attention
    from tiny_models import make_decoder

    gen = _old_forms(make_decoder(tmp_path / "hf", layers=2), tmp_path, monkeypatch, which=("gen",))["gen"]
    linked = tmp_path / "linked"
    shutil.copytree(gen, linked, copy_function=os.link)  # a hard-linked copy must keep its graphs
    manifest = (gen / "manifest.json").read_bytes()
    calls = []
    real = pl.fuse_attn_file

    def fail_second(path, dims):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(path, dims)

    monkeypatch.setattr(pl, "fuse_attn_file", fail_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        fuse_bundle_attention(gen)
    assert len(calls) == 2
    assert (gen / "manifest.json").read_bytes() == manifest
    Bundle.open(gen, verify=True)
    assert not list(tmp_path.glob(".gen.*"))
    monkeypatch.setattr(pl, "fuse_attn_file", real)
    assert fuse_bundle_attention(gen) is True
    _rerank_form_checks(Bundle.open(gen, verify=True))
    Bundle.open(linked, verify=True)  # the old graphs, untouched through the links
    assert "rerank_form" not in Bundle.open(linked).manifest["layer_io"]


def test_rerank_qkv_rewrite_matches_on_other_families(tmp_path):
    """The rotary rewrite of the qkv graphs (RotaryEmbedding, rotate-half) computes the generation graphs' q/k/v for
    Qwen2 (projection biases), Qwen3 (q/k norms, head_dim != hidden/heads) and Phi-3 (fused qkv_proj), at scattered
    positions."""
    import onnx
    from transformers import AutoModelForCausalLM

    import edge_sel.export.prefix_layers as pl
    from edge_sel.export.adapters import adapter_for
    from edge_sel.export.adapters.decoder_graphs import dims as model_dims
    from edge_sel.export.adapters.decoder_graphs import split_layer_graphs
    from edge_sel.export.graphs import export_graph
    from edge_sel.runtime.sessions import load_session
    from tiny_models import make_decoder, make_phi3

    for kind in ("qwen2", "qwen3", "llama", "phi3"):
        hf = make_phi3(tmp_path / kind, layers=1) if kind == "phi3" else make_decoder(tmp_path / kind, kind=kind, layers=1)
        model = AutoModelForCausalLM.from_pretrained(hf).eval()
        pairs = split_layer_graphs(model, adapter_for(kind))
        dims = model_dims(model.config, 1)
        path = tmp_path / f"{kind}_qkv.onnx"
        export_graph(pairs[0][0], path)
        ref = load_session(path)
        g = onnx.load(str(path), load_external_data=False)
        assert pl.fuse_rerank_qkv(g, dims["head_dim"]) is True and pl.fuse_rerank_qkv(g, dims["head_dim"]) is False
        onnx.save_model(g, str(tmp_path / f"{kind}_qkv_r.onnx"))  # beside the weights
        new = load_session(tmp_path / f"{kind}_qkv_r.onnx")
        rng = np.random.default_rng(1)
        feeds = {"hidden": rng.standard_normal((3, 7, dims["hidden"])).astype(np.float32),
                 "position_ids": np.array([np.arange(7) + 40, np.arange(7), np.arange(7) * 9 + 100], np.int64)}
        for a, b in zip(ref.run(None, feeds), new.run(None, feeds)):
            np.testing.assert_allclose(b, a, atol=1e-5)
