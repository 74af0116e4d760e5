"""Early ranking: cluster pruning properties, calibration round-trip, pruned runtime, dropped layers."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import InputError
from edge_sel.runtime import Reranker
from edge_sel.export.passes.calibrate import calibrate, calibration_items
from edge_sel.export.passes.schedule_search import choose_schedule, simulate
from edge_sel.runtime.rerank import Schedule
from edge_sel.runtime.rerank.pruning import clusters_1d, prune_mask, prune_rank_mask


# ---- properties of the pruning rule ----------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(scores=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=60),
       k=st.integers(1, 20), margin=st.floats(0, 10), floor=st.none() | st.integers(0, 30), gap=st.floats(0, 5))
def test_prune_mask_keeps_k_and_everything_within_margin(scores, k, margin, floor, gap):
    s = np.array(scores)
    keep = prune_mask(s, k, margin, floor, gap)
    n = len(s)
    assert keep.sum() >= min(n, max(k, floor or 0))  # never fewer than K (or the floor) live
    if n > k:
        kth = np.sort(s)[::-1][k - 1]
        assert keep[s >= kth - margin].all()  # anything that could still reach the top-K under the margin stays
    # whole clusters are kept or dropped (except the floor top-up, which only adds the best dropped ones)
    if keep.sum() > min(n, max(k, floor or 0)):
        for members in clusters_1d(s, gap):
            assert keep[members].all() or not keep[members].any()


def _synthetic_trajectories(seed, n, layers, noise, queries=6):
    """Score trajectories that converge to each query's final score (noise shrinks with depth)."""
    from edge_sel.export.passes.traces import Trace

    rng = np.random.default_rng(seed)
    traces, scores = [], []
    for _ in range(queries):
        final = rng.normal(size=n)
        scores.append(np.stack([final + rng.normal(size=n) * noise * (layers - 1 - l) / layers for l in range(layers)]))
        traces.append(Trace(final, np.zeros((layers, n, 1), np.float32), None, np.zeros(layers)))
    return scores, traces


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(12, 80), layers=st.integers(2, 8), k=st.integers(1, 10),
       safety=st.floats(1.0, 3.0), noise=st.floats(0.05, 3.0))
def test_calibrated_schedule_always_keeps_final_topk_on_calibration_trajectories(seed, n, layers, k, safety, noise):
    """Synthetic score trajectories that converge to the final score: the schedule chosen on them never loses a final top-K member."""
    scores, traces = _synthetic_trajectories(seed, n, layers, noise)
    chosen, margins, info = choose_schedule(scores, traces, k, safety=safety, max_layers=3, min_gain=0.0)
    assert all(0 <= l < layers - 1 for l in chosen)
    r = simulate(scores, traces, k, chosen, margins)
    assert r["topk_recall"] == 1.0 and r["topk_identical"] == 1.0
    assert 0.0 <= r["layer_work_saved"] < 1.0


# ---- calibration data -----------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(scores=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=60),
       keep_n=st.integers(0, 70), k=st.integers(1, 20), floor=st.none() | st.integers(0, 30))
def test_prune_rank_mask_keeps_the_best_fraction_and_never_fewer_than_k(scores, keep_n, k, floor):
    s = np.array(scores)
    keep = prune_rank_mask(s, keep_n, k, floor)
    n = len(s)
    want = min(n, max(keep_n, k, floor or 0))
    assert keep.sum() >= want
    if keep.sum() > want:  # only ties at the cut can add survivors
        assert len(set(s[keep]) & set(s[~keep])) == 0 and s[keep].min() == np.sort(s)[::-1][want - 1]
    if (~keep).any():
        assert s[keep].min() >= s[~keep].max()  # nobody dropped scores above a survivor


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(12, 80), layers=st.integers(2, 8), k=st.integers(1, 10),
       safety=st.floats(1.0, 2.0), noise=st.floats(0.05, 3.0))
