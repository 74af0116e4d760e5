"""The peer comparison ``python -m benchmarks.generate``: driver logic without any model: ratio mapping, run order, filters, resume,
incremental writing, scoring and the Markdown tables (workers are replaced by a fake)."""

from __future__ import annotations

import json

import pytest

import edge_sel.export.textdata as textdata  # the module: `edge_sel.export` is also a function name
from benchmarks import generate as bg
from benchmarks import peer_env


def test_kept_fraction_maps_to_kvpress_compression_ratio():
    assert bg.compression_ratio(0.2) == pytest.approx(0.8)
    assert bg.compression_ratio(0.1) == pytest.approx(0.9)
    assert bg.compression_ratio(0.5) == pytest.approx(0.5)
    assert bg.compression_ratio(1.0) == 0.0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            bg.compression_ratio(bad)
    cfgs = bg.build_configs(["mpcache"], [0.2, 0.1], ["kvpress"], ["SnapKVPress"])
    by = {c["name"]: c for c in cfgs}
    assert by["kvpress SnapKV @0.2"]["compression_ratio"] == pytest.approx(0.8)
    assert by["kvpress SnapKV @0.1"]["compression_ratio"] == pytest.approx(0.9)
    assert by["edge_sel mpcache @0.1"]["ratio"] == 0.1  # edge_sel gets the kept fraction itself


def test_run_order_follows_the_priorities():
    cfgs = bg.build_configs(["mpcache", "snapkv"], [0.5, 0.2, 0.1], ["transformers", "kvpress"], ["SnapKVPress", "TOVAPress"])
    names = [c["name"] for c in cfgs]
    assert names[:2] == ["edge_sel full", "transformers full"]
    assert names[2:5] == ["edge_sel mpcache @0.2", "kvpress SnapKV @0.2", "kvpress TOVA @0.2"]
    assert names[5:8] == ["edge_sel mpcache @0.1", "kvpress SnapKV @0.1", "kvpress TOVA @0.1"]
    assert names[8:10] == ["edge_sel snapkv @0.2", "edge_sel snapkv @0.1"]
    assert set(names[10:]) == {"edge_sel mpcache @0.5", "edge_sel snapkv @0.5", "kvpress SnapKV @0.5", "kvpress TOVA @0.5"}
    assert "transformers full" not in [c["name"] for c in bg.build_configs(["mpcache"], [0.2], ["kvpress"], [])]


def test_config_filter_by_substring():
    cfgs = bg.build_configs(["mpcache", "h2o"], [0.2, 0.1], ["transformers", "kvpress"], ["SnapKVPress"])
    assert [c["name"] for c in bg.select_configs(cfgs, "@0.2, full")] == [
        "edge_sel full", "transformers full", "edge_sel mpcache @0.2", "kvpress SnapKV @0.2", "edge_sel h2o @0.2"]
    assert bg.select_configs(cfgs, None) == cfgs


def test_answers_are_scored_by_exact_digits():
    assert bg.is_correct("1234567", " 1234567.")
    assert bg.is_correct("1234567", " 1,234,567")
    assert not bg.is_correct("1234567", " 123456")
    assert not bg.is_correct("1234567", " 7654321 1234")


def _fake_raw(name, ok=True):
    return {"config": name, "ppl": 40.0 if "full" in name else 45.0, "peak_rss_bytes": 300 * 2**20,
            "needle": [{"length": 1024, "depth": 0.5, "number": "1234567", "answer_ids": [1 if ok else 2],
                        "prefill_s": 1.0, "decode_ms_per_token": 50.0, "decode_cpu_ms_per_token": 90.0, "kv_bytes": 2**20},
                       {"length": 1024, "depth": 0.5, "number": "7654321", "error": "BudgetError: too small"}]}


