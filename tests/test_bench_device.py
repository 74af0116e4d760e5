"""``edge-sel bench BUNDLE``: edge_sel measured alone on the tiny bundles (real sessions, real graphs), without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_sel.bench import Settings, bundle_tokenizer, cut_to_tokens, run, synthetic_text, table
from edge_sel.cli import main
from edge_sel.runtime.units import parse_size


def test_synthetic_candidates_have_the_asked_token_count(bert_bi_bundle, llama_bundle):
    from edge_sel.runtime import Bundle

    for bundle in (bert_bi_bundle, llama_bundle):  # WordPiece and byte-level BPE
        tok = bundle_tokenizer(Bundle.open(bundle))
        for n in (1, 7, 40):
            text = cut_to_tokens(tok, synthetic_text(n * 3, seed=n), n)
            assert len(tok.encode(text, add_special_tokens=False).ids) == n


def test_rerank_grid_budget_and_pruning(bert_bi_bundle):
    s = Settings(repeats=2, warmup=1, n_docs=[6, 12], doc_tokens=20, memory_budgets=[None, parse_size("1GiB")],
                 pruning=["off", "on"])
    rep = run(bert_bi_bundle, s)
    assert rep["task"] == "rerank" and rep["device"]["cpu_count"] >= 1
    rows = rep["rows"]
    assert len(rows) == 2 * 2 * 2
    ok = [r for r in rows if "error" not in r]
    assert {(r["n_docs"], r["memory_budget_bytes"]) for r in ok} == {(6, None), (12, None), (6, 1 << 30), (12, 1 << 30)}
    for r in ok:
        assert r["pruning"] == "off" and len(r["runs"]) == 2
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["docs_per_s"] > 0
        assert r["peak_rss_bytes"] > 0
        assert 15 <= r["doc_tokens_mean"] <= 20
    # the tiny bundle is not calibrated: pruning "on" is refused by the engine and reported, not fatal
    refused = [r for r in rows if r["pruning"] == "on"]
    assert len(refused) == 4 and all("calibrate" in r["error"] for r in refused)
    from rich.console import Console

    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(table(rep))
    text = console.export_text()
    # each refused row points to its reason, printed once under the table (not squeezed into a narrow cell)
    assert text.count("(1)") == 5 and text.count("(1) refused: " + refused[0]["error"][:20]) == 1, text


def test_rerank_with_documents_file_through_the_cli(llama_bundle, tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    docs.write_text("copy a file to another place\nremove a directory tree\nsort a list in place\n")
    assert main(["bench", str(llama_bundle), "-n", "5", "--documents", str(docs), "--query", "copy a file",
                 "--pruning", "off", "-r", "1", "--warmup", "0", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    (row,) = rep["rows"]
    assert row["n_docs"] == 5 and row["pruning"] == "off" and row["median_s"] > 0  # 3 documents cycled to 5


def test_default_pruning_measures_on_only_where_a_schedule_exists(bert_bi_bundle, capsys):
    # unasked, "on" on an uncalibrated bundle would only be a refused row (a long error squeezed into the table)
    assert main(["bench", str(bert_bi_bundle), "-n", "4", "-t", "8", "-r", "1", "--warmup", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["pruning"] for r in rows] == ["off"] and "error" not in rows[0]
    # asked for, it is still measured (and refused with the reason)
    assert main(["bench", str(bert_bi_bundle), "-n", "4", "-t", "8", "-r", "1", "--warmup", "0", "--pruning", "off,on",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["pruning"] for r in rows] == ["off", "on"] and "calibrate" in rows[1]["error"]


def test_generate_policies_and_budgets(gen_llama_bundle):
    s = Settings(repeats=2, warmup=0, prompt_tokens=[48, 96], new_tokens=4, policies=["full", "streaming_llm"],
                 kv_budgets=[None, "0.5"])
    rep = run(gen_llama_bundle, s)
    assert rep["task"] == "generate"
    rows = {(r["policy"], r["kv_budget"], r["prompt_tokens"]): r for r in rep["rows"]}
    assert len(rows) == 8
    # the full cache cannot live in half the prompt: refused by the engine, reported, the run goes on
    for n in (48, 96):
        assert "below the minimum" in rows[("full", "0.5", n)]["error"]
    ok = {k: r for k, r in rows.items() if not (k[0] == "full" and k[1] == "0.5")}
    for key, r in ok.items():
        assert "error" not in r, (key, r)
        assert r["prefill_tokens_per_s"] > 0 and r["decode_ms_per_token"] > 0 and len(r["prefill_runs"]) == 2
        assert r["peak_rss_bytes"] > 0 and r["kv_bytes_peak"] > 0
    # half the prompt kept: the streaming cache holds fewer tokens than the full one
    assert rows[("streaming_llm", "0.5", 96)]["kv_capacity_tokens"] < rows[("full", None, 96)]["kv_capacity_tokens"]
    table(rep)


def test_cli_refuses_bad_options_and_points_old_forms_to_the_script(bert_bi_bundle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "rerank", "--model", "x"])
    assert e.value.code == 2 and "python -m benchmarks.rerank" in capsys.readouterr().err
    assert main(["bench", str(bert_bi_bundle), "--repeats", "0"]) == 2
    assert main(["bench", str(bert_bi_bundle), "--pruning", "sometimes"]) == 2
    assert main(["bench", str(bert_bi_bundle), "-n", "none"]) == 2


def test_bench_never_imports_torch(bert_bi_bundle):
    code = ("import sys; from edge_sel.cli import main; "
            f"rc = main(['bench', {str(bert_bi_bundle)!r}, '-n', '4', '-t', '8', '-r', '1', '--pruning', 'off', '--json']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["rows"][0]["median_s"] > 0


@pytest.mark.parametrize("argv", [["-p", "64", "--new-tokens", "2", "--kv-budget", "none,48", "--policy", "h2o", "-r", "1"]])
def test_generate_through_the_cli(gen_llama_bundle, argv, capsys):
    assert main(["bench", str(gen_llama_bundle), *argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["policy"], r["kv_budget"]) for r in rows] == [("h2o", None), ("h2o", "48")]
    assert all("error" not in r for r in rows), rows