def test_rank_schedule_keeps_final_topk_on_calibration_trajectories(seed, n, layers, k, safety, noise):
    scores, traces = _synthetic_trajectories(seed, n, layers, noise)
    chosen, fracs, _ = choose_schedule(scores, traces, k, safety=safety, max_layers=3, min_gain=0.0, rule="rank")
    assert all(0 < f <= 1 for f in fracs)
    r = simulate(scores, traces, k, chosen, fracs, rule="rank")
    assert r["topk_recall"] == 1.0 and r["topk_identical"] == 1.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(12, 80), layers=st.integers(2, 8), k=st.integers(1, 10),
       noise=st.floats(0.05, 3.0), rule=st.sampled_from(["rank", "margin"]))
def test_oracle_work_bounds_every_schedule_that_keeps_the_topk(seed, n, layers, k, noise, rule):
    """benchmarks/pruning_bound.py: no schedule that keeps the final top-K does less work than the oracle."""
    from benchmarks.pruning_bound import oracle_work

    scores, traces = _synthetic_trajectories(seed, n, layers, noise)
    chosen, params, _ = choose_schedule(scores, traces, k, safety=1.0, max_layers=3, min_gain=0.0, rule=rule)
    r = simulate(scores, traces, k, chosen, params, rule=rule)
    assert r["topk_identical"] == 1.0
    oracle = [oracle_work(s, t.final, k) for s, t in zip(scores, traces)]
    assert 1.0 - r["layer_work_saved"] >= np.mean([o["every_layer_work"] for o in oracle]) - 1e-12
    for o in oracle:
        assert (n + (layers - 1) * k) / (n * layers) - 1e-12 <= o["every_layer_work"] <= o["one_layer_work"] + 1e-12
        assert o["one_layer_work"] <= 1.0 + 1e-12


def test_oracle_work_on_exact_and_reversed_scorers():
    from benchmarks.pruning_bound import oracle_work

    f = np.random.default_rng(0).normal(size=128)
    exact = oracle_work(np.tile(f, (6, 1)), f, 10)
    assert exact["every_layer_work"] == pytest.approx((128 + 5 * 10) / (128 * 6))
    assert oracle_work(np.tile(-f, (6, 1)), f, 10)["every_layer_work"] == 1.0


def test_calibration_text_is_disjoint_from_benchmark_text():
    from edge_sel.export.passes.calibrate import CALIBRATION_MODULES
    from edge_sel.export.textdata import MODULES, docstring_pairs

    assert not set(MODULES) & set(CALIBRATION_MODULES)
    bench = {p for _, p in docstring_pairs()} | {q for q, _ in docstring_pairs()}
    cal = calibration_items()
    assert len(cal) > 200
    assert not ({p for _, p in cal} & bench)


# ---- calibrated bundles ---------------------------------------------------------------------------
def _copy(src, tmp_path_factory, name):
    dst = tmp_path_factory.mktemp(name) / "b"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def calibrated(bert_ce_bundle, bert_bi_bundle, llama_bundle, tmp_path_factory):
    out = {}
    for name, src in (("ce", bert_ce_bundle), ("bi", bert_bi_bundle), ("yes_no", llama_bundle)):
        b = _copy(src, tmp_path_factory, f"cal_{name}")
        rep = calibrate(b, "builtin", top_k=5, n_queries=6, n_candidates=24)
        out[name] = (b, rep)
    return out


@pytest.mark.parametrize("name", ["ce", "bi", "yes_no"])
def test_schedule_round_trips_through_manifest(calibrated, name):
    path, rep = calibrated[name]
    b = Bundle.open(path, verify=True)  # hashes still match after the in-place rewrite
    raw = b.manifest["schedule"]
    assert raw == rep["schedule"]
    sched = Schedule.from_manifest(raw)
    assert sched.to_manifest() == raw
    sched.validate(b)
    assert sched.top_k == 5 and sched.method in ("probe", "head", "cosine")
    assert raw["agreement"]["topk_recall"] == 1.0  # the calibration set's final top-K is always kept
    if sched.method == "probe":
        assert b.array("early_probe").shape[0] == len(b.layers)
    assert subprocess.run([sys.executable, "-m", "edge_sel.cli", "verify", str(path)], capture_output=True).returncode == 0


