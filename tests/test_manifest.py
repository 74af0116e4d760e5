"""The typed manifest: every bundle kind parses and round-trips, bad manifests are refused naming the field,
and bundles exported by an earlier edge_sel still open."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import BundleError
from edge_sel.runtime.manifest import (CREATED_BY, EMPTY_POS, FORMAT_VERSION, ArraySpec, LayerSpec, Manifest,
                                       ScheduleSpec)

REPO = Path(__file__).resolve().parent.parent
OLD_COMMIT = "731e239"  # the last commit before the typed manifest: its bundles must keep opening


def _raw(bundle) -> dict:
    return json.loads((Path(bundle) / "manifest.json").read_text())


def _copy(bundle, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


# ---- every bundle kind ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture, scoring, task", [("bert_bi_bundle", "bi_encoder", "rerank"),
                                                    ("bert_ce_bundle", "cross_encoder", "rerank"),
                                                    ("llama_bundle", "yes_no", "rerank"),
                                                    ("gen_llama_bundle", "lm", "generate")])
def test_every_bundle_kind_parses_and_round_trips(fixture, scoring, task, request):
    path = request.getfixturevalue(fixture)
    b = Bundle.open(path)
    s = b.spec
    assert isinstance(s, Manifest) and s.model.scoring == scoring and s.model.task == task
    assert s.to_dict() == _raw(path) == b.manifest
    assert Manifest.parse(s.to_dict()) == s
    assert all(isinstance(layer, LayerSpec) and layer.index == i for i, layer in enumerate(s.layers))
    assert isinstance(s.embed, ArraySpec) and s.embed.shape[1] == s.dims.hidden == b.array("embed").shape[1]
    assert s.created_by == CREATED_BY
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.pooling = "mean"
    if task == "generate" or scoring == "yes_no":  # split decoder layers: qkv + attn graphs
        assert s.layer_io.split and s.layer_io.empty_pos == EMPTY_POS
        assert all(s.qkv_graph(i).file.endswith("_qkv.onnx") for i in range(len(s.layers)))
        assert s.layer_io.qkv.inputs == ("hidden", "position_ids") and s.layer_io.attn.outputs[0] == "hidden_out"
    else:
        assert not s.layer_io.split and s.layer_io.inputs == ("hidden", "mask")
        assert s.embedding.rule == "bert" and s.embedding.layer_norm_eps > 0
    if task == "generate":
        assert s.chat is not None and s.stop_ids and s.head.outputs == ("logits",)
    else:
        assert s.pooling == {"bi_encoder": "mean", "cross_encoder": "cls", "yes_no": "last"}[scoring]
        assert s.final_layer_output == ("first_token" if scoring == "cross_encoder" else "all_tokens")


def test_empty_pos_is_one_constant(gen_llama_bundle):
    from edge_sel.runtime import kvcache

    assert EMPTY_POS == 2**40 == kvcache.EMPTY_POS == Bundle.open(gen_llama_bundle).spec.layer_io.empty_pos


def test_defaults_are_applied_at_parse_time_and_not_written_back(bert_ce_bundle):
    raw = _raw(bert_ce_bundle)
    for key in ("pooling", "pad_id", "final_layer_output", "layer_io", "dropped_layers", "schedule"):
        raw.pop(key)
    del raw["layers"][0]["source_index"]
    s = Manifest.parse(raw)
    assert s.pooling == "cls" and s.pad_id == 0 and s.final_layer_output == "all_tokens" and s.schedule is None
    assert s.layer_io.inputs == ("hidden", "mask") and s.layers[0].source_index == 0 and s.dropped_layers == ()
    assert s.to_dict() == raw  # what was absent stays absent


def test_unknown_fields_are_kept(llama_bundle):
    raw = _raw(llama_bundle)
    raw["future_field"] = {"x": [1, 2]}
    raw["layers"][1]["note"] = "hi"
    raw["model"]["licence"] = "apache-2.0"
    s = Manifest.parse(raw)
    assert s.unknown["future_field"]["x"] == (1, 2)
    assert s.to_dict() == raw


def test_replace_validates_and_passes_can_rewrite(llama_bundle):
    s = Bundle.open(llama_bundle).spec
    sched = {"version": 1, "method": "head", "rule": "margin", "top_k": 3, "layers": [{"layer": 1, "margin": 0.5}],
             "floor": None, "cluster_gap": 0.0, "safety": 1.5, "probe": None, "source_layers": [1], "calibration": {"queries": 4}}
    s2 = s.replace(schedule=sched)
    assert isinstance(s2.schedule, ScheduleSpec) and s2.schedule.layers[0].margin == 0.5
    assert s2.to_dict()["schedule"] == sched and s.schedule is None
    kept = [dataclasses.replace(layer, index=i) for i, layer in enumerate(s.layers[1:])]
    s3 = s.replace(layers=kept, dropped_layers=[0], drop_cost={"top10_overlap": 0.9})
    assert [layer.source_index for layer in s3.layers] == [1, 2] and s3.drop_cost.top10_overlap == 0.9
    q = s.replace(quantization={"method": "m", "weights": "int8", "per_channel": False, "ops": ["MatMul"]})
    assert q.quantization.weights == "int8"
    with pytest.raises(BundleError, match=r"schedule\.layers\[0\]\.margin"):
        s.replace(schedule={**sched, "layers": [{"layer": 1, "margin": -1}]})
    with pytest.raises(BundleError, match="pooling"):
        s.replace(pooling="max")
    assert dataclasses.replace(s, pooling="mean").pooling == "mean"


def test_passes_output_parses(bert_ce_bundle, tmp_path):
    """Bundles rewritten by the passes (quantize, drop layers, calibration's schedule writer) parse and round-trip."""
    from edge_sel.export.passes.drop_layers import rewrite_without
    from edge_sel.export.passes.quantize import quantize_bundle

    q = Bundle.open(quantize_bundle(bert_ce_bundle, tmp_path / "q", measure=False))
    assert q.spec.quantization.weights == "int8" and q.spec.to_dict() == _raw(q.root)
    d = Bundle.open(rewrite_without(Bundle.open(_copy(bert_ce_bundle, tmp_path)), [2], {"top10_overlap": 1.0}))
    assert d.spec.dropped_layers == (2,) and len(d.spec.layers) == 2 and d.spec.final_layer_output == "all_tokens"
    assert d.spec.drop_cost.top10_overlap == 1.0 and d.spec.to_dict() == _raw(d.root)


# ---- bad manifests ----------------------------------------------------------------------------------------------
def _set(path: str, value):
    """An edit that sets ``path`` (dotted with [i], or a tuple of keys) to ``value``; ``...`` deletes it."""
    def edit(m):
        keys = path if isinstance(path, tuple) else [int(k) if k.isdigit() else k
                                                     for k in path.replace("[", ".").replace("]", "").split(".")]
        for k in keys[:-1]:
            m = m[k]
        if value is ...:
            del m[keys[-1]]
        else:
            m[keys[-1]] = value
    return edit


BAD = [  # (bundle fixture, edit, the field the error must name)
    ("bert_ce_bundle", _set("format_version", -7), "format_version"),
    ("bert_ce_bundle", _set("format_version", True), "format_version"),
    ("bert_ce_bundle", _set("format_version", "1"), "format_version"),
    ("bert_ce_bundle", _set("format_version", 1.0), "format_version"),
    ("bert_ce_bundle", _set("format_version", FORMAT_VERSION + 1), "format_version"),
    ("bert_ce_bundle", _set("format", "onnx"), "format"),
    ("bert_ce_bundle", _set("model", "bert"), "model"),
    ("bert_ce_bundle", _set("model.scoring", "dot"), "model.scoring"),
    ("bert_ce_bundle", _set("model.task", "classify"), "model.task"),
    ("bert_ce_bundle", _set("model.scoring", "lm"), "model.scoring"),      # lm scoring on a rerank bundle
    ("bert_ce_bundle", _set("max_length", ...), "max_length"),
    ("bert_ce_bundle", _set("max_length", 0), "max_length"),
    ("bert_ce_bundle", _set("max_length", True), "max_length"),
    ("bert_ce_bundle", _set("dims.hidden", ...), "dims.hidden"),
    ("bert_ce_bundle", _set("dims.heads", -4), "dims.heads"),
    ("bert_ce_bundle", _set("dims.kv_heads", 3), "dims.kv_heads"),
    ("bert_ce_bundle", _set("dims.hidden", 33), "embed.shape"),
    ("bert_ce_bundle", _set("embed.dtype", "O"), "embed.dtype"),
    ("bert_ce_bundle", _set("embed.dtype", "float64"), "embed.shape"),    # allowed dtype, but the file size disagrees
    ("bert_ce_bundle", _set("embed.shape", [600, -32]), r"embed.shape\[1\]"),
    ("bert_ce_bundle", _set("arrays.position.dtype", "<U8"), "arrays.position.dtype"),
    ("bert_ce_bundle", _set("arrays.ln_weight", ...), "arrays.ln_weight"),  # needed by the bert embedding rule
    ("bert_ce_bundle", _set("layers", ["layers/layer_000.onnx"]), r"layers\[0\]"),
    ("bert_ce_bundle", _set("layers", []), "layers"),
    ("bert_ce_bundle", _set("layers[2].weights", 7), r"layers\[2\]\.weights: expected a string or null, got 7"),
    ("bert_ce_bundle", _set("layers[1].index", 0), r"layers\[1\]\.index"),
    ("bert_ce_bundle", _set("layers[0].file", "/etc/passwd"), r"layers\[0\]\.file"),
    ("bert_ce_bundle", _set("layers[0].file", "layers/nope.onnx"), "not listed"),
    ("bert_ce_bundle", _set("head.inputs", "pooled"), "head.inputs"),
    ("bert_ce_bundle", _set("tokenizer", "tokenizer.json"), "tokenizer"),
    ("bert_ce_bundle", _set("pooling", "max"), "pooling"),
    ("bert_ce_bundle", _set("final_layer_output", "some"), "final_layer_output"),
    ("bert_ce_bundle", _set("pad_id", -1), "pad_id"),
    ("bert_ce_bundle", _set("embedding.rule", "rope"), "embedding.rule"),
    ("bert_ce_bundle", _set("embedding.layer_norm_eps", "1e-12"), "embedding.layer_norm_eps"),
    ("bert_ce_bundle", _set("dropped_layers", [1, "2"]), r"dropped_layers\[1\]"),
    ("bert_ce_bundle", _set("files", []), "files"),
    ("bert_ce_bundle", _set(("files", "head.onnx"), {"size": "12", "sha256": "0" * 64}), "size"),
    ("bert_ce_bundle", _set(("files", "head.onnx"), {"size": 12, "sha256": "abc"}), "sha256"),
    ("bert_ce_bundle", _set("schedule", {"method": "magic", "top_k": 3, "layers": []}), "schedule.method"),
    ("bert_ce_bundle", _set("schedule", {"method": "head", "top_k": 0, "layers": []}), "schedule.top_k"),
    ("bert_ce_bundle", _set("schedule", {"method": "head", "top_k": 3, "layers": [{"layer": 7, "margin": 1}]}), "schedule.layers"),
    ("bert_ce_bundle", _set("schedule", {"method": "head", "rule": "rank", "top_k": 3, "layers": [{"layer": 1, "keep": 1.5}]}),
     r"schedule\.layers\[0\]\.keep"),
    ("bert_ce_bundle", _set("schedule", {"method": "probe", "top_k": 3, "layers": [], "probe": "nope"}), "schedule.probe"),
    ("bert_ce_bundle", _set("export.seconds", "fast"), "export.seconds"),
    ("bert_ce_bundle", _set("quantization", {"method": "q", "weights": "int8", "per_channel": "yes"}), "quantization.per_channel"),
    ("llama_bundle", _set("prompt", ...), "prompt"),
    ("llama_bundle", _set("prompt.prefix", None), "prompt.prefix"),
    ("llama_bundle", _set("token_ids.yes", "yes"), "token_ids.yes"),
    ("llama_bundle", _set("layers[1].qkv", "qkv_999"), r"layers\[1\]\.qkv"),
    ("llama_bundle", _set("layer_io.attn", ...), "layer_io"),
    ("llama_bundle", _set("extra_graphs.qkv_000.weights", 3), r"extra_graphs\.qkv_000\.weights"),
    ("gen_llama_bundle", _set("stop_ids", [2, -1]), r"stop_ids\[1\]"),
    ("gen_llama_bundle", _set("chat.before", 5), "chat.before"),
    ("gen_llama_bundle", _set("add_bos", "false"), "add_bos"),
    ("gen_llama_bundle", _set("rope_theta", -1.0), "rope_theta"),
    ("gen_llama_bundle", _set("layer_io.empty_pos", 0), "layer_io.empty_pos"),
    ("gen_llama_bundle", _set("model.scoring", "yes_no"), "model.scoring"),  # a generate bundle scores with the LM head
    # fields that each parse but do not agree with the rest of the bundle
    ("llama_bundle", _set("prompt.prefix", "no placeholder at all"), "prompt.prefix"),
    ("llama_bundle", _set("prompt.prefix", "{nonsense} {query}"), "prompt.prefix"),
    ("llama_bundle", _set("token_ids.yes", 10**7), "token_ids.yes"),
    ("llama_bundle", _set("pad_id", 10**6), "pad_id"),
    ("llama_bundle", _set("dims.num_layers", 7), "dims.num_layers"),
    ("bert_bi_bundle", _set("dims.vocab", 10), "dims.vocab"),
    ("gen_llama_bundle", _set("stop_ids", [2, 10**6]), r"stop_ids\[1\]"),
    ("gen_llama_bundle", _set("bos_id", 10**6), "bos_id"),
]


@pytest.mark.parametrize("fixture, edit, field", BAD, ids=[f"{i:02d}-{f}" for i, (_, _, f) in enumerate(BAD)])
def test_bad_manifest_names_the_field(fixture, edit, field, request):
    raw = copy.deepcopy(_raw(request.getfixturevalue(fixture)))
    edit(raw)
    with pytest.raises(BundleError, match=field) as e:
        Manifest.parse(raw, "/x/manifest.json")
    assert str(e.value).startswith("/x/manifest.json: ")


def test_bad_manifest_table_is_large_enough():
    assert len(BAD) >= 25


def test_object_dtype_refused_before_any_memory_map(bert_ce_bundle, tmp_path, monkeypatch):
    """A crafted ``embed.dtype: "O"`` would make a memory map read file bytes as object pointers (a crash)."""
    root = _copy(bert_ce_bundle, tmp_path)
    raw = _raw(root)
    raw["embed"]["dtype"] = "O"
    (root / "manifest.json").write_text(json.dumps(raw))

    def no_memmap(*a, **k):
        raise AssertionError("np.memmap reached with an unchecked dtype")

    monkeypatch.setattr(np, "memmap", no_memmap)
    with pytest.raises(BundleError, match=r"embed\.dtype: 'O' is not one of float32"):
        Bundle.open(root)
    out = subprocess.run([sys.executable, "-m", "edge_sel.cli", "info", str(root)], capture_output=True, text=True)
    assert out.returncode == 2 and "embed.dtype" in out.stderr + out.stdout and "Traceback" not in out.stderr


def test_bundle_path_only_serves_listed_files(bert_ce_bundle):
    b = Bundle.open(bert_ce_bundle)
    assert b.path("head.onnx").is_file()
    with pytest.raises(BundleError, match="not listed"):
        b.path("hf/config.json")


def test_assigning_the_raw_manifest_revalidates(bert_ce_bundle):
    b = Bundle.open(bert_ce_bundle)
    raw = copy.deepcopy(b.manifest)
    raw["pooling"] = "mean"
    b.manifest = raw
    assert b.spec.pooling == "mean"
    with pytest.raises(BundleError, match="pooling"):
        b.manifest = {**raw, "pooling": 3}
    assert b.spec.pooling == "mean"


# ---- bundles exported before the typed manifest -----------------------------------------------------------------
def _old_tree(tmp_path) -> Path | None:
    """The package as of OLD_COMMIT, laid out importable (``edge_sel``, ``edge_sel.export``, ``edge_sel.runtime``)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"], capture_output=True).returncode:
        return None
    src = tmp_path / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "edge_sel", "export", "runtime", "devices", "tests"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    site = tmp_path / "site"
    shutil.copytree(src / "edge_sel", site / "edge_sel")
    for part in ("export", "runtime", "devices"):
        shutil.copytree(src / part, site / "edge_sel" / part)
    return src


OLD_EXPORT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import edge_sel
assert Path(edge_sel.__file__).resolve().is_relative_to(Path(sys.argv[3]).resolve()), edge_sel.__file__
from edge_sel.export import export
from tiny_models import make_bert, make_decoder
from gen_tiny import make_gen_decoder
out = Path(sys.argv[1])
export(make_bert(out / "hf_bert"), out / "bert_bi")
export(make_bert(out / "hf_ce", cross_encoder=True), out / "bert_ce")
export(make_decoder(out / "hf_llama"), out / "llama")
export(make_gen_decoder(out / "hf_gen", kind="llama", layers=2), out / "gen", task="generate")
"""


def test_bundles_exported_before_the_typed_manifest_open(tmp_path, docs):
    src = _old_tree(tmp_path)
    if src is None:
        pytest.skip(f"needs a git checkout holding commit {OLD_COMMIT}")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = tmp_path / "bundles"
    res = subprocess.run([sys.executable, "-c", OLD_EXPORT, str(out), str(src / "tests"), str(tmp_path / "site")],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    from edge_sel.runtime import Reranker

    texts, queries = docs
    for name, scoring in [("bert_bi", "bi_encoder"), ("bert_ce", "cross_encoder"), ("llama", "yes_no"), ("gen", "lm")]:
        b = Bundle.open(out / name, verify=True)
        assert b.spec.model.scoring == scoring and b.spec.to_dict() == _raw(out / name)
        assert b.spec.created_by == "edge_sel 0.1.0"
        if scoring != "lm":
            scores = Reranker(b, pruning="off").predict(queries[0], texts[:6])
            assert np.isfinite(scores).all() and len(scores) == 6


def test_cli_info_and_verify_report_the_manifest(bert_ce_bundle, tmp_path):
    """`info` prints the manifest's facts (typed reads, same JSON as the manifest holds) on a dropped + calibrated bundle."""
    from edge_sel.export.passes.calibrate import write_schedule
    from edge_sel.export.passes.drop_layers import rewrite_without
    from edge_sel.runtime.rerank import Schedule

    root = rewrite_without(Bundle.open(_copy(bert_ce_bundle, tmp_path)), [1], {"top10_overlap": 0.95, "top10_identical": 0.5})
    b = Bundle.open(root)
    write_schedule(b, Schedule(method="head", top_k=3, layers=[0], margins=[0.25], source_layers=[0],
                               info={"agreement": {"layer_work_saved": 0.2, "topk_recall": 1.0, "topk_identical": 1.0}}), None)
    assert b.spec.schedule.agreement.topk_recall == 1.0  # the pass assigned the raw manifest: spec follows
    raw = _raw(root)
    run = lambda *a: subprocess.run([sys.executable, "-m", "edge_sel.cli", *a, str(root)], capture_output=True, text=True)
    info = json.loads(run("info", "--json").stdout)
    for key in ("model", "dims", "max_length", "dropped_layers", "drop_cost", "schedule", "export"):
        assert info[key] == raw[key], key
    assert info["quantization"] is None and info["layers"] == 2
    out = run("verify", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["files"] == len(raw["files"])
    text = run("info").stdout
    assert "top10_overlap" in text and "margin" in text


@pytest.mark.parametrize("fixture", ["bert_bi_bundle", "bert_ce_bundle", "llama_bundle", "gen_llama_bundle"])
def test_graph_io_matches_the_manifest_and_the_format_spec(fixture, request):
    """The I/O names the manifest lists are the graphs' own, and docs/BUNDLE.md names every one of them."""
    onnx = pytest.importorskip("onnx")
    b = Bundle.open(request.getfixturevalue(fixture))
    s = b.spec
    doc = (REPO / "docs" / "BUNDLE.md").read_text()

    def io(rel):
        g = onnx.load(str(b.path(rel)), load_external_data=False).graph
        return tuple(i.name for i in g.input), tuple(o.name for o in g.output)

    graphs = [(s.head.file, (s.head.inputs, s.head.outputs))]
    for i, layer in enumerate(s.layers):
        if s.layer_io.split:
            graphs += [(layer.file, (s.layer_io.attn.inputs, s.layer_io.attn.outputs)),
                       (s.qkv_graph(i).file, (s.layer_io.qkv.inputs, s.layer_io.qkv.outputs))]
        else:
            graphs.append((layer.file, (s.layer_io.inputs, s.layer_io.outputs)))
    for rel, expected in graphs:
        assert io(rel) == expected, rel
        for name in expected[0] + expected[1]:
            assert f"`{name} [" in doc, f"docs/BUNDLE.md does not specify {name!r} of {rel}"
