"""Fused graphs (``edge-sel fuse``, ``export --fused``): one ONNX graph composed from a bundle's own graphs runs the whole
early-ranking call in a stock onnxruntime session and ranks exactly as the Python runtime with the same schedule.

Compared on the shared-vector bundles of every scoring kind, with the bundle's schedule and with schedules that
prune on any input (every rule, every method): the order of every document (survivors, then the dropped ones),
the layer each was dropped at — exactly — and every score within ``SCORE_TOL``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_sel import Reranker
from edge_sel.export.fused_feeds import text_feeds
from edge_sel.export.fused_rerank import build_fused, check_fusable
from edge_sel.export.passes.fused import FUSED_FILE, fuse_bundle
from edge_sel.runtime import Bundle
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.manifest import thaw, with_schedule, without_layers
from edge_sel.runtime.rerank.schedule import Schedule
from vectors.make import CASES, forced_schedules, texts

SCORE_TOL = 1e-4   # absolute: float32 kernels of one graph against the same kernels run layer by layer


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_sel.cli", *map(str, args)], capture_output=True, text=True)


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a bundle whose files are hard links (the test writes only new files into it)."""
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns(".verified"))
    return dst


def _schedules(bundle: Bundle) -> dict:
    out = {"none": None}
    if bundle.spec.schedule is not None:
        out["bundle"] = Schedule.from_manifest(thaw(bundle.spec.schedule))
    probe = bundle.spec.schedule.probe if bundle.spec.schedule is not None else None
    for name, d in forced_schedules(bundle.scoring, len(bundle.spec.layers), probe).items():
        out[name] = Schedule.from_manifest(d)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_fused_graph_ranks_as_the_runtime(case, vector_bundles, tmp_path):
    root = _linked_copy(vector_bundles[case], tmp_path / case)
    b = Bundle.open(root)
    queries, docs = texts()
    pruned_somewhere = False
    for label, sched in _schedules(b).items():
        model, info = build_fused(b, sched)
        path = root / f"fused-{label}.onnx"
        path.write_bytes(model.SerializeToString())
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == info["inputs"]
        rr = Reranker(b, pruning=sched if sched is not None else "off")
        for q in queries:
            expected = rr.rank(q, docs, top_k=None)
            scores, pruned, order = sess.run(None, text_feeds(b, q, docs))
            assert list(order) == [r["corpus_id"] for r in expected], (label, q)
            assert list(pruned) == [-1 if r.get("pruned_at_layer") is None else r["pruned_at_layer"]
                                    for r in sorted(expected, key=lambda r: r["corpus_id"])], (label, q)
            want = np.array([r["score"] for r in sorted(expected, key=lambda r: r["corpus_id"])])
            assert np.abs(scores - want).max() <= SCORE_TOL, (label, q)
            pruned_somewhere |= bool((pruned >= 0).any())
    assert pruned_somewhere, "the forced schedules must prune, or the comparison proves nothing about pruning"


