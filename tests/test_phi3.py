"""Phi-3, the family added as one adapter file (export/adapters/phi3.py) plus one registry line: a tiny random-weight
``Phi3ForCausalLM`` exported for both tasks, scores and logits checked against transformers, bundles run by the
runtime's Reranker and Generator (real onnxruntime sessions)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edge_sel.runtime import Reranker
from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime import Generator


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    from edge_sel.export import export
    from tiny_models import make_phi3

    root = tmp_path_factory.mktemp("phi3")
    hf = make_phi3(root / "hf")
    return {"hf": hf, "rerank": export(hf, root / "rerank", verify=True),
            "generate": export(hf, root / "generate", task="generate", verify=True)}


def _load(hf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(hf)


def test_registry_and_manifest(phi3):
    from edge_sel.export.adapters import adapter_for
    from edge_sel.export.adapters.phi3 import Phi3Adapter

    assert isinstance(adapter_for("phi3"), Phi3Adapter)
    b = Bundle.open(phi3["rerank"], verify=True)
    assert b.manifest["model"]["model_type"] == "phi3" and b.manifest["model"]["family"] == "phi3"
    assert b.manifest["export"]["verified_max_abs_diff"] < 1e-3
    assert b.manifest["prompt"]["suffix"] == "<|end|>\n<|assistant|>\n"
    io = b.manifest["layer_io"]  # split layers in the current rerank form: the fused qkv_proj does not hide the rotary
    assert io["prefix_reuse"] and io["rerank_form"] == 4 and io["qkv_rotary"] == "RotaryEmbedding"
    g = onnx.load(str(b.path(b.manifest["extra_graphs"][b.layers[0]["qkv"]]["file"])), load_external_data=False).graph
    weights = {i.name for i in g.initializer}
    assert sum(n.op_type == "MatMul" and any(i in weights for i in n.input) for n in g.node) == 1  # fused q/k/v
    assert [n.op_type for n in g.node].count("RotaryEmbedding") == 2


def test_rerank_scores_match_transformers(phi3, docs):
    from edge_sel.export.adapters import adapter_for

    documents, queries = docs
    model, tok = _load(phi3["hf"])
    adapter = adapter_for("phi3")
    rr = Reranker(phi3["rerank"], pruning="off")
    for q in queries[:2]:
        enc = rr.encoder.encode(q, documents[:16])
        mine = rr.score_encoded(enc)
        ref = adapter.reference_scores(model, tok, "yes_no", enc.doc_ids, enc.doc_types, query_ids=enc.query_ids)
        assert np.max(np.abs(mine - ref)) < 1e-3 and np.std(ref) > 1e-3
    rr.predict(queries[0], documents[:16])
    assert rr.last_stats["prefix_reuse_tokens"] > 0  # the prompt prefix ran once for all candidates
    rr.close()


def test_rerank_streams_under_a_budget_and_without_prefix_reuse(phi3, docs, tmp_path):
    from edge_sel.export import export

    documents, queries = docs
    full = Reranker(phi3["rerank"])
    ref = full.predict(queries[0], documents)
    tight = Reranker(phi3["rerank"], memory_budget=full.minimum_budget(queries[0], documents) + full.planner.layer_bytes // 2)
    np.testing.assert_allclose(tight.predict(queries[0], documents), ref, atol=1e-5)
    assert tight.last_stats["window_layers"] < len(tight.bundle.layers)
    plain = export(phi3["hf"], tmp_path / "plain", prefix_reuse=False, verify=True)
    assert "qkv" not in Bundle.open(plain).layers[0]
    np.testing.assert_allclose(Reranker(plain).predict(queries[0], documents), ref, atol=1e-3)
    res = full.rank(queries[0], documents, top_k=3)
    assert [r["corpus_id"] for r in res] == list(np.argsort(-ref, kind="stable")[:3])


def test_generate_logits_match_transformers(phi3):
    from edge_sel.export.adapters import adapter_for

    b = Bundle.open(phi3["generate"], verify=True)
    assert b.task == "generate" and b.manifest["export"]["verified_max_abs_diff"] < 1e-3
    model, tok = _load(phi3["hf"])
    adapter = adapter_for("phi3")
    gen = Generator(phi3["generate"], policy="full", chunk_tokens=7)
    for prompt in ("Return the number of items in a container.", "Open a file and return a stream."):
        res = gen.generate(prompt, max_new_tokens=16, return_logits=True, stop=False)
        ref = adapter.reference_logits(model, res.prompt_ids, res.tokens[:-1])
        assert np.max(np.abs(np.stack(res.logits) - ref)) < 1e-3
        assert res.tokens == [int(np.argmax(r)) for r in ref]
    gen.close()


def test_generate_chat_template_and_stop_ids(phi3):
    b = Bundle.open(phi3["generate"])
    _, tok = _load(phi3["hf"])
    chat = b.manifest["chat"]
    assert chat["before"] == "<|user|>\n" and chat["after"] == "<|end|>\n<|assistant|>\n"
    assert tok.convert_tokens_to_ids("<|end|>") in b.manifest["stop_ids"]
    gen = Generator(phi3["generate"])
    ids = gen.encode("hello", chat=True)
    assert ids == tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    gen.close()


def test_generate_under_a_kv_budget(phi3):
    gen = Generator(phi3["generate"], kv_budget="16KB", policy="snapkv")
    res = gen.generate("Sort a list in place, stable, with an optional key function. " * 12, max_new_tokens=12, stop=False)
    assert len(res.tokens) == 12 and res.stats["evictions"] > 0
    assert res.stats["kv_bytes_peak"] <= 16 * 1024
    gen.close()


@pytest.mark.parametrize("task", ["rerank", "generate"])
def test_partial_rotary(task, tmp_path):
    """Phi-3 models rotating only part of each head use Phi-3's rotary function; the rerank form's RotaryEmbedding
    rewrite does not recognise it and keeps the exported qkv graphs (correct, only slower)."""
    from edge_sel.export import export
    from tiny_models import make_phi3

    hf = make_phi3(tmp_path / "hf", layers=2, partial_rotary_factor=0.5)
    b = Bundle.open(export(hf, tmp_path / "b", task=task, verify=True))
    assert b.manifest["export"]["verified_max_abs_diff"] < 1e-3
    if task == "rerank":
        assert b.manifest["layer_io"]["attn_core"] == "MultiHeadAttention" and "qkv_rotary" not in b.manifest["layer_io"]
