"""The helpers of ``python -m benchmarks.cross_domain`` (a script of the checkout, not installed) on the tiny random
Llama rerank bundle: traces recorded by real calls and cached, cut to fewer candidates, picked per domain and N,
replayed per rule and per stored schedule, and the two Markdown tables. Offline: the ``builtin`` domain only."""

import numpy as np
import pytest

from benchmarks import cross_domain as xd


@pytest.fixture(scope="module")
def recorded(llama_bundle, tmp_path_factory):
    cache = tmp_path_factory.mktemp("xd_cache")
    paths = xd.record(llama_bundle, "builtin", 3, 8, 0, cache, log=lambda m: None)
    return cache, paths


def test_record_writes_one_trace_per_query_and_reuses_the_cache(llama_bundle, recorded):
    from edge_sel.export.domains import domain_queries
    from edge_sel.runtime import Reranker

    cache, paths = recorded
    assert paths == [xd.trace_path(cache, llama_bundle, "builtin", 8, qi, 0) for qi in range(3)]
    assert all(p.is_file() for p in paths)
    assert paths[0].parent.name == "builtin-n8-s0" and paths[0].name == "q000.npz"
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert xd.record(llama_bundle, "builtin", 3, 8, 0, cache, log=lambda m: pytest.fail(m)) == paths  # nothing re-run
    assert [p.stat().st_mtime_ns for p in paths] == stamps

    traces = xd.load_traces(paths)
    rr = Reranker(llama_bundle, pruning="off")
    try:
        n_layers = len(rr.bundle.spec.layers)
        for (query, docs), t in zip(domain_queries("builtin", 3, 8, 0), traces):
            np.testing.assert_allclose(t.final, rr.predict(query, docs), rtol=1e-4, atol=1e-4)
            assert t.pooled.shape[:2] == (n_layers, 8)
            assert t.extra["tokens"] > 0 and t.extra["seconds"] > 0
    finally:
        rr.close()


def test_load_traces_cuts_to_the_first_candidates(recorded):
    _, paths = recorded
    full, cut = xd.load_traces(paths), xd.load_traces(paths, 5)
    for a, b in zip(full, cut):
        np.testing.assert_array_equal(b.final, a.final[:5])
        np.testing.assert_array_equal(b.pooled, a.pooled[:, :5])
        np.testing.assert_array_equal(b.influence, a.influence)


def test_bundle_key_names_the_layers_not_the_schedule(llama_bundle, bert_ce_bundle, tmp_path):
    import shutil

    from edge_sel.export.passes.calibrate import calibrate

    copy = tmp_path / llama_bundle.name
    shutil.copytree(llama_bundle, copy)
    calibrate(copy, n_queries=4, n_candidates=8, top_k=3)
    assert xd._bundle_key(copy) == xd._bundle_key(llama_bundle)      # recorded states stay valid after calibration
    assert xd._bundle_key(bert_ce_bundle) != xd._bundle_key(llama_bundle)


def test_held_traces_takes_the_recorded_set_with_most_queries_and_cuts_it(llama_bundle, recorded, tmp_path):
    cache, paths = recorded
    # a second, smaller recording at N=6 with 2 queries: N=6 must still come from the 3-query N=8 set
    xd.record(llama_bundle, "builtin", 2, 6, 0, cache, log=lambda m: None)
    held = xd.held_traces(cache, llama_bundle, ["builtin"], [6, 8], 3, 0)
    assert sorted(held) == ["builtin N=6 (3q)", "builtin N=8 (3q)"]
    assert [len(t.final) for t in held["builtin N=6 (3q)"]] == [6, 6, 6]
    full = xd.load_traces(paths)
    np.testing.assert_array_equal(held["builtin N=6 (3q)"][1].final, full[1].final[:6])
    assert xd.held_traces(cache, llama_bundle, ["builtin"], [16], 3, 0) == {}  # nothing recorded that large


def test_evaluate_replays_every_rule_and_a_stored_empty_schedule(llama_bundle, recorded):
    _, paths = recorded
    traces = xd.load_traces(paths)
    res = xd.evaluate(llama_bundle, traces, {"again": traces}, 3, ["margin", "rank"], [2.0], {"as exported": llama_bundle})
    rows = {r["schedule"]: r for r in res["rows"]}
    assert set(rows) == {"margin (validated)", "margin x2", "rank (validated)", "rank x2", "as exported"}
    for r in rows.values():
        for name in ("calibration", "again"):
            v = r[name]
            assert 0.0 <= v["layer_work_saved"] < 1.0 and 0.0 <= v["topk_identical"] <= 1.0
    # a schedule fitted on these traces keeps every calibration query's top-K (split-half validation)
    assert rows["margin (validated)"]["calibration"]["topk_identical"] == 1.0
    stored = rows["as exported"]  # no schedule in the bundle: the full model on every query
    assert stored["layers"] == [] and stored["again"] == {"layer_work_saved": 0.0, "topk_recall": 1.0,
                                                            "topk_identical": 1.0, "overlap": 1.0}
    table = xd.render({"domains": ["again"], "rows": res["rows"]})
    assert table.splitlines()[0].startswith("| schedule | layers | params | calibration: same / overlap / saved | again:")
    assert "| as exported | [] |  | 100% / 1.000 / 0% | 100% / 1.000 / 0% |" in table
    assert len(table.splitlines()) == 2 + len(res["rows"])


def test_render_latency_shows_ratios_and_failures():
    ok = {"ok": True, "queries": 3, "ort_s": 20.0, "full_s": 7.5, "pruned_s": 7.0, "ratio": 0.35, "cpu_ratio": 0.34,
          "full_ratio": 0.375, "topk_identical": 1.0, "overlap": 1.0, "layer_work_saved": 0.0, "loadavg": (2.5, 2.0, 1.0)}
    table = xd.render_latency({"botchan N=64": ok, "wordnet N=64": {"ok": False, "errors": {"ort": "boom"}},
                               "botchan N=128": {**ok, "cpu_ratio": None, "layer_work_saved": None}})
    lines = table.splitlines()
    assert lines[2] == ("| botchan N=64 | 3 | 20.00 | 7.50 | 7.00 | 0.350 / 0.340 | 0.375 | 100% | 1.000 | 0.0% | 2.5 |")
    assert lines[3] == "| wordnet N=64 | failed: {'ort': 'boom'} |"
    assert "| 0.350 / - |" in lines[4] and "| 0.0% |" in lines[4]