def test_recalibration_replaces_probe_file(calibrated, bert_ce_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bert_ce_bundle, b)
    calibrate(b, "builtin", top_k=3, n_queries=4, n_candidates=12, method="probe")
    first = Bundle.open(b).manifest["arrays"]["early_probe"]["file"]
    calibrate(b, "builtin", top_k=3, n_queries=4, n_candidates=12, method="probe", seed=1)
    bundle = Bundle.open(b, verify=True)
    second = bundle.manifest["arrays"]["early_probe"]["file"]
    assert first != second and not (b / first).exists()
    assert sorted(p.name for p in (b / "calibration").iterdir()) == [second.split("/")[-1]]


@pytest.mark.parametrize("fixture,method", [("bert_ce_bundle", "head"), ("llama_bundle", "head"), ("bert_bi_bundle", "cosine")])
def test_forced_pruning_compacts_and_keeps_exact_scores(fixture, method, request, docs):
    """A schedule that prunes hard at layer 0: survivors' scores equal the full model's, dropped rank below."""
    bundle = request.getfixturevalue(fixture)
    documents, queries = docs
    sched = {"method": method, "top_k": 5, "layers": [{"layer": 0, "margin": 0.0}], "floor": 8}
    rr = Reranker(bundle, pruning=sched)
    full = rr.predict(queries[0], documents)  # predict never prunes
    assert rr.last_stats["layer_work_saved"] == 0.0
    res = rr.rank(queries[0], documents, top_k=12)  # top_k > calibrated 5: runs unpruned
    assert rr.last_stats["n_pruned"] == 0 and "off for this call" in rr.last_stats["pruning"]
    res = rr.rank(queries[0], documents, top_k=5)
    st_ = rr.last_stats
    assert len(res) == 5
    live = st_["live_per_layer"]
    assert live[0] == len(documents) and live[1] < len(documents) and live[1] >= 8
    assert st_["layer_work_saved"] > 0 and st_["n_pruned"] == len(documents) - live[-1]
    for r in res:
        assert "pruned_at_layer" not in r
        assert abs(r["score"] - full[r["corpus_id"]]) < 1e-4  # compaction does not change the computation
    everything = rr.rank(queries[0], documents, top_k=5)
    assert [r["corpus_id"] for r in everything] == [r["corpus_id"] for r in res]
    allres = rr.rank(queries[0], documents, top_k=None)  # full ordering: dropped candidates listed last
    assert len(allres) == len(documents) and "pruned_at_layer" in allres[-1]


@pytest.mark.parametrize("fixture", ["bert_ce_bundle", "llama_bundle"])
def test_rank_rule_schedule_keeps_its_fraction(fixture, request, docs, tmp_path):
    """A rank schedule keeps ceil(keep x N) candidates after its layer; survivors' scores equal the full model's;
    it round-trips through a bundle manifest."""
    bundle = request.getfixturevalue(fixture)
    documents, queries = docs
    raw = {"method": "head", "rule": "rank", "top_k": 3, "layers": [{"layer": 0, "keep": 0.5}]}
    rr = Reranker(bundle, pruning=raw)
    full = rr.predict(queries[0], documents)
    res = rr.rank(queries[0], documents, top_k=3)
    live = rr.last_stats["live_per_layer"]
    assert live[0] == len(documents) and live[1] == int(np.ceil(0.5 * len(documents)))
    for r in res:
        assert abs(r["score"] - full[r["corpus_id"]]) < 1e-4
    sched = Schedule.from_manifest(raw)
    assert sched.rule == "rank" and sched.keep == [0.5] and Schedule.from_manifest(sched.to_manifest()).to_manifest() == sched.to_manifest()
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(InputError, match="keep fractions"):
            Reranker(bundle, pruning={**raw, "layers": [{"layer": 0, "keep": bad}]})
    with pytest.raises(InputError, match="rule"):
        Reranker(bundle, pruning={**raw, "rule": "vibes"})


