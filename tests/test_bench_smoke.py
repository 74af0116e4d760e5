"""The developer peer comparison `python -m benchmarks.rerank --quick` (a script of the checkout, not installed)
end to end on a tiny random decoder, offline (docstring corpus, local model directory): the bare-onnxruntime
peer (optimum's whole-model export) and both edge_sel configurations, each in its own process, scoring the
same token ids. The torch / optimum workers are exercised by the real benchmark (they cost ~20 CPU-s of
imports each, too slow for CI)."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import child_env
from benchmarks.rerank import acceptance, acceptance_pruned, main, summarize


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory):
    from tiny_models import make_decoder

    return make_decoder(tmp_path_factory.mktemp("bench_tiny") / "hf", layers=3)


def test_bench_rerank_quick(tiny_decoder_dir, tmp_path):
    env = child_env(dict(os.environ, EDGE_SEL_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    res = subprocess.run([sys.executable, "-m", "benchmarks.rerank", "--model", str(tiny_decoder_dir),
                          "--quick", "--corpus", "docstrings", "--configs", "ort,edge_sel,edge_sel_budget,edge_sel_pruned",
                          "--out", str(out), "--markdown", str(md)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert set(rows) == {"ort", "edge_sel", "edge_sel_budget", "edge_sel_pruned"}
    assert doc["meta"]["reference"] == "ort"
    for name, r in rows.items():
        assert r["ok"], (name, r)
        assert r["peak_rss"] >= r["idle_rss"] >= r["base_rss"] > 0
        assert r["latency_per_query_s"] > 0 and r["cpu_per_query_s"] > 0
        # the same token ids everywhere: identical rankings, scores equal to float precision
        assert r["top_k_identical"] == 1.0, name
        assert r["max_abs_score_diff"] < 1e-3, name
        assert r["torch_imported"] is False, name  # the bare-session peer and edge_sel never import torch
    # the pruned config ran on a calibrated copy of the bundle (schedule or an explicit "no safe layer" note)
    assert doc["raw"]["edge_sel_pruned"]["edge_sel_stats"][0]["pruning"]
    assert 0 < rows["edge_sel_pruned"]["candidate_layers"] <= 1.0
    assert rows["edge_sel"]["candidate_layers"] == 1.0
    assert rows["edge_sel_budget"]["window_layers"] == 2
    assert rows["edge_sel"]["window_layers"] == 3
    assert doc["raw"]["edge_sel"]["ids_match_workload"] is True
    assert {c["check"] for c in doc["acceptance"]} >= {"all resident: latency <= 1.2x bare session"}
    assert "bare onnxruntime session" in md.read_text()


def _fake(config, latency, peak, idle, topk, scores):
    return {"config": config, "ok": True, "latency_per_query": latency, "latency_per_query_runs": [latency],
            "cpu_per_query": latency * 2, "warmup_s": [latency], "peak_rss": peak, "idle_rss": idle, "base_rss": idle // 2,
            "load_s": 0.1, "torch_imported": config == "torch", "topk": topk, "topk_warmup": topk, "scores": scores}


def test_summary_and_acceptance_logic():
    workload = [{"gold": 0}, {"gold": 3}]
    s_ref = [[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]
    s_off = [[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]]  # top-2 of query 0 becomes {0, 2}
    results = {
        "torch": _fake("torch", 2.0, 2000, 1000, [[0, 1], [3, 2]], s_ref),
        "ort": _fake("ort", 1.0, 1000, 500, [[0, 1], [3, 2]], s_ref),
        "edge_sel": _fake("edge_sel", 1.1, 300, 100, [[0, 1], [3, 2]], s_ref),
        "edge_sel_budget": _fake("edge_sel_budget", 2.5, 300, 100, [[0, 2], [3, 2]], s_off),
    }
    rows = summarize(results, workload, 2, budget=250)
    assert rows["edge_sel"]["top_k_identical"] == 1.0 and rows["edge_sel"]["max_abs_score_diff"] == 0.0
    assert rows["edge_sel_budget"]["top_k_identical"] == 0.5
    assert rows["edge_sel_budget"]["overlap_at_k"] == pytest.approx(0.75)
    assert rows["edge_sel"]["latency_vs_ort"] == pytest.approx(1.1) and rows["edge_sel"]["peak_vs_ort"] == pytest.approx(0.3)
    assert rows["torch"]["gold_in_top_k"] == 1.0 and rows["torch"]["mrr_at_k"] == pytest.approx(1.0)
    checks = {c["check"]: c["pass"] for c in acceptance(rows, budget=250)}
    assert checks["budget: whole-process peak RSS <= 0.35x bare session"] is True
    assert checks["budget: model share (peak - idle) <= budget + 10%"] is True     # 200 <= 275
    assert checks["budget: latency <= 2x bare session"] is False                  # 2.5x
    assert checks["all resident: latency <= 1.2x bare session"] is True
    assert checks["edge_sel_budget: top-K sets identical to torch on every query"] is False


def test_pruned_acceptance_logic():
    workload = [{"gold": 0, "doc_ids": [[1]] * 4}, {"gold": 3, "doc_ids": [[1]] * 4}]
    s_ref = [[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]
    stats = lambda live: [{"live_per_layer": live, "n_layers": 3, "dropped_layers": [], "pruning": "probe at layers [1]"}] * 2  # noqa: E731
    results = {
        "ort": _fake("ort", 1.0, 1000, 500, [[0, 1], [3, 2]], s_ref),
        "edge_sel_pruned": {**_fake("edge_sel_pruned", 0.3, 300, 100, [[1, 0], [3, 2]], s_ref), "edge_sel_stats": stats([4, 2, 2])},
        "edge_sel_pruned_budget": {**_fake("edge_sel_pruned_budget", 0.6, 200, 100, [[0, 2], [3, 2]], s_ref),
                                   "edge_sel_stats": stats([4, 4, 4])},
    }
    rows = summarize(results, workload, 2, budget=250)
    assert rows["edge_sel_pruned"]["candidate_layers"] == pytest.approx(8 / 12)
    assert rows["edge_sel_pruned_budget"]["top_k_identical"] == 0.5   # timed rank() output is what is judged
    checks = {c["check"]: c["pass"] for c in acceptance_pruned(rows, "yes_no")}
    assert checks["edge_sel_pruned: same top-K set as ort on >= 95% of queries"] is True
    assert checks["edge_sel_pruned: latency <= 0.35x bare session"] is True
    assert checks["edge_sel_pruned_budget: same top-K set as ort on >= 95% of queries"] is False
    assert checks["edge_sel_pruned_budget: peak RSS <= 0.25x bare session"] is True
    assert checks["edge_sel_pruned_budget: latency <= 0.5x bare session"] is False
    enc = {c["check"]: c["pass"] for c in acceptance_pruned(rows, "cross_encoder")}
    assert "edge_sel_pruned: latency <= 0.5x bare session" in enc and not any("overlap" in c for c in enc)


def test_bench_rejects_bad_options():
    assert main(["--model", "unused", "--configs", "nope"]) == 2
    assert main(["--model", "unused", "--n-docs", "5", "--top-k", "10"]) == 2
