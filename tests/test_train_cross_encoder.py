"""The cross-encoder training script: its text never overlaps the benchmark/calibration text, and it trains,
caches and exports (tiny random BERT, a few steps)."""

import json
from dataclasses import replace

import pytest

from benchmarks import train_cross_encoder as tce


@pytest.fixture(scope="module")
def data():
    return tce.build_data()


def test_modules_are_disjoint_from_benchmark_and_calibration():
    from edge_sel.export.passes.calibrate import CALIBRATION_MODULES
    from edge_sel.export.textdata import MODULES

    mods = tce.training_modules()
    assert mods and not set(mods) & set(MODULES) and not set(mods) & set(CALIBRATION_MODULES)
    # held-out packages contribute modules of their own (e.g. logging.handlers; the benchmark's `logging` is not one)
    assert all(any(tce.is_heldout(m) for m in mods if m.split('.')[0] == p) for p in tce.HELDOUT_PACKAGES)


def test_real_data_is_disjoint_from_benchmark_text(data):
    from edge_sel.export.passes.calibrate import calibration_items
    from edge_sel.export.textdata import docstring_items

    assert len(data.train) > 500 and len(data.heldout) > 60
    info = tce.check_disjoint(data)
    assert info["benchmark_or_calibration_overlap"] == 0
    bench = {t for _, q, p in docstring_items() for t in (q, p)} | {t for q, p in calibration_items() for t in (q, p)}
    ours = {t for p in data.train + data.heldout for t in (p.query, p.passage)}
    assert not ours & bench
    # no benchmark passage is contained in a training/held-out passage (re-exported or extended docstrings)
    ours_passages = [p.passage for p in data.train + data.heldout]
    for _, _, bp in docstring_items():
        assert not any(bp in p for p in ours_passages), bp[:80]
    assert all(tce.is_heldout(p.name) for p in data.heldout) and not any(tce.is_heldout(p.name) for p in data.train)


def test_check_disjoint_fails_on_overlap(data):
    from edge_sel.export.passes.calibrate import calibration_items
    from edge_sel.export.textdata import docstring_items

    name, q, p = docstring_items()[3]
    leaked = replace(data, train=data.train + [tce.Pair(name, q, p)])
    with pytest.raises(ValueError, match="benchmark pool"):
        tce.check_disjoint(leaked)
    cq, cp = calibration_items()[0]
    leaked = replace(data, train=data.train[:10] + [tce.Pair("x.y", "A query that is new here.", cp)])
    with pytest.raises(ValueError, match="not disjoint"):
        tce.check_disjoint(leaked)
    leaked = replace(data, train=data.train + data.heldout[:1])
    with pytest.raises(ValueError, match="held-out"):
        tce.check_disjoint(leaked)
    # a module of the benchmark pool slipped into the module list: refused even when no text filter ran
    unfiltered = tce.build_data(modules=["json", "turtle"], forbidden=set())
    with pytest.raises(ValueError, match="modules shared"):
        tce.check_disjoint(unfiltered)


def test_tiny_training_run_caches_and_exports(tmp_path, data):
    from tiny_models import make_bert

    base = make_bert(tmp_path / "tiny")
    hyper = tce.Hyper(steps=3, queries_per_step=2, group=3, hard_negatives=1, hard_pool=4, max_length=48,
                      eval_max_length=64, eval_queries=4, eval_candidates=5, export_max_length=128)
    small = tce.Data(data.train[:24], data.heldout[:8], data.modules, data.info)
    out = tmp_path / "ce"
    rep = tce.train(out, hyper, base=base, data=small, progress=False)
    assert not rep["cache_hit"] and (out / tce.REPORT).is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_labels"] == 1 if "num_labels" in cfg else len(cfg["id2label"]) == 1
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    ev = rep["eval"]
    for k in ("trained_cross_encoder", "untrained_cross_encoder", "bi_encoder_cosine"):
        assert 0.0 <= ev[k]["mrr@10"] <= 1.0
    assert ev["queries"] == 4 and len(rep["loss"]["every10"]) == 1
    assert not list(tmp_path.glob(".ce.*"))           # no staging leftovers

    again = tce.train(out, hyper, base=base, data=small, progress=False)
    assert again["cache_hit"] and again["key"] == rep["key"]
    # deterministic: the same run elsewhere gives the same weights; another seed gives another key
    twin = tce.train(tmp_path / "ce2", hyper, base=base, data=small, progress=False)
    assert twin["weights_sha256"] == rep["weights_sha256"]
    assert tce.cache_key(replace(hyper, seed=1), small, "x") != tce.cache_key(hyper, small, "x")

    from edge_sel.export import export
    from edge_sel.runtime import Reranker

    bundle = export(out, tmp_path / "bundle", task="rerank", verify=True)
    rr = Reranker(bundle)
    assert rr.bundle.scoring == "cross_encoder"
    res = rr.rank(small.heldout[0].query, [p.passage for p in small.heldout[:5]], top_k=3)
    assert len(res) == 3
    rr.close()