def test_calibrate_rank_rule_round_trips(bert_ce_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bert_ce_bundle, b)
    rep = calibrate(b, "builtin", top_k=3, n_queries=6, n_candidates=16, method="head", rule="rank")
    bundle = Bundle.open(b, verify=True)
    raw = bundle.manifest["schedule"]
    assert raw["rule"] == "rank" == rep["rule"] and set(rep["candidates"]) == {"head/rank"}
    assert all(0 < e["keep"] <= 1 for e in raw["layers"])
    assert raw["agreement"]["topk_recall"] == 1.0
    Schedule.from_manifest(raw).validate(bundle)
    with pytest.raises(InputError, match="rule"):
        calibrate(b, "builtin", top_k=3, n_queries=4, n_candidates=16, rule="sideways")


def test_calibrate_estimates_before_tracing_and_counts_every_token(bert_ce_bundle, tmp_path):
    """The first progress report (before any query is traced) carries an estimate timed on a few real candidates;
    the tokens reported done at the end are the total announced up front. Builtin passages are capped."""
    from edge_sel.export.domains import MAX_WORDS, domain_queries

    b = tmp_path / "b"
    shutil.copytree(bert_ce_bundle, b)
    calls = []
    calibrate(b, "builtin", top_k=3, n_queries=4, n_candidates=12, method="head", progress=lambda i, n, info: calls.append((i, n, info)))
    first, last = calls[0], calls[-1]
    assert first[0] == 0 and first[1] == 4 and first[2]["estimate_s"] > 0 and first[2]["tokens_per_s"] > 0
    assert last[0] == 4 and last[2]["tokens_done"] == first[2]["tokens_total"] > 0
    assert [c[0] for c in calls] == list(range(5))
    assert all(len(d.split()) <= MAX_WORDS for _, docs in domain_queries("builtin", 4, 12, 0) for d in docs)


def test_pruned_candidates_rank_below_survivors(bert_ce_bundle, docs):
    """rank(top_k=None) lists every document: survivors by final score, then dropped ones (later drops first)."""
    documents, queries = docs
    sched = {"method": "head", "top_k": 3, "layers": [{"layer": 0, "margin": 0.0}, {"layer": 1, "margin": 0.0}]}
    rr = Reranker(bert_ce_bundle, pruning=sched)
    res = rr.rank(queries[0], documents, top_k=None)
    assert sorted(r["corpus_id"] for r in res) == list(range(len(documents)))
    layers = [r.get("pruned_at_layer", 99) for r in res]
    assert layers == sorted(layers, reverse=True) and layers[0] == 99 and layers[-1] == 0
    n_live = sum(1 for x in layers if x == 99)
    assert n_live == rr.last_stats["live_per_layer"][-1] >= 3
    full = rr.predict(queries[0], documents)
    survivors = [r["score"] for r in res[:n_live]]
    assert survivors == sorted(survivors, reverse=True)
    for r in res[:n_live]:
        assert abs(r["score"] - full[r["corpus_id"]]) < 1e-4


def test_schedule_without_layers_runs_depth_first(bert_ce_bundle, docs):
    """An empty calibrated schedule (no safe layer) prunes nothing, so rank() needs no monolithic forwarding."""
    documents, queries = docs
    rr = Reranker(bert_ce_bundle, pruning={"method": "head", "top_k": 3, "layers": []})
    res = rr.rank(queries[0], documents, top_k=3)
    assert rr.last_stats["order"] == "depth-first" and rr.last_stats["n_pruned"] == 0
    pruned = Reranker(bert_ce_bundle, pruning={"method": "head", "top_k": 3, "layers": [{"layer": 0, "margin": 0.0}]})
    pruned.rank(queries[0], documents, top_k=3)
    assert pruned.last_stats["order"] == "monolithic"
    full = rr.predict(queries[0], documents)
    assert [r["corpus_id"] for r in res] == np.argsort(-full, kind="stable")[:3].tolist()


@pytest.mark.parametrize("name", ["ce", "bi", "yes_no"])
def test_calibrated_auto_pruning_ranks(calibrated, name, docs):
    path, rep = calibrated[name]
    documents, queries = docs
    pr = Reranker(path)  # pruning="auto" by default
    full = Reranker(path, pruning="off")
    for q in queries[:2]:
        a = pr.rank(q, documents, top_k=5)
        b = full.rank(q, documents, top_k=5)
        assert len(a) == 5
        assert pr.last_stats["pruning"].startswith(rep["method"])
        assert 0.0 <= pr.last_stats["layer_work_saved"] < 1.0
        assert len(set(r["corpus_id"] for r in a) & set(r["corpus_id"] for r in b)) >= 3


