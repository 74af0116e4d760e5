"""The `edge-sel` command line: JSON output, and user errors as one message with exit code 2."""

import json
import subprocess
import sys

import pytest


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edge_sel.cli", *map(str, args)], capture_output=True, text=True, **kw)


def test_rerank_json(bert_ce_bundle, tmp_path, docs):
    documents, queries = docs
    f = tmp_path / "docs.txt"
    f.write_text("\n".join(d.replace("\n", " ") for d in documents[:12]) + "\n")
    out = run("rerank", bert_ce_bundle, "--query", queries[0], "--documents", f, "--top-k", 4, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["results"]) == 4
    assert set(data["results"][0]) == {"corpus_id", "score"}
    for key in ("latency_s", "peak_rss_bytes", "window_layers", "chunk_size"):
        assert key in data["stats"]
    scores = [r["score"] for r in data["results"]]
    assert scores == sorted(scores, reverse=True)


def test_rerank_jsonl_matches_text(bert_bi_bundle, tmp_path):
    texts = ["the first document about files", "a second about numbers", "third: about strings"]
    t = tmp_path / "d.txt"
    t.write_text("\n".join(texts))
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"text": x, "id": i}) for i, x in enumerate(texts)))
    a = json.loads(run("rerank", bert_bi_bundle, "-q", "numbers", "-d", t, "--json").stdout)["results"]
    b = json.loads(run("rerank", bert_bi_bundle, "-q", "numbers", "-d", j, "--json").stdout)["results"]
    assert a == b


@pytest.mark.parametrize("setup,needle", [
    (lambda p: p.write_text(""), "no documents"),
    (lambda p: p.write_bytes(b"caf\xe9 latin-1\n"), "not UTF-8"),
    (lambda p: None, "not found"),
    (lambda p: p.write_text('{"txt": 1}\n'), "text"),
])
def test_rerank_bad_documents(bert_bi_bundle, tmp_path, setup, needle):
    f = tmp_path / "docs.txt"
    setup(f)
    out = run("rerank", bert_bi_bundle, "-q", "x", "-d", f)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_rerank_bad_bundle_and_budget(bert_bi_bundle, tmp_path):
    f = tmp_path / "docs.txt"
    f.write_text("a\nb\n")
    out = run("rerank", tmp_path / "missing", "-q", "x", "-d", f)
    assert out.returncode == 2 and "bundle not found" in out.stderr
    out = run("rerank", bert_bi_bundle, "-q", "x", "-d", f, "--memory-budget", "1KB")
    assert out.returncode == 2 and "minimum" in out.stderr and "Traceback" not in out.stderr
    out = run("rerank", bert_bi_bundle, "-q", "x", "-d", f, "--memory-budget", "lots")
    assert out.returncode == 2 and "cannot read size" in out.stderr
    out = run("rerank", bert_bi_bundle, "-q", "x", "-d", f, "--top-k", 0)
    assert out.returncode == 2 and "top_k" in out.stderr


def test_verify_and_info(bert_bi_bundle):
    out = run("verify", bert_bi_bundle, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["ok"] is True
    info = json.loads(run("info", bert_bi_bundle, "--json").stdout)
    assert info["model"]["scoring"] == "bi_encoder"


def test_help_has_examples():
    for cmd in ("rerank", "export", "demo", "models", "verify"):
        out = run(cmd, "--help")
        assert out.returncode == 0 and "examples:" in out.stdout


def test_models_list_json():
    out = run("models", "list", "--json")
    names = {m["name"] for m in json.loads(out.stdout)}
    assert {"all-minilm-l6-v2", "smollm2-135m-instruct"} <= names


def test_models_list_table_shows_whole_names_at_80_columns():
    import os

    out = run("models", "list", env={**os.environ, "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert "all-minilm-l6-v2 " in out.stdout and "smollm2-135m-instruct " in out.stdout  # the names to type, whole


def test_unknown_model_message(tmp_path):
    out = run("export", "no-such/model-xyz", "-o", tmp_path / "b")
    assert out.returncode == 2
    assert "Looked for" in out.stderr and "models fetch" in out.stderr


def test_demo_says_truncation_once(bert_bi_bundle, monkeypatch, capsys, caplog):
    """The demo ranks its own docstring pool: documents cut to the model's length are said once in the header,
    not warned about on every call (it printed the same warning six times)."""
    import argparse
    import logging

    from rich.console import Console

    from edge_sel import demo
    from edge_sel.runtime import Bundle

    bundle = Bundle.open(bert_bi_bundle)
    monkeypatch.setattr(demo, "ensure_bundle", lambda model, console: bundle)
    args = argparse.Namespace(model="tiny", memory_budget=None, pool=24, top_k=3, json=False)
    with caplog.at_level(logging.WARNING, logger="edge_sel"):
        assert demo.run_demo(args, Console(width=200)) == 0
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]
    out = capsys.readouterr().out
    assert f"cut to the model's {bundle.max_length} tokens" in out


def test_piped_text_lines_are_not_folded_at_80_columns(bert_bi_bundle, tmp_path):
    """Off a terminal, rich folded every line at 80 columns: 'wrote PATH ...' and the plan's prediction line came out
    in pieces, breaking a script that reads them."""
    out = run("plan", bert_bi_bundle, "--device", "pixel-8", "--task", "rerank", "-n", 8, "--doc-tokens", 20)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("predicted peak"))
    assert len(line) > 80 and "latency" in line and line.rstrip().endswith(")"), out.stdout
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "fused"
    out = run("fuse", bert_bi_bundle, "-o", deep)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(f"wrote {deep / 'fused.onnx'} ("), out.stdout
