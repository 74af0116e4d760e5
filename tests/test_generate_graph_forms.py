"""The generate form of split decoder layers (export/generate_layers.py) and the upgrade pass that brings generate
bundles exported in older forms to it (export/passes/upgrade.py), on real exported graphs run by onnxruntime."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.generate import Generator

from gen_tiny import make_gen_decoder

PROMPT = "Return the number of items in a container, and open a file and return a stream."


def _forms(path) -> dict:
    """What the bundle's graphs look like: whether the attention broadcasts the keys over the query group, whether it
    runs the constant-shape core (no shape read back per dimension), whether
    the qkv graphs rotate with RotaryEmbedding nodes, and what the manifest says about the rotary."""
    import onnx

    b = Bundle.open(path)
    broadcast, rotary, core, compact = set(), set(), set(), set()
    for i, layer in enumerate(b.spec.layers):
        g = onnx.load(str(b.layer_path(i)), load_external_data=False).graph
        core.add(any(n.name == "gm_softmax" for n in g.node) and not any(n.op_type == "Gather" for n in g.node))
        # the exported broadcast form: keys broadcast over the group into scaled products (packed G times); the
        # constant-shape core broadcasts them into unscaled one-row products (read in place)
        broadcast.add(any(n.op_type == "Unsqueeze" and n.input[0] == "k_cache" for n in g.node)
                      and not any(n.name == "gm_softmax" for n in g.node))
        q = onnx.load(str(b.path(b.spec.qkv_graph(i).file)), load_external_data=False).graph
        ops = [n.op_type for n in q.node]
        rotary.add(ops.count("RotaryEmbedding") == 2 and "Neg" not in ops)
        compact.add("cq_angles" in [n.name for n in q.node]  # rotary tables and reshapes from constant shapes
                    and not any(op in ops for op in ("Gather", "Expand", "ConstantOfShape"))
                    and all(n.input[0] == "position_ids" for n in q.node if n.op_type == "Shape"))
    assert len(broadcast) == 1 and len(rotary) == 1 and len(core) == 1 and len(compact) == 1, "every layer in the same form"
    return {"broadcast": broadcast.pop(), "rotary": rotary.pop(), "core": core.pop(), "compact": compact.pop(),
            "manifest_rotary": b.spec.layer_io.qkv_rotary}


def _run(path):
    g = Generator(path, policy="full", chunk_tokens=7)
    try:
        res = g.generate(PROMPT, max_new_tokens=12, return_logits=True, stop=False)
    finally:
        g.close()
    return res.tokens, np.stack(res.logits)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_gen_decoder(tmp_path_factory.mktemp("gen_forms") / "hf", layers=3)


def test_export_writes_the_current_form(hf, tmp_path):
    from edge_sel.export import export

    b = export(hf, tmp_path / "new", task="generate", verify=True)
    assert _forms(b) == {"broadcast": False, "rotary": True, "core": True, "compact": True, "manifest_rotary": "RotaryEmbedding"}


def test_upgrade_brings_an_old_bundle_to_the_current_form(hf, tmp_path, monkeypatch):
    import edge_sel.export.adapters.decoder_graphs as dg
    import edge_sel.export.prefix_layers as pl
    from edge_sel.export import export
    from edge_sel.export.passes.upgrade import upgrade_generate_bundle

    import edge_sel.export.generate_layers as gl

    with monkeypatch.context() as m:  # as exporters before wrote it: broadcast attention, op-by-op rotary
        m.setattr(dg, "BROADCAST_ATTENTION", True)
        m.setattr(pl, "fuse_qkv_file", lambda path, dims: False)
        m.setattr(gl, "generate_attention_core", lambda *a: False)
        old = export(hf, tmp_path / "old", task="generate", verify=True)
    assert _forms(old) == {"broadcast": True, "rotary": False, "core": False, "compact": False, "manifest_rotary": None}
    tokens, logits = _run(old)
    keep = tmp_path / "linked"  # a hard-linked copy of the old bundle keeps its graphs (the upgrade writes new files)
    shutil.copytree(old, keep, copy_function=os.link)

    assert upgrade_generate_bundle(old) is True
    assert _forms(old) == {"broadcast": False, "rotary": True, "core": True, "compact": True, "manifest_rotary": "RotaryEmbedding"}
    new_tokens, new_logits = _run(old)
    assert new_tokens == tokens
    assert np.max(np.abs(new_logits - logits)) < 1e-4
    assert upgrade_generate_bundle(old) is False  # already current
    assert _forms(keep)["broadcast"] is True
    Bundle.open(keep)  # still a valid bundle (sizes and hashes as its manifest says)


def _nbits(path) -> list[list[int]]:
    """Per layer: the output widths N of the MatMulNBits nodes of its qkv graph and of its attn graph."""
    import onnx

    b = Bundle.open(path)
    out = []
    for i, layer in enumerate(b.spec.layers):
        for rel in (b.spec.qkv_graph(i).file, layer.file):
            g = onnx.load(str(b.path(rel)), load_external_data=False).graph
            out.append(sorted(next(a.i for a in n.attribute if a.name == "N") for n in g.node if n.op_type == "MatMulNBits"))
    return out


def test_quantized_matrices_reading_one_activation_are_merged(hf, tmp_path, monkeypatch):
    """q/k/v and gate/up become one block-quantized product each (the exporter's weights pass); an int4 bundle written
    before is merged by the upgrade, and generates exactly what it generated."""
    import edge_sel.export.merge_nbits as mn
    from edge_sel.export import export
    from edge_sel.export.passes.upgrade import upgrade_generate_bundle
    from edge_sel.export.passes.weights import convert_bundle

    src = export(hf, tmp_path / "fp32", task="generate", verify=True)
    b = Bundle.open(src)
    d = b.spec.dims
    qkv_n, mlp_n = d.heads * d.head_dim + 2 * d.kv_heads * d.head_dim, 2 * d.intermediate
    new = convert_bundle(src, tmp_path / "int4", "int4", measure=False)
    assert _nbits(new) == [[qkv_n], sorted([d.hidden, mlp_n, d.hidden])] * d.num_layers
    with monkeypatch.context() as m:
        m.setattr(mn, "merge_shared_input", lambda model: 0)
        old = convert_bundle(src, tmp_path / "int4-old", "int4", measure=False)
    assert len(_nbits(old)[0]) == 3  # q, k, v apart
    tokens, logits = _run(old)
    assert upgrade_generate_bundle(old) is True
    assert _nbits(old) == _nbits(new)
    new_tokens, new_logits = _run(old)
    assert new_tokens == tokens and np.max(np.abs(new_logits - logits)) < 1e-5