def test_fuse_pass_in_place_and_copy(vector_bundles, tmp_path):
    src = vector_bundles["tiny_bert_bi"]
    b = tmp_path / "b"
    shutil.copytree(src, b)
    out = _cli("fuse", b, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)["fused"]
    bundle = Bundle.open(b, verify=True)  # hashes every file and checks the fused graph's external data is listed
    f = bundle.spec.fused
    assert f.file == FUSED_FILE and info["inputs"] == ["input_ids", "attention_mask", "query_ids"]
    assert set(f.reads) >= {bundle.spec.embed.file, *(x.weights for x in bundle.spec.layers)}
    doc = (Path(__file__).resolve().parent.parent / "docs" / "BUNDLE.md").read_text()
    for name in f.inputs + f.outputs:  # the format spec names every input and output, with its shape
        assert f"`{name} [" in doc, name
    import onnx

    g = onnx.load(str(b / f.file), load_external_data=False).graph
    external = {e.value for t in g.initializer for e in t.external_data if e.key == "location"}
    assert external == set(f.reads)
    again = fuse_bundle(b, tmp_path / "copy", pruning=False)  # a copy; the old fused graph is replaced, not duplicated
    copy = Bundle.open(again, verify=True)
    assert copy.spec.fused.schedule is None and sorted(copy.spec.files) == sorted(bundle.spec.files)
    res = _cli("rerank", b, "-q", "open a file", "-d", Path(__file__), "-k", 3, "--json")  # the runtime ignores it
    assert res.returncode == 0 and len(json.loads(res.stdout)["results"]) == 3
    ort_copy = _cli("convert", b, "-o", tmp_path / "ort")  # conversion drops the weight files the graph reads: refused
    assert ort_copy.returncode == 2 and not (tmp_path / "ort").exists()
    # one line naming the user's bundle (it named the writer's staging directory, '.ort.partial-.../manifest.json')
    assert ort_copy.stderr.strip().splitlines() == [f"edge-sel: error: {b} has a fused graph ({FUSED_FILE}), which reads "
                                                    "the ONNX graphs' weight files that an ORT-format bundle does not "
                                                    "keep; convert the bundle without it (before `edge-sel fuse`, or "
                                                    "exported without --fused)"]
    assert not any(p.name.startswith(".ort.partial") for p in tmp_path.iterdir())


def test_passes_that_change_what_it_compiled_drop_it():
    raw = {"layers": [{"index": 0, "file": "l0.onnx"}, {"index": 1, "file": "l1.onnx"}], "fused": {"file": FUSED_FILE}}
    assert with_schedule(raw, None, "early_probe", None)["fused"] is None
    out, gone = without_layers(raw, {0}, {}, "early_probe")
    assert out["fused"] is None and FUSED_FILE in gone
    assert "fused" not in with_schedule({"layers": []}, None, "early_probe", None)  # no key added to other bundles


def test_a_new_schedule_drops_the_fused_file(bert_bi_bundle, tmp_path):
    """The manifest drops a fused graph when the schedule it holds changes; its file must go too (it stayed listed)."""
    from edge_sel.export.passes.calibrate import write_schedule

    src = tmp_path / "src"
    shutil.copytree(bert_bi_bundle, src, ignore=shutil.ignore_patterns(".verified"))
    fuse_bundle(src, pruning=False)
    b = Bundle.open(src)
    write_schedule(b, Schedule(method="head", top_k=3, layers=[0], margins=[0.25], source_layers=[0]), None)
    s = Bundle.open(src, verify=True).spec
    assert s.fused is None and FUSED_FILE not in s.files and not (src / FUSED_FILE).exists()


def test_unfusable_bundles_are_refused(vector_bundles, gen_llama_bundle):
    b = Bundle.open(vector_bundles["tiny_bert_ce"])
    odd = Schedule(method="head", top_k=3, layers=[0], margins=[0.1], rule="learned_gate")
    with pytest.raises(InputError, match="'learned_gate' has no in-graph form"):
        check_fusable(b, odd)
    with pytest.raises(InputError, match="'generate' bundle"):
        check_fusable(Bundle.open(gen_llama_bundle), None)


def test_export_fused(tmp_path):
    from tiny_models import make_bert

    hf = make_bert(tmp_path / "hf", cross_encoder=True, layers=2)
    out = _cli("export", hf, "-o", tmp_path / "b", "--fused", "--json")
    assert out.returncode == 0, out.stderr
    b = Bundle.open(tmp_path / "b", verify=True)
    assert b.spec.fused is not None and json.loads(out.stdout)["fused"]["inputs"] == ["input_ids", "attention_mask",
                                                                                         "token_type_ids"]
    sess = ort.InferenceSession(str(b.path(b.spec.fused.file)), providers=["CPUExecutionProvider"])
    docs = ["copy a file to another place", "the number of items", "open a file for reading"]
    scores, pruned, order = sess.run(None, text_feeds(b, "copy a file", docs))
    want = Reranker(b, pruning="off").predict("copy a file", docs)
    assert np.abs(scores - want).max() <= SCORE_TOL and (pruned == -1).all()