# ---- bad input ------------------------------------------------------------------------------------
def test_schedule_with_layers_the_bundle_lacks(bert_ce_bundle):
    with pytest.raises(InputError, match="layers 0..2"):
        Reranker(bert_ce_bundle, pruning={"method": "head", "top_k": 5, "layers": [{"layer": 7, "margin": 1.0}]})
    with pytest.raises(InputError, match="probe"):
        Reranker(bert_ce_bundle, pruning={"method": "probe", "top_k": 5, "layers": [{"layer": 0, "margin": 1.0}], "probe": "nope"})
    with pytest.raises(InputError, match="cosine"):
        Reranker(bert_ce_bundle, pruning={"method": "cosine", "top_k": 5, "layers": [{"layer": 0, "margin": 1.0}]})
    with pytest.raises(InputError, match="malformed"):
        Reranker(bert_ce_bundle, pruning={"method": "head", "layers": [{"layer": 0}]})
    with pytest.raises(InputError, match="source layers"):
        Reranker(bert_ce_bundle, pruning={"method": "head", "top_k": 5, "layers": [{"layer": 1, "margin": 1.0}], "source_layers": [2]})


def test_pruning_on_bundle_without_schedule(bert_ce_bundle, docs):
    with pytest.raises(InputError, match="edge-sel calibrate"):
        Reranker(bert_ce_bundle, pruning="on")
    rr = Reranker(bert_ce_bundle, pruning="auto")  # falls back to no pruning, says so
    rr.rank(docs[1][0], docs[0], top_k=3)
    assert "not calibrated" in rr.last_stats["pruning"] and rr.last_stats["layer_work_saved"] == 0.0
    with pytest.raises(InputError, match="pruning"):
        Reranker(bert_ce_bundle, pruning="sometimes")


def test_calibration_data_with_fewer_candidates_than_k(bert_ce_bundle, tmp_path):
    f = tmp_path / "cal.jsonl"
    f.write_text("\n".join(json.dumps({"query": f"question {i}", "documents": ["a", "b", "c"]}) for i in range(3)))
    with pytest.raises(InputError, match="3 candidates"):
        calibrate(bert_ce_bundle, str(f), top_k=5, write=False)
    f.write_text('{"query": 1}\n')
    with pytest.raises(InputError, match="line 1"):
        calibrate(bert_ce_bundle, str(f), top_k=5, write=False)
    with pytest.raises(InputError, match="not found"):
        calibrate(bert_ce_bundle, str(tmp_path / "missing.jsonl"), write=False)


