"""``export --format coreml``: the CoreML packages' structure, checked here on Linux, where coremltools converts but
cannot predict. Per stage: I/O names, types and shapes against the ONNX graph it stands for, the declared precision,
the weight bytes (fp16 about half of fp32), and that every MIL op of the program is an op of the target's MIL opset.
Numeric parity needs macOS (Core ML itself) and is in the last test, skipped elsewhere."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("coremltools", reason="--format coreml needs the coreml extra (coremltools)")

from edge_sel.runtime.bundle import Bundle  # noqa: E402

FLOAT_IN, INT_IN = "FLOAT32", "INT32"


def ct():
    from edge_sel.export.coreml import coremltools

    return coremltools()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The four tiny models exported with CoreML packages (2 layers each), and the cross-encoder at fp32 too."""
    from tiny_models import export_coreml, make_bert, tiny_coreml_bundles

    return {**tiny_coreml_bundles(tmp_path_factory, layers=2),
            "bert_ce_fp32": export_coreml(tmp_path_factory, "bert_ce", make_bert, "fp32", cross_encoder=True, layers=2)}


def onnx_io(path: Path):
    """``{name: (elem type, [dim value or dim name])}`` of an ONNX graph's inputs and outputs (weights not loaded)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph

    def io(values):
        return {v.name: ("FLOAT32" if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT else "INT",
                         [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim])
                for v in values}

    return io(g.input), io(g.output)


def package_spec(bundle: Bundle, key: str):
    # a package is a directory: the bundle lists (and hashes) the files inside it
    return ct().utils.load_spec(str(bundle.root / bundle.spec.coreml.stages[key].package))


def mil_ops(spec):
    from coremltools.proto import MIL_pb2

    f = spec.mlProgram.functions["main"]
    ops = list(f.block_specializations[f.opset].operations)
    weights = [MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType) for op in ops
               if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue"]
    return [op.type for op in ops], weights


def expected_stages(bundle: Bundle) -> dict[str, str]:
    s = bundle.spec
    out = {f"layer_{i:03d}": layer.file for i, layer in enumerate(s.layers)}
    out.update({f"qkv_{i:03d}": s.qkv_graph(i).file for i, layer in enumerate(s.layers) if layer.qkv})
    out["head"] = s.head.file
    return out


@pytest.mark.parametrize("name", ["bert_bi", "bert_ce", "llama_rerank", "llama_generate"])
def test_every_streamed_stage_has_a_package_with_the_onnx_contract(tiny, name):
    from coremltools.proto import FeatureTypes_pb2 as ft

    bundle = tiny[name]
    c = bundle.spec.coreml
    assert c.precision == "float16" and c.minimum_deployment_target == "macOS13"
    assert {k: s.graph for k, s in c.stages.items()} == expected_stages(bundle)  # each layer, each qkv, the head
    assert bundle.spec.embed.file.endswith(".bin")  # the embedding stays the raw table
    for key, stage in c.stages.items():
        listed = [f for f in bundle.spec.files if f.startswith(stage.package + "/")]
        assert f"{stage.package}/Manifest.json" in listed  # every file of the package is listed (and hashed)
        assert any("weight.bin" in f for f in listed) == (stage.weight_bytes > 0)  # a bi-encoder's head has no weights
        ins, outs = onnx_io(bundle.path(stage.graph))
        spec = package_spec(bundle, key)
        assert [i.name for i in spec.description.input] == list(ins) == list(stage.inputs)
        assert [o.name for o in spec.description.output] == list(outs) == list(stage.outputs)
        for i in spec.description.input:
            arr = i.type.multiArrayType
            kind, dims = ins[i.name]
            assert ft.ArrayFeatureType.ArrayDataType.Name(arr.dataType) == (FLOAT_IN if kind == "FLOAT32" else INT_IN)
            ranges = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
            assert len(ranges) == len(dims), (key, i.name)
            for (lo, hi), d in zip(ranges, dims):
                if isinstance(d, int) and d > 0:
                    assert lo == hi == d, (key, i.name)        # a fixed size of the ONNX graph stays fixed
                else:
                    assert lo == 1 and hi > 1, (key, i.name)   # a free ONNX axis (batch, seq, slots) is a range
        for o in spec.description.output:  # hidden states cross stage boundaries as float32
            assert ft.ArrayFeatureType.ArrayDataType.Name(o.type.multiArrayType.dataType) == "FLOAT32"


@pytest.mark.parametrize("name", ["bert_bi", "bert_ce", "llama_rerank", "llama_generate"])
def test_mil_programs_use_only_ops_of_the_target_opset_and_the_declared_precision(tiny, name):
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    target = getattr(ct().target, tiny[name].spec.coreml.minimum_deployment_target)
    for key in tiny[name].spec.coreml.stages:
        spec = package_spec(tiny[name], key)
        assert spec.WhichOneof("Type") == "mlProgram"
        ops, weights = mil_ops(spec)
        for op in set(ops):  # every op is a core MIL op that exists at the deployment target (Core ML runs it on CPU)
            assert op in SSAOpRegistry.core_ops and any(v <= target for v in SSAOpRegistry.core_ops[op]), (key, op)
        assert set(weights) <= {"FLOAT16"} and (weights or key == "head"), key


def test_fp32_packages_are_float32_and_twice_the_weight_bytes(tiny):
    half, full = tiny["bert_ce"].spec.coreml, tiny["bert_ce_fp32"].spec.coreml
    assert full.precision == "float32"
    for key in full.stages:
        _, weights = mil_ops(package_spec(tiny["bert_ce_fp32"], key))
        assert set(weights) == {"FLOAT32"}
        ratio = half.stages[key].weight_bytes / full.stages[key].weight_bytes
        assert 0.45 < ratio < 0.6, (key, ratio)  # 2 bytes per weight instead of 4 (+ 64-byte blob headers)


def test_coreml_bundles_still_run_on_onnxruntime_and_verify(tiny, docs):
    from edge_sel.runtime import Generator, Reranker

    for name in ("bert_bi", "bert_ce", "llama_rerank"):
        b = tiny[name]
        b.verify()  # every package file hashed and checked
        rr = Reranker(b)
        assert len(rr.rank("a query", docs[0][:4], top_k=2)) == 2
        rr.close()
    gen = Generator(tiny["llama_generate"])
    assert gen.generate("hi", max_new_tokens=2).tokens
    gen.close()


def test_dropping_layers_removes_the_packages(tiny, tmp_path):
    """CoreML packages belong to layer positions: a pass that drops layers drops them (the bundle stays valid)."""
    import shutil

    from edge_sel.export.passes.drop_layers import rewrite_without

    src = tmp_path / "b"
    shutil.copytree(tiny["bert_ce"].root, src)
    rewrite_without(Bundle.open(src), [0], {"top10_overlap": None})
    b = Bundle.open(src)
    assert b.spec.coreml is None and not any(f.startswith("coreml/") for f in b.spec.files)
    assert not (src / "coreml").exists()


def test_cli_export_coreml_and_bad_options(tmp_path, capsys):
    from edge_sel import cli
    from tiny_models import make_bert

    hf = make_bert(tmp_path / "hf", cross_encoder=True, layers=1)
    code = cli.main(["export", str(hf), "-o", str(tmp_path / "b"), "--format", "coreml", "--coreml-precision", "fp32", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    info = json.loads(out)["coreml"]
    assert info["packages"] == 2 and info["precision"] == "float32" and info["weight_bytes"] > 0
    code = cli.main(["export", str(hf), "-o", str(tmp_path / "c"), "--format", "coreml", "--drop-layers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--drop-layers" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_cli_export_coreml_prints_no_coremltools_chatter(tmp_path):
    """A fresh process (coremltools not imported yet): its import warnings (an untested torch, the macOS-only
    predictor proxies: nine lines on Linux) stay out of the export's output."""
    import subprocess

    from tiny_models import make_bert

    hf = make_bert(tmp_path / "hf", layers=1)
    code = f"from edge_sel.cli import main; raise SystemExit(main(['export', {str(hf)!r}, '-o', {str(tmp_path / 'b')!r}, '--format', 'coreml', '--json']))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "coremltools" not in res.stderr and "Failed to load" not in res.stderr, res.stderr


