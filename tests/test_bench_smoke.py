"""`edge-sel bench rerank --quick` end to end on a tiny random decoder: every configuration in its own
process, the same token ids everywhere, offline (docstring corpus, local model directory)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory):
    from tiny_models import make_decoder

    return make_decoder(tmp_path_factory.mktemp("bench_tiny") / "hf", layers=3)


def test_bench_rerank_quick_all_configs(tiny_decoder_dir, tmp_path):
    env = dict(os.environ, EDGE_SEL_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    res = subprocess.run([sys.executable, "-m", "edge_sel.cli", "bench", "rerank", "--model", str(tiny_decoder_dir),
                          "--quick", "--corpus", "docstrings", "--out", str(out), "--markdown", str(md)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert set(rows) == {"torch", "optimum", "ort", "edge_sel", "edge_sel_budget"}
    for name, r in rows.items():
        assert r["ok"], (name, r)
        assert r["peak_rss"] >= r["idle_rss"] >= r["base_rss"] > 0
        assert r["latency_per_query_s"] > 0
        # every engine scores the same token ids: rankings agree with torch, scores to float precision
        assert r["top_k_identical"] == 1.0, name
        assert r["max_abs_score_diff"] < 1e-3, name
    # the bare-session peer and edge_sel never import torch
    for name in ("ort", "edge_sel", "edge_sel_budget"):
        assert rows[name]["torch_imported"] is False, name
    assert rows["torch"]["torch_imported"] is True
    assert rows["edge_sel_budget"]["window_layers"] == 2 and rows["edge_sel"]["window_layers"] == 3
    assert doc["raw"]["edge_sel"]["ids_match_workload"] is True
    assert {c["check"] for c in doc["acceptance"]} >= {"all resident: latency <= 1.2x bare session"}
    assert "bare onnxruntime session" in md.read_text()


def test_bench_rejects_unknown_config(tiny_decoder_dir):
    from edge_sel.benchmarks.rerank import main

    assert main(["--model", str(tiny_decoder_dir), "--configs", "nope"]) == 2