# ---- CLI ------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_sel.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_calibrate_then_rerank_with_pruning(bert_ce_bundle, tmp_path, docs):
    b = tmp_path / "b"
    shutil.copytree(bert_ce_bundle, b)
    d = tmp_path / "d.txt"
    d.write_text("\n".join(docs[0]) + "\n")
    out = _cli("rerank", b, "-q", docs[1][0], "-d", d, "-k", 3, "--pruning", "on")
    assert out.returncode == 2 and "edge-sel calibrate" in out.stderr
    out = _cli("calibrate", b, "--top-k", 3, "--queries", 4, "--candidates", 16, "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["schedule"]["top_k"] == 3
    assert _cli("verify", b).returncode == 0
    out = _cli("rerank", b, "-q", docs[1][0], "-d", d, "-k", 3, "--pruning", "on", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["results"]) == 3 and "layer_work_saved" in data["stats"]
    out = _cli("rerank", b, "-q", docs[1][0], "-d", d, "-k", 3)
    assert out.returncode == 0 and "pruning:" in out.stdout


def test_runtime_calibrate_and_prune_never_import_torch(bert_bi_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bert_bi_bundle, b)
    code = r"""
import sys, json
from edge_sel.export.passes.calibrate import calibrate
from edge_sel.runtime import Reranker
calibrate(sys.argv[1], "builtin", top_k=2, n_queries=3, n_candidates=8)
rr = Reranker(sys.argv[1], pruning="on")
rr.rank("Return the number of items.", ["Return the length.", "Sort a list.", "Open a file.", "Close it.", "Read bytes."], top_k=2)
print(json.dumps([m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum")]))
"""
    out = subprocess.run([sys.executable, "-c", code, str(b)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ---- dropped layers -------------------------------------------------------------------------------
def test_drop_layers_bundle_loads_and_runs(bert_ce_bundle, tmp_path, docs, caplog):
    from edge_sel.export.passes.drop_layers import drop_layers

    b = tmp_path / "b"
    shutil.copytree(bert_ce_bundle, b)
    calibrate(b, "builtin", top_k=3, n_queries=3, n_candidates=10)
    caplog.clear()
    res = drop_layers(b, 1, n_queries=3, n_candidates=12)
    assert "truncated" not in caplog.text  # measuring on calibration text: no warning for every call it makes
    bundle = Bundle.open(b, verify=True)
    assert len(bundle.layers) == 2 and len(res["drop"]) == 1
    assert bundle.manifest["dropped_layers"] == [res["drop"][0]]
    assert [l["index"] for l in bundle.layers] == [0, 1]
    assert sorted(l["source_index"] for l in bundle.layers + [{"source_index": res["drop"][0]}]) == [0, 1, 2]
    assert bundle.manifest["schedule"] is None and not bundle.has_array("early_probe")  # invalidated by the drop
    # the first-token-only final graph goes with the last layer; a full layer then ends the bundle
    assert bundle.manifest["final_layer_output"] == ("all_tokens" if res["drop"][0] == 2 else "first_token")
    cost = bundle.manifest["drop_cost"]
    assert 0.0 <= cost["top10_overlap"] <= 1.0
    documents, queries = docs
    assert len(Reranker(bundle).rank(queries[0], documents, top_k=4)) == 4
    d = tmp_path / "d.txt"
    d.write_text("\n".join(documents[:10]) + "\n")
    out = _cli("rerank", b, "-q", queries[0], "-d", d, "-k", 3)
    assert out.returncode == 0 and "dropped layers" in out.stdout
    with pytest.raises(InputError, match="at most 1"):
        drop_layers(b, 2)


def test_drop_layers_auto_and_export_refuses_too_many(tmp_path):
    from edge_sel.export import export
    from edge_sel.export.passes.drop_layers import drop_layers
    from tiny_models import make_bert

    hf = make_bert(tmp_path / "hf", cross_encoder=True, layers=2)
    with pytest.raises(InputError, match="between 0 and 1"):
        export(hf, tmp_path / "x", drop_layers=2)
    assert not (tmp_path / "x").exists()
    out = export(hf, tmp_path / "b", drop_layers="auto", calibrate=True)
    b = Bundle.open(out, verify=True)
    assert 1 <= len(b.layers) <= 2
    assert b.manifest["schedule"] is not None  # calibrated after dropping
    Schedule.from_manifest(b.manifest["schedule"]).validate(b)
    if b.manifest["dropped_layers"]:
        assert b.manifest["drop_cost"]["top10_overlap"] >= 0.9
    with pytest.raises(InputError, match="non-negative"):
        drop_layers(out, -1)


# ---- shared-prefix reuse (decoder rerankers) -------------------------------------------------------
def test_prefix_reuse_matches_full_prompt_and_drops_with_qkv(llama_bundle, tmp_path, docs):
    """Decoder rerank bundles split each layer into qkv + attn graphs; the prefix runs once, scores are unchanged."""
    from edge_sel.export import export
    from edge_sel.export.passes.drop_layers import drop_layers
    from tiny_models import make_decoder

    split = Bundle.open(llama_bundle)
    assert "qkv" in split.layers[0] and split.manifest["layer_io"]["prefix_reuse"]
    plain = export(make_decoder(tmp_path / "hf"), tmp_path / "plain", prefix_reuse=False)
    assert "qkv" not in Bundle.open(plain).layers[0]
    documents, queries = docs
    a, b = Reranker(split), Reranker(plain)
    for q in queries[:2]:
        np.testing.assert_allclose(a.predict(q, documents), b.predict(q, documents), atol=1e-3)
    assert a.last_stats["prefix_reuse_tokens"] > 0 and b.last_stats["prefix_reuse_tokens"] == 0
    d = tmp_path / "d"
    shutil.copytree(llama_bundle, d)
    res = drop_layers(d, 1, n_queries=2, n_candidates=12)
    bd = Bundle.open(d, verify=True)
    assert len(bd.layers) == 2 and len(bd.manifest["extra_graphs"]) == 2
    gone = f"layers/layer_{res['drop'][0]:03d}_qkv.onnx"
    assert gone not in bd.manifest["files"] and not (d / gone).exists()
    assert len(Reranker(bd).rank(queries[0], documents, top_k=3)) == 3


def test_final_layer_last_token_only_matches_full_layer(llama_bundle, docs):
    """The final layer of a prefix-reuse bundle runs attention rows + MLP for the head's token only; the scores
    equal those of the full final layer (every token) within 1e-3, with and without pruning, resident and streamed."""
    documents, queries = docs
    for budget in (None, "64MB"):
        rr = Reranker(llama_bundle, memory_budget=budget, pruning="off")
        fast = rr.predict(queries[0], documents)
        assert rr.last_stats["final_layer_last_token_only"]
        every_token = Reranker(llama_bundle, memory_budget=budget, pruning="off", last_token_final_layer=False)
        full = every_token.predict(queries[0], documents)
        assert not every_token.last_stats["final_layer_last_token_only"]
        np.testing.assert_allclose(fast, full, atol=1e-3)
        assert np.abs(fast - full).max() < 1e-4 and np.std(full) > 1e-3  # scores differ between docs: a real check


def test_ridge_from_sufficient_statistics_matches_a_direct_fit():
    """RidgeStats sums per-query Gram matrices; a direct ridge on the stacked, query-centred, standardised rows
    must give the same weights, and cross-fitted scores must come from probes that never saw their query."""
    from edge_sel.export.passes.traces import RidgeStats

    rng = np.random.default_rng(3)
    X = [rng.normal(size=(int(rng.integers(5, 12)), 7)) + rng.normal(size=7) for _ in range(9)]
    true_w = rng.normal(size=7)
    y = [x @ true_w + rng.normal(size=len(x)) * 0.3 + rng.normal() for x in X]
    stats = RidgeStats(X, y, folds=3)
    lam = 0.1
    Z = np.concatenate([x - x.mean(0) for x in X])
    t = np.concatenate([v - v.mean() for v in y])
    sd = Z.std(0)
    direct = np.linalg.solve((Z / sd).T @ (Z / sd) + lam * len(t) * np.eye(7), (Z / sd).T @ t) / sd
    w, info = stats.fit(lambdas=(lam,))
    assert np.allclose(w[:-1], direct, rtol=1e-4, atol=1e-5)
    assert np.isclose(w[-1], np.concatenate(y).mean() - np.concatenate(X).mean(0) @ direct, atol=1e-4)
    # cross-fitting: query 0 (fold 0) is scored by a probe fitted on folds 1 and 2 only
    keep = [i for i in range(9) if i % 3 != 0]
    Zk = np.concatenate([X[i] - X[i].mean(0) for i in keep])
    tk = np.concatenate([y[i] - y[i].mean() for i in keep])
    sdk = Zk.std(0)
    wk = np.linalg.solve((Zk / sdk).T @ (Zk / sdk) + lam * len(tk) * np.eye(7), (Zk / sdk).T @ tk) / sdk
    assert np.allclose(stats.crossfit(lam)[0], X[0] @ wk, rtol=1e-4, atol=1e-4)
    assert info["lambda"] == lam


# ---- shadow mode ------------------------------------------------------------------------------------------------
def test_shadow_runs_tighten_a_too_aggressive_schedule_until_misses_stop(bert_ce_bundle, docs, tmp_path):
    """A schedule that keeps only the top-K by the layer-0 logit lens loses top-K members; shadow runs (every call)
    find the misses, tighten the schedule and store it back atomically: the rewritten bundle verifies, shares
    every other file with the old one, and from then on the pruned top-K is the full model's on these queries."""
    from edge_sel.runtime.rerank.shadow import store_schedule

    documents, queries = docs
    b = tmp_path / "b"
    shutil.copytree(bert_ce_bundle, b)
    aggressive = Schedule.from_manifest({"method": "head", "rule": "rank", "top_k": 5, "layers": [{"layer": 0, "keep": 0.125}]})
    store_schedule(Bundle.open(b), aggressive)
    layer_file = Bundle.open(b).spec.layers[1].file
    inode = (b / layer_file).stat().st_ino
    full = Reranker(b, pruning="off")
    truth = [set(np.argsort(-full.predict(q, documents), kind="stable")[:5].tolist()) for q in queries]
    rr = Reranker(b, pruning="auto", shadow=1.0)
    misses_per_pass = []
    for _ in range(3):
        before = rr.shadow.stats.misses
        for q in queries:
            rr.rank(q, documents, top_k=5)
            st = rr.last_stats["shadow"]
            assert st["last"]["ran"] and st["runs"] == st["calls"] and st["seconds"] > 0 and st["cost"] > 0
        misses_per_pass.append(rr.shadow.stats.misses - before)
        if misses_per_pass[-1] == 0:
            break
    assert misses_per_pass[0] > 0, "the aggressive schedule should have lost top-K members"
    assert misses_per_pass[-1] == 0, misses_per_pass
    st = rr.last_stats["shadow"]
    assert st["stored"] == st["tightenings"] >= 1 and st["miss_rate"] > 0
    stored = Bundle.open(b, verify=True)  # the rewrite went through the writer: hashes hold
    raw = stored.manifest["schedule"]
    assert raw["shadow"]["misses"] == st["misses"] and raw["rule"] == "rank"
    kept = [e["keep"] for e in raw["layers"]]
    assert not kept or kept[0] > 0.125  # tightened (or given up), never loosened
    assert (b / layer_file).stat().st_ino == inode  # unchanged files are linked, not rewritten
    assert not [p for p in tmp_path.iterdir() if p.name != "b"]  # no staging or backup sibling left
    fresh = Reranker(b, pruning="auto")
    for q, t in zip(queries, truth):
        assert {r["corpus_id"] for r in fresh.rank(q, documents, top_k=5)} == t
    info = subprocess.run([sys.executable, "-m", "edge_sel.cli", "info", str(b), "--json"], capture_output=True, text=True)
    assert json.loads(info.stdout)["schedule"]["shadow"]["tightenings"] == st["tightenings"]


def test_shadow_fraction_is_checked_and_zero_means_off(bert_ce_bundle, docs):
    documents, queries = docs
    for bad in (-0.1, 1.5, "often", True):
        with pytest.raises(InputError, match="shadow"):
            Reranker(bert_ce_bundle, shadow=bad)
    rr = Reranker(bert_ce_bundle, pruning={"method": "head", "rule": "rank", "top_k": 5, "layers": [{"layer": 0, "keep": 0.5}]})
    rr.rank(queries[0], documents, top_k=5)
    assert rr.shadow is None and "shadow" not in rr.last_stats


@settings(max_examples=200, deadline=None)
@given(scores=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=60), k=st.integers(1, 20),
       param=st.floats(0, 5), floor=st.none() | st.integers(0, 30), gap=st.floats(0, 1))
def test_every_rule_keeps_k_and_what_its_need_says_it_must(scores, k, param, floor, gap):
    """For every rule: never fewer than max(K, floor) survivors; and any set of candidates whose need is <= the
    parameter survives (the need is what calibration and shadow tightening rely on)."""
    from edge_sel.runtime.rerank.rules import RULE_TYPES

    s = np.array(scores)
    n = len(s)
    for rule in RULE_TYPES.values():
        p = min(param, 1.0) if rule.max_param else param
        keep = rule.keep_mask(s, p, k, n, floor, gap)
        assert keep.sum() >= min(n, max(k, floor or 0))
        if n > k:
            top = np.random.default_rng(n + k).choice(n, min(k, n), replace=False)  # any set the final top-K might be
            if rule.need(s, top, k) <= p:
                assert keep[top].all()