def minilm_fetched() -> bool:
    from edge_sel.export.sources import is_fetched

    return is_fetched("all-minilm-l6-v2")


@pytest.mark.skipif(not minilm_fetched(), reason="all-MiniLM-L6-v2 is not fetched (edge-sel models fetch all-minilm-l6-v2)")
def test_minilm_packages(tmp_path):
    """The real model: 6 layers + head, each against its ONNX stage, fp16 weights (half of the fp32 ONNX weights)."""
    from edge_sel.export import export

    b = Bundle.open(export("all-minilm-l6-v2", tmp_path / "b", format="coreml"))
    stages = b.spec.coreml.stages
    assert {k: s.graph for k, s in stages.items()} == expected_stages(b)
    for i, layer in enumerate(b.spec.layers):
        onnx_weights = b.spec.files[layer.weights].size
        ratio = stages[f"layer_{i:03d}"].weight_bytes / onnx_weights
        assert 0.48 < ratio < 0.52, ratio
        ins, outs = onnx_io(b.path(layer.file))
        spec = package_spec(b, f"layer_{i:03d}")
        assert [x.name for x in spec.description.input] == list(ins)
        assert [x.name for x in spec.description.output] == list(outs)
        assert set(mil_ops(spec)[1]) == {"FLOAT16"}


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS; coremltools only converts here")
def test_coreml_stage_numerics_match_onnxruntime_on_macos(tiny, docs):
    """Each package against its ONNX stage on the same inputs: within 1e-2 at fp16 (layer by layer)."""
    import numpy as np
    import onnxruntime as ort

    b = tiny["bert_ce"]
    rng = np.random.default_rng(0)
    H = b.spec.dims.hidden
    feeds = {"hidden": rng.standard_normal((3, 9, H)).astype(np.float32), "mask": np.ones((3, 9), np.float32)}
    for i, layer in enumerate(b.spec.layers):
        ref = ort.InferenceSession(str(b.path(layer.file)), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        model = ct().models.MLModel(str(b.root / b.spec.coreml.stages[f"layer_{i:03d}"].package))
        got = model.predict(feeds)["hidden_out"]
        assert np.abs(got - ref).max() < 1e-2
