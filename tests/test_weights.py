"""Weight formats (``export --weights``, ``quantize --weights``): fp16 / int8 / int4 bundles on real exported tiny
graphs, run by both engines, against their float32 source."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edge_sel import Bundle
from edge_sel.export.passes import weights as weights_mod
from edge_sel.export.passes.weights import convert_bundle
from edge_sel.runtime import Reranker
from edge_sel.runtime.manifest import document as manifest_mod  # the module whose Manifest.parse reads FORMAT_VERSION
from edge_sel.runtime.blocks import BlockTable, decode, encode
from edge_sel.runtime.errors import BundleError, InputError
from edge_sel.runtime.manifest import Manifest

FORMATS = ("fp16", "int8", "int4")
# Largest relative score / logit error accepted per format on the tiny random-weight models (max |diff| over the
# spread of the float32 outputs): fp16 is exact to ~1e-3, 8 bits to a few %, 4 bits to tens of %.
TOLERANCE = {"fp16": 5e-3, "int8": 0.08, "int4": 0.35}


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("bits,block", [(8, 64), (4, 32), (4, 16)])
def test_block_codec_round_trip(bits, block):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 64)).astype(np.float32) * rng.uniform(0.01, 3, (7, 1)).astype(np.float32)
    values, scales, mins = encode(x, bits, block)
    y = decode(values, scales, mins, bits, block)
    step = (np.abs(x).max(1, keepdims=True) / 127) if bits == 8 else (np.ptp(x, 1, keepdims=True) / 15)
    assert np.all(np.abs(y - x) <= 0.5 * step * 1.01 + 1e-3 * np.abs(x).max(1, keepdims=True))
    table = BlockTable(values, scales, mins, bits, block, x.shape)
    ids = np.array([[3, 0], [6, 3]])
    np.testing.assert_array_equal(table[ids], y[ids])


@pytest.fixture(scope="module")
def converted(tmp_path_factory, bert_bi_bundle, llama_bundle, gen_llama_bundle):
    made = {}
    root = tmp_path_factory.mktemp("weights")
    small = weights_mod.SMALL_HEAD
    for name, src in (("bert", bert_bi_bundle), ("llama", llama_bundle), ("gen", gen_llama_bundle)):
        # the tiny LM head weighs kilobytes: let it be converted as a real model's would be
        weights_mod.SMALL_HEAD = 0 if name == "gen" else small
        try:
            for fmt in FORMATS:
                made[name, fmt] = convert_bundle(src, root / f"{name}-{fmt}", fmt, measure=False)
        finally:
            weights_mod.SMALL_HEAD = small
    return made


def _spread(a: np.ndarray) -> float:
    return float(np.max(a) - np.min(a)) or 1.0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name,fixture", [("bert", "bert_bi_bundle"), ("llama", "llama_bundle")])
def test_rerank_formats(converted, request, docs, fmt, name, fixture):
    src = Bundle.open(request.getfixturevalue(fixture))
    q = Bundle.open(converted[name, fmt], verify=True)
    s = q.spec
    assert s.weights.format == fmt and s.format_version == 2
    # the manifest round-trips: parsed -> written -> parsed gives the same typed manifest
    assert Manifest.parse(json.loads(json.dumps(s.to_dict()))) == s
    graphs = [q.layer_path(i) for i in range(len(s.layers))] + [q.path(g.file) for g in s.extra_graphs.values()]
    for g in graphs:
        ops = _ops(g)
        assert ("MatMulNBits" in ops) if fmt != "fp16" else ("Cast" in ops), (g, ops)
        assert s.weights.tensors[Path_rel(q, g)].format == fmt
    if fmt != "fp16":
        assert s.embed.encoding.bits == {"int8": 8, "int4": 4}[fmt]
        assert s.embed.logical_shape == src.spec.embed.shape
    assert q.total_bytes() < src.total_bytes()
    assert s.weights.tensors[s.head.file].format == "fp32"  # a kilobyte head stays float32 (see SMALL_HEAD)
    texts, queries = docs
    a = Reranker(src, pruning="off").predict(queries[0], texts[:12])
    b = Reranker(q, pruning="off").predict(queries[0], texts[:12])
    # a shift shared by every document (the quantized prefix moves all yes/no logits alike) does not change rankings
    err = np.max(np.abs((a - a.mean()) - (b - b.mean())))
    assert err <= TOLERANCE[fmt] * _spread(a), (fmt, err, _spread(a))
    # streamed under a budget, the smaller layers give the same scores
    layer = max(q.layer_weight_bytes(i) for i in range(len(s.layers)))
    c = Reranker(q, memory_budget=int(3 * layer) + (64 << 20), pruning="off").predict(queries[0], texts[:12])
    np.testing.assert_allclose(c, b, atol=1e-4)


def Path_rel(bundle: Bundle, p) -> str:
    return p.relative_to(bundle.root.resolve()).as_posix() if p.is_absolute() else str(p)


@pytest.mark.parametrize("fmt", FORMATS)
def test_generate_formats(converted, gen_llama_bundle, fmt):
    from edge_sel.runtime.generate import Generator

    q = Bundle.open(converted["gen", fmt], verify=True)
    assert ("MatMulNBits" if fmt != "fp16" else "Cast") in _ops(q.path(q.spec.head.file))
    prompt = [1, 5, 9, 14, 3, 7, 22, 31]
    a = Generator(gen_llama_bundle, policy="full").generate(prompt, max_new_tokens=4, return_logits=True)
    b = Generator(q, policy="full").generate(prompt, max_new_tokens=4, return_logits=True)
    assert len(b.tokens) == 4
    la, lb = np.asarray(a.logits[0]), np.asarray(b.logits[0])
    assert np.max(np.abs(la - lb)) <= TOLERANCE[fmt] * _spread(la), (fmt, np.max(np.abs(la - lb)), _spread(la))
    # every KV policy runs on the converted weights
    for policy in ("snapkv", "mpcache"):
        out = Generator(q, policy=policy, kv_budget=64).generate(prompt * 16, max_new_tokens=3)
        assert len(out.tokens) == 3
    pa = Generator(gen_llama_bundle, policy="full").score(prompt, prompt * 2)["ppl"]
    pb = Generator(q, policy="full").score(prompt, prompt * 2)["ppl"]
    assert np.isfinite(pb) and abs(pb - pa) <= 2 * TOLERANCE[fmt] * pa


def test_float32_bundles_stay_version_1(bert_bi_bundle):
    assert Bundle.open(bert_bi_bundle).spec.format_version == 1


def test_older_runtime_refuses_quantized_bundle(converted, monkeypatch):
    """A runtime that reads version 1 only (the version before weight formats) refuses, naming the version."""
    monkeypatch.setattr(manifest_mod, "FORMAT_VERSION", 1)
    with pytest.raises(BundleError, match="format version 2 is newer"):
        Bundle.open(converted["bert", "int4"])


def test_version_must_cover_the_formats(converted, tmp_path):
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(converted["bert", "int8"], dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["format_version"] = 1
    with pytest.raises(BundleError, match="need format version 2"):
        Manifest.parse(m)
    m["format_version"] = 2
    m["embed"]["encoding"]["bits"] = 3
    with pytest.raises(BundleError, match="embed.encoding.bits"):
        Manifest.parse(m)
    m["embed"]["encoding"]["bits"] = 8
    m["weights"]["format"] = "int3"
    with pytest.raises(BundleError, match="weights.format"):
        Manifest.parse(m)


def test_convert_refuses_bad_input(converted, bert_bi_bundle, tmp_path):
    with pytest.raises(InputError, match="unknown weight format"):
        convert_bundle(bert_bi_bundle, tmp_path / "x", "int3")
    with pytest.raises(InputError, match="already stores int4"):
        convert_bundle(converted["bert", "int4"], tmp_path / "y", "int8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_generate_int4_levels(converted, gen_llama_bundle, tmp_path):
    """4-bit generation: int8 activations (level 4) except the MLP down projection (input wider than the hidden state),
    which keeps float activations; a level chosen on the command line applies to every matrix."""
    q = Bundle.open(converted["gen", "int4"], verify=True)
    hidden = q.spec.dims.hidden

    def levels(bundle):
        out = {}
        for i, layer in enumerate(bundle.spec.layers):
            for rel in (bundle.spec.qkv_graph(i).file, layer.file):
                for n in onnx.load(str(bundle.path(rel)), load_external_data=False).graph.node:
                    if n.op_type == "MatMulNBits":
                        a = {x.name: x.i for x in n.attribute}
                        out.setdefault("wide" if a["K"] > hidden else "hidden", set()).add(a.get("accuracy_level", 0))  # absent: the default, 0
        return out

    assert levels(q) == {"wide": {0}, "hidden": {4}}
    flat = Bundle.open(convert_bundle(gen_llama_bundle, tmp_path / "l0", "int4", accuracy_level=0, measure=False))
    assert levels(flat) == {"wide": {0}, "hidden": {0}}


def test_info_shows_the_weight_format(converted, bert_bi_bundle, capsys):
    """`edge-sel info` on an fp16/int8/int4 bundle names its format (it said only `quantization: None`)."""
    from edge_sel.cli import main

    assert main(["info", str(converted["bert", "int4"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"]["format"] == "int4" and info["weights"]["block_size"] == 32 and "tensors" not in info["weights"]
    assert main(["info", str(bert_bi_bundle), "--json"]) == 0
    assert "weights" not in json.loads(capsys.readouterr().out)  # float32: no weights field


def test_converting_a_fused_bundle_drops_its_fused_graph(bert_bi_bundle, tmp_path):
    """The fused graph reads the float layers' weight files at their offsets: a converted bundle must not keep it
    (it kept the file, listed and hashed, which then failed to load in onnxruntime)."""
    import shutil

    from edge_sel.export.passes.fused import fuse_bundle

    src = tmp_path / "src"
    shutil.copytree(bert_bi_bundle, src, ignore=shutil.ignore_patterns(".verified"))
    fuse_bundle(src)
    assert Bundle.open(src).spec.fused is not None
    out = convert_bundle(src, tmp_path / "int8", "int8", measure=False)
    s = Bundle.open(out, verify=True).spec
    assert s.fused is None and "fused.onnx" not in s.files and not (out / "fused.onnx").exists()


def test_conversion_never_renames_across_filesystems(bert_bi_bundle, gen_llama_bundle, tmp_path, monkeypatch):
    """The system temp directory is often another filesystem than the output (a tmpfs /tmp): a converted graph written
    there could not be renamed into the bundle (`quantize -o` failed with "Invalid cross-device link"). Here the temp
    directory plays that other filesystem: a rename out of it fails as the kernel would."""
    import errno
    import os
    import tempfile

    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    real = os.replace

    def replace(src, dst, **kw):
        inside = lambda p: str(os.path.abspath(p)).startswith(str(systmp) + os.sep)  # noqa: E731
        if inside(src) != inside(dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    for name, bundle in (("bert", bert_bi_bundle), ("gen", gen_llama_bundle)):
        out = convert_bundle(bundle, tmp_path / f"{name}-int4", "int4", measure=False)
        assert Bundle.open(out, verify=True).spec.weights.format == "int4"