def test_incremental_writing_and_resume(tmp_path, monkeypatch):
    out, md = tmp_path / "g.json", tmp_path / "g.md"
    calls = []

    class Tok:
        def encode(self, text, add_special_tokens=True):
            class E:
                ids = [len(w) for w in text.split()] + ([0] if add_special_tokens else [])
            return E()

        def decode(self, ids, skip_special_tokens=True):
            return " 1234567" if ids == [1] else " nope"

    def fake_run(cfg, tmp, bundle, py):
        part = "ppl" if cfg["ppl"] else str(cfg["cases"][0]["length"])
        calls.append((cfg["name"], part))
        if part != "ppl":
            assert {c["length"] for c in cfg["cases"]} == {int(part)}  # one length per process
            assert "context_ids" in cfg["cases"][0] and "question_ids" in cfg["cases"][0]
        if cfg["name"] == "edge_sel h2o @0.2" and part == "2048" and len(calls) > 2:
            raise RuntimeError("worker crashed")  # the first run only
        if (cfg["name"], part) == ("edge_sel mpcache @0.2", "1024"):  # everything before it is already on disk
            doc = json.loads(out.read_text())
            assert [r["config"] for r in doc["results"]] == ["edge_sel full"]
            assert doc["results"][0]["missing_parts"] == ["2048"]
            assert "edge_sel full" in md.read_text()
        raw = _fake_raw(cfg["name"]) if part != "ppl" else {"config": cfg["name"], "needle": [], "ppl": 41.0,
                                                            "peak_rss_bytes": 500 * 2**20}
        for r in raw["needle"]:
            r["length"] = int(part) if part != "ppl" else 0
        return raw

    monkeypatch.setattr(bg, "_tokenizer", lambda bundle: Tok())
    monkeypatch.setattr(bg, "_run_one", fake_run)
    monkeypatch.setattr(textdata, "botchan", lambda: "word " * 6000)
    args = ["--bundle", str(tmp_path), "--peers", "none", "--policies", "mpcache,h2o", "--ratios", "0.2",
            "--lengths", "1024,2048", "--depths", "0.5", "--needles", "2", "--out", str(out), "--markdown", str(md)]
    assert bg.main(args) == 0
    # tiers 1-3 (full, mpcache) at 1k + perplexity, then 2k; the other policies after them
    assert calls == [("edge_sel full", "1024"), ("edge_sel full", "ppl"), ("edge_sel mpcache @0.2", "1024"),
                     ("edge_sel mpcache @0.2", "ppl"), ("edge_sel full", "2048"), ("edge_sel mpcache @0.2", "2048"),
                     ("edge_sel h2o @0.2", "1024"), ("edge_sel h2o @0.2", "ppl"), ("edge_sel h2o @0.2", "2048")]
    doc = json.loads(out.read_text())
    res = {r["config"]: r for r in doc["results"]}
    assert "2048" in res["edge_sel h2o @0.2"]["failed_parts"] and res["edge_sel h2o @0.2"]["needle_n"] == 1
    full = res["edge_sel full"]
    assert full["needle_acc"] == 1.0 and full["errors"] == 2 and full["ppl"] == 41.0
    assert full["needle_cells"] == {"1024@0.5": [1, 1], "2048@0.5": [1, 1]}
    assert full["peak_rss_bytes"] == 500 * 2**20 and full["peak_rss_by_part"]["1024"] == 300 * 2**20
    assert doc["args"]["question_mode"] == "separate"
    calls.clear()
    assert bg.main(args + ["--resume"]) == 0
    assert calls == [("edge_sel h2o @0.2", "2048")]  # measured parts skipped, the failed one retried
    doc = json.loads(out.read_text())
    assert sorted(r["config"] for r in doc["results"]) == ["edge_sel full", "edge_sel h2o @0.2", "edge_sel mpcache @0.2"]
    assert all("error" not in r and not r.get("failed_parts") and not r["missing_parts"] for r in doc["results"])
    text = md.read_text()
    assert "| edge_sel mpcache @0.2 | 1.00 | 1/1 | 1/1 |" in text
    assert "Acceptance" in text and "2 needle cases failed" in text
    calls.clear()
    assert bg.main(args + ["--resume", "--list"]) == 0 and calls == []


