"""ORT-format bundles (``edge-sel convert``, ``export --format ort``): onnxruntime's converter writes every graph as
an ``.ort`` file plus the operator configuration of a reduced build; the runtime gives the same results as with the
ONNX graphs (the shared test vectors)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_sel.export.passes.ort_format import parse_operator_config
from edge_sel.runtime import Bundle
from edge_sel.runtime.manifest import thaw
from vectors.make import CASES, compare, make_vectors

VECTORS = Path(__file__).resolve().parent / "vectors"
# the rows of docs/BUNDLE.md's table of the operator sets the converter records, per vector bundle
DOC_ROWS = {"tiny_bert_ce": "BERT cross-encoder", "tiny_bert_bi": "BERT bi-encoder",
            "tiny_llama_yes_no": "Llama yes/no, split layers"}


def documented_operators(case: str) -> dict[str, set[str]]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "BUNDLE.md").read_text(encoding="utf-8")
    (row,) = [ln for ln in text.splitlines() if ln.startswith(f"| {DOC_ROWS[case]}")]
    _, _, onnx, ms, _ = row.split("|")
    return {"ai.onnx": {op.strip() for op in onnx.split(",")}, "com.microsoft": {op.strip() for op in ms.split(",")}}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_sel.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("case", list(CASES))
def test_ort_bundle_reproduces_vectors(case, vector_bundles_ort):
    b = Bundle.open(vector_bundles_ort[case], verify=True)
    s = b.spec
    graphs = [*s.layers, *s.extra_graphs.values(), s.head]
    assert s.graph_format == "ort" and all(g.file.endswith(".ort") and g.weights is None for g in graphs)
    assert not any(rel.endswith((".onnx", ".onnx.data")) for rel in s.files)
    config = (b.root / s.ort.required_operators).read_text(encoding="utf-8")
    assert parse_operator_config(config) == thaw(s.ort.operators)
    if s.scoring == "yes_no":  # the fused rerank form's contrib ops must be in a reduced build's config
        assert {"MultiHeadAttention", "RotaryEmbedding"} <= set(s.ort.operators["com.microsoft;1"])
    recorded = {"ai.onnx": set(), "com.microsoft": set()}
    for key, ops in thaw(s.ort.operators).items():
        recorded[key.split(";")[0]] |= set(ops)
    assert recorded == documented_operators(case), "docs/BUNDLE.md's operator table is out of date"
    expected = json.loads((VECTORS / f"{case}.json").read_text(encoding="utf-8"))
    bad = compare(expected, make_vectors(b.root, case, with_plans=False))
    assert not bad, "\n".join(bad[:10])


def test_cli_convert_in_place_and_refusals(vector_bundles, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(vector_bundles["tiny_bert_ce"], b)
    out = _cli("convert", b, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["graph_format"] == "ort" and (b / info["required_operators"]).is_file()
    assert "ai.onnx;17" in info["operators"]  # LayerNormalization
    again = _cli("convert", b)
    assert again.returncode == 2 and "already holds ORT-format graphs" in again.stderr and "Traceback" not in again.stderr
    assert _cli("verify", b).returncode == 0
    res = _cli("rerank", b, "-q", "open a file", "-d", VECTORS / "make.py", "-k", 3, "--json")
    assert res.returncode == 0 and len(json.loads(res.stdout)["results"]) == 3


def test_export_format_ort(tmp_path):
    from tiny_models import make_bert

    hf = make_bert(tmp_path / "hf", layers=2)
    out = _cli("export", hf, "-o", tmp_path / "b", "--format", "ort", "--json")
    assert out.returncode == 0, out.stderr
    s = Bundle.open(tmp_path / "b", verify=True).spec
    assert s.graph_format == "ort" and s.layers[0].file.endswith(".ort")


def test_convert_a_quantized_bundle(vector_bundles, tmp_path):
    """An int4 bundle converts (BUNDLE.md: a reduced build for it needs MatMulNBits): its per-graph weight facts follow
    the graphs to their .ort names; the writer refused it ('weights.tensors: names layers/layer_000.onnx, which is not
    listed in files', naming its own staging directory) and no int8/int4 bundle could be converted."""
    from edge_sel.export.passes.weights import convert_bundle

    q = convert_bundle(vector_bundles["tiny_llama_yes_no"], tmp_path / "int4", "int4", measure=False)
    out = _cli("convert", q, "-o", tmp_path / "ort", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert "MatMulNBits" in info["operators"]["com.microsoft;1"]
    b = Bundle.open(tmp_path / "ort", verify=True)
    assert b.spec.weights.format == "int4" and all(rel in b.spec.files for rel in b.spec.weights.tensors)
    assert any(rel.endswith(".ort") for rel in b.spec.weights.tensors)
    a = _cli("rerank", q, "-q", "open a file", "-d", VECTORS / "make.py", "-k", 3, "--json")
    c = _cli("rerank", tmp_path / "ort", "-q", "open a file", "-d", VECTORS / "make.py", "-k", 3, "--json")
    assert a.returncode == 0 and c.returncode == 0, a.stderr + c.stderr
    ra, rc = json.loads(a.stdout)["results"], json.loads(c.stdout)["results"]
    assert [r["corpus_id"] for r in ra] == [r["corpus_id"] for r in rc]
    assert max(abs(x["score"] - y["score"]) for x, y in zip(ra, rc)) < 1e-3
