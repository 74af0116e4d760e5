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
    """What the bundle's graphs look like: whether the attention broadcasts the cache over the query group, whether
    the qkv graphs rotate with RotaryEmbedding nodes, and what the manifest says about the rotary."""
    import onnx

    b = Bundle.open(path)
    broadcast, rotary = set(), set()
    for i, layer in enumerate(b.spec.layers):
        g = onnx.load(str(b.layer_path(i)), load_external_data=False).graph
        broadcast.add(any(n.op_type == "Unsqueeze" and n.input[0] in ("k_cache", "v_cache") for n in g.node))
        q = onnx.load(str(b.path(b.spec.qkv_graph(i).file)), load_external_data=False).graph
        ops = [n.op_type for n in q.node]
        rotary.add(ops.count("RotaryEmbedding") == 2 and "Neg" not in ops)
    assert len(broadcast) == 1 and len(rotary) == 1, "every layer in the same form"
    return {"broadcast": broadcast.pop(), "rotary": rotary.pop(), "manifest_rotary": b.spec.layer_io.qkv_rotary}


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
    assert _forms(b) == {"broadcast": False, "rotary": True, "manifest_rotary": "RotaryEmbedding"}


def test_upgrade_brings_an_old_bundle_to_the_current_form(hf, tmp_path, monkeypatch):
    import edge_sel.export.adapters.decoder_graphs as dg
    import edge_sel.export.prefix_layers as pl
    from edge_sel.export import export
    from edge_sel.export.passes.upgrade import upgrade_generate_bundle

    with monkeypatch.context() as m:  # as exporters before wrote it: broadcast attention, op-by-op rotary
        m.setattr(dg, "BROADCAST_ATTENTION", True)
        m.setattr(pl, "fuse_qkv_file", lambda path, dims: False)
        old = export(hf, tmp_path / "old", task="generate", verify=True)
    assert _forms(old) == {"broadcast": True, "rotary": False, "manifest_rotary": None}
    tokens, logits = _run(old)
    keep = tmp_path / "linked"  # a hard-linked copy of the old bundle keeps its graphs (the upgrade writes new files)
    shutil.copytree(old, keep, copy_function=os.link)

    assert upgrade_generate_bundle(old) is True
    assert _forms(old) == {"broadcast": False, "rotary": True, "manifest_rotary": "RotaryEmbedding"}
    new_tokens, new_logits = _run(old)
    assert new_tokens == tokens
    assert np.max(np.abs(new_logits - logits)) < 1e-4
    assert upgrade_generate_bundle(old) is False  # already current
    assert _forms(keep)["broadcast"] is True
    Bundle.open(keep)  # still a valid bundle (sizes and hashes as its manifest says)