def test_acceptance_lines():
    def r(name, acc, ppl, dec=None, rss=None):
        d = {"config": name, "needle_acc": acc, "ppl": ppl, "speed": {}, "peak_rss_bytes": rss}
        if dec:
            d["speed"]["4096"] = {"decode_ms_per_token": dec}
        return d

    lines = bg.acceptance([r("edge_sel full", 0.9, 40.0, 60.0, 400 * 2**20), r("transformers full", 0.9, 40.0, 80.0, 1000 * 2**20),
                           r("edge_sel mpcache @0.2", 0.8, 42.0), r("kvpress SnapKV @0.2", 0.5, 43.0),
                           r("kvpress TOVA @0.2", 0.6, 41.0), r("edge_sel mpcache @0.1", 0.4, 44.0, 30.0, 300 * 2**20),
                           r("edge_sel mpcache_recall @0.1", 1.0, 43.0, 45.0, 450 * 2**20)])
    text = "\n".join(lines)
    assert "0.2 kept: mpcache needle 0.80 vs full 0.90 (diff -10 points); best kvpress kvpress TOVA @0.2 0.60 -> OK" in text
    assert "best kvpress kvpress TOVA @0.2 41.00 -> ABOVE" in text
    assert "= 0.50 (target <= 0.75)" in text and "mpcache@0.1 / transformers = 0.38" in text
    assert "edge_sel mpcache @0.1 300 MiB / transformers full 1000 MiB = 0.30" in text
    assert "0.1 kept: mpcache_recall needle 1.00 vs full 0.90 (diff +10 points)" in text
    assert "mpcache_recall@0.1 45.0 / edge_sel full 60.0 = 0.75 (target <= 0.75)" in text
    assert "edge_sel mpcache_recall @0.1 450 MiB / transformers full 1000 MiB = 0.45 (target <= 0.5 at 10% kept)" in text
    full, tf = r("edge_sel full", 0.9, 40.0, rss=900 * 2**20), r("transformers full", 0.9, 40.0, rss=1000 * 2**20)
    full["peak_rss_by_part"] = {"1024": 200 * 2**20, "4096": 400 * 2**20, "ppl": 900 * 2**20}
    tf["peak_rss_by_part"] = {"1024": 700 * 2**20, "4096": 1000 * 2**20, "ppl": 1000 * 2**20}
    text = "\n".join(bg.acceptance([full, tf]))
    assert "peak RSS at 4096 tokens edge_sel full 400 MiB / transformers full 1000 MiB = 0.40" in text


def test_peer_env_version_check_and_requirements(tmp_path):
    assert peer_env.check_versions({"torch": "2.13.0+cpu", "transformers": "5.2.0", "missing": []}) == []
    bad = peer_env.check_versions({"torch": "2.14.1", "transformers": "4.57.6", "missing": ["TOVAPress"]})
    assert len(bad) == 3 and "torch is 2.14.1" in bad[0]
    assert "torch==2.13.0" in peer_env.requirements() and "kvpress==0.5.5" in peer_env.requirements()
    assert peer_env.env_dir(tmp_path) == tmp_path / "kvpress-0.5.5"
    # a directory without the marker is half-built: never returned as ready
    venv = peer_env.env_dir(tmp_path)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert not (venv / peer_env.MARKER).exists()


def test_max_new_reaches_the_workers_and_is_validated(tmp_path, monkeypatch):
    seen = []

    class Tok:
        def encode(self, text, add_special_tokens=True):
            class E:
                ids = [len(w) for w in text.split()]
            return E()

        def decode(self, ids, skip_special_tokens=True):
            return " nope"

    def fake_run(cfg, tmp, bundle, py):
        seen.append(cfg["max_new"])
        raw = _fake_raw(cfg["name"])
        raw["needle"] = raw["needle"][:1]
        return raw

    monkeypatch.setattr(bg, "_tokenizer", lambda bundle: Tok())
    monkeypatch.setattr(bg, "_run_one", fake_run)
    monkeypatch.setattr(textdata, "botchan", lambda: "word " * 3000)
    args = ["--bundle", str(tmp_path), "--peers", "none", "--policies", "mpcache", "--ratios", "0.2", "--lengths", "1024",
            "--depths", "0.5", "--needles", "1", "--ppl-prefix", "0", "--out", str(tmp_path / "g.json")]
    assert bg.main(args) == 0 and seen == [bg.MAX_NEW, bg.MAX_NEW]
    seen.clear()
    assert bg.main(args + ["--max-new", "40"]) == 0 and seen == [40, 40]
    with pytest.raises(SystemExit):
        bg.main(args + ["--max-new", "1"])


def test_weight_bundles_and_the_shared_pool_label(tmp_path):
    cfgs = bg.weight_bundle_configs(f"int4={tmp_path}/a, int4+shared={tmp_path}/a,", 2)
    assert [c["name"] for c in cfgs] == ["edge_sel full int4", "edge_sel full int4+shared"]
    assert {c["bundle"] for c in cfgs} == {str(tmp_path / "a")}
    assert "env" not in cfgs[0] and cfgs[1]["env"] == {"EDGE_SEL_SHARED_THREADS": "2"}
    assert bg.weight_bundle_configs("x+shared=b", 0)[0]["env"]["EDGE_SEL_SHARED_THREADS"] != "0"  # 0 = every core
    assert bg.weight_bundle_configs("x+own=b", 2)[0]["env"] == {"EDGE_SEL_SHARED_THREADS": "0"}
