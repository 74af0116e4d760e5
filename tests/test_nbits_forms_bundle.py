"""The one-row MatMulNBits forms end to end: a tiny Llama whose matrices are exactly a GGUF's Q4_1 blocks, exported,
quantized to int4 from that GGUF (the blocks kept), run by the generate engine; an int4 bundle written without the
forms, and one written with the down projection as two int8 rows, are brought to them by upgrade_generate_bundle and
then generate exactly what the fresh one does."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from edge_sel.runtime.bundle import Bundle  # noqa: E402
from edge_sel.runtime.generate import Generator  # noqa: E402

PROMPT = "Return the number of items in a container, and open a file and return a stream."


@pytest.fixture(scope="module")
def q4_1_model(tmp_path_factory):
    """(hf folder, gguf file): every layer matrix of the model equals gguf's dequantization of its Q4_1 blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gen_tiny import CHAT_TEMPLATE
    from tiny_models import chat_tokenizer

    root = tmp_path_factory.mktemp("q4_1")
    torch.manual_seed(3)
    tok = chat_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(root / "m.gguf"), "llama")
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name, lin in (("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj),
                              ("o", layer.self_attn.o_proj), ("gate", layer.mlp.gate_proj), ("up", layer.mlp.up_proj),
                              ("down", layer.mlp.down_proj)):
                rows = lin.weight.numpy().astype(np.float32) * 4  # larger weights: the int8 rounding shows
                raw = gguf.quants.quantize(rows, q4_1)
                w.add_tensor(f"blk.{i}.{name}.weight", raw, raw_dtype=q4_1)
                lin.weight.copy_(torch.from_numpy(gguf.quants.dequantize(raw, q4_1).reshape(rows.shape)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model.save_pretrained(root / "hf")  # as they are (no widening: the values must stay the file's)
    tok.save_pretrained(root / "hf")
    return root / "hf", root / "m.gguf"


def _run(path):
    g = Generator(path, policy="full", chunk_tokens=7)
    try:
        res = g.generate(PROMPT, max_new_tokens=8, return_logits=True, stop=False)
    finally:
        g.close()
    return res.tokens, np.stack(res.logits)


def _forms(path) -> tuple[int, int, int]:
    """(MatMulNBits nodes with a zero-point input, float-activation products computed as two rows, products at float
    activations (``accuracy_level`` 0)) over the layers."""
    import onnx

    b = Bundle.open(path)
    zp = rows = floats = 0
    for i, layer in enumerate(b.spec.layers):
        for rel in (layer.file, b.spec.qkv_graph(i).file):
            g = onnx.load(str(b.path(rel)), load_external_data=False).graph
            zp += sum(n.op_type == "MatMulNBits" and len(n.input) > 3 and bool(n.input[3]) for n in g.node)
            rows += sum(n.op_type == "Concat" and n.name.endswith("_rows_9") for n in g.node)
            floats += sum(n.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" and a.i for a in n.attribute)
                          for n in g.node)
    return zp, rows, floats


def test_gguf_int4_bundle_in_the_one_row_forms(q4_1_model, tmp_path, monkeypatch):
    import edge_sel.export.nbits_forms as nf
    from edge_sel.export import export
    from edge_sel.export.passes.upgrade import upgrade_generate_bundle
    from edge_sel.export.passes.weights import convert_bundle

    hf, gguf_path = q4_1_model
    fp32 = export(hf, tmp_path / "fp32", task="generate", verify=True)
    new = convert_bundle(fp32, tmp_path / "int4", "int4", measure=False, gguf=gguf_path)
    w = Bundle.open(new).manifest["weights"]
    assert "gguf:Q4_1" in {t.get("source") for t in w["tensors"].values()}
    assert max(t.get("max_abs_diff") or 0.0 for t in w["tensors"].values()) == 0.0  # the file's blocks, exactly
    assert _forms(new) == (0, 0, 2)  # no zero points; each layer's down projection one row at float activations
    with monkeypatch.context() as m:  # an int4 bundle as written before the forms
        m.setattr(nf, "decode_forms", lambda model: 0)
        old = convert_bundle(fp32, tmp_path / "old", "int4", measure=False, gguf=gguf_path)
    assert _forms(old) == (8, 0, 2)  # q/k/v, o, gate/up, down of both layers with zero points 0
    with monkeypatch.context() as m:  # as written when the down projection ran as two int8 rows
        m.setattr(nf, "decode_forms", lambda model: nf.symmetric_offsets(model) + nf.split_float_activations(model))
        rows = convert_bundle(fp32, tmp_path / "rows", "int4", measure=False, gguf=gguf_path)
    assert _forms(rows) == (0, 2, 0)
    ref_tokens, ref = _run(fp32)
    new_tokens, new_logits = _run(new)
    _, old_logits = _run(old)
    # the prompt's next-token logits (later steps may follow different tokens); the int4 embedding table (not in the
    # file) dominates both errors here, the graph-level tests in test_nbits_forms compare the forms themselves
    err_new, err_old = np.abs(new_logits[0] - ref[0]).max(), np.abs(old_logits[0] - ref[0]).max()
    assert err_new < 0.15 * np.ptp(ref[0]) and err_new < 1.25 * err_old
    for earlier in (old, rows):
        assert upgrade_generate_bundle(earlier) is True
        assert _forms(earlier) == (0, 0, 2)
        up_tokens, up_logits = _run(earlier)
        assert up_tokens == new_tokens and np.array_equal(up_logits, new_logits)  # the same graphs as a fresh conversion
        assert upgrade_generate_bundle(earlier) is False  # already current
