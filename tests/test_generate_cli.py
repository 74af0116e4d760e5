"""`edge-sel generate` end to end on a tiny generate bundle, its errors (exit 2), and the no-torch guard."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gen_tiny import long_text, make_gen_decoder


@pytest.fixture(scope="module")
def gen_bundle(tmp_path_factory):
    from edge_sel.export import export

    root = tmp_path_factory.mktemp("gen_cli")
    return export(make_gen_decoder(root / "hf", layers=2), root / "bundle", task="generate")


def _cli(*args):
    from edge_sel.cli import main

    return main([str(a) for a in args])


def test_generate_json(gen_bundle, capsys):
    assert _cli("generate", gen_bundle, "--prompt", "Open a file.", "-n", "8", "--json", "--policy", "mpcache",
                "--kv-budget", "64MB") == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) <= 8 and isinstance(out["text"], str)
    for k in ("prefill_s", "decode_ms_per_token", "kv_bytes_peak", "peak_rss_bytes", "policy"):
        assert k in out["stats"]
    assert out["stats"]["policy"] == "mpcache"
    assert set(out["stats"]) == {"policy", "prefill_s", "decode_ms_per_token", "kv_bytes_peak", "peak_rss_bytes",
                                 "prompt_tokens", "new_tokens", "kv_capacity_tokens", "kv_bytes_allocated",
                                 "kv_budget_bytes", "evictions", "cost_per_decode_step", "skipped_layers", "provider"}


def test_generate_help_lists_every_registered_policy(capsys):
    from edge_sel.runtime.policies import REGISTRY

    with pytest.raises(SystemExit):
        _cli("generate", "--help")
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY) and "mpcache_recall" in out and "knorm" in out


def test_generate_stream_chat_and_prompt_file(gen_bundle, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text(long_text(3000), encoding="utf-8")
    assert _cli("generate", gen_bundle, "--prompt-file", f, "-n", "6", "--kv-budget", "0.2", "--policy", "snapkv") == 0
    assert _cli("generate", gen_bundle, "-p", "hello", "--chat", "-n", "4", "-t", "0.7", "--seed", "3") == 0
    cap = capsys.readouterr()
    assert "ms/token" in cap.err


@pytest.mark.parametrize("args,msg", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x", "--policy", "bogus"], "unknown policy 'bogus'"),
    (["--prompt", "x", "--kv-budget", "0"], "positive"),
    (["--prompt", "x", "--kv-budget", "-3"], "positive"),
    (["--prompt", "x", "--kv-budget", "3", "--policy", "full"], "minimum"),
    ([], "exactly one of --prompt or --prompt-file"),
])
def test_generate_errors_exit_2(gen_bundle, capsys, args, msg):
    assert _cli("generate", gen_bundle, *args) == 2
    assert msg in capsys.readouterr().err


def test_generate_refuses_too_long_prompt_and_rerank_bundle(gen_bundle, llama_bundle, tmp_path, capsys):
    f = tmp_path / "long.txt"
    f.write_text(long_text(60000), encoding="utf-8")
    assert _cli("generate", gen_bundle, "--prompt-file", f) == 2
    assert "refusing (not truncating)" in capsys.readouterr().err
    assert _cli("generate", llama_bundle, "--prompt", "hi") == 2
    assert "--task generate" in capsys.readouterr().err


def test_generator_never_imports_torch(gen_bundle):
    code = ("import sys, json; import edge_sel; from edge_sel import Generator; g = Generator(sys.argv[1], kv_budget=128, "
            "policy='mpcache+layer_skip'); r = g.generate('Open a file and read it.' * 20, max_new_tokens=5); "
            "print(json.dumps([m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum')]))")
    out = subprocess.run([sys.executable, "-c", code, str(gen_bundle)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    cli = ("import sys; from edge_sel.cli import main; rc = main(['generate', sys.argv[1], '-p', 'hi', '-n', '3', '--json']); "
           "print('BANNED', [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum')])")
    out = subprocess.run([sys.executable, "-c", cli, str(gen_bundle)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "BANNED []" in out.stdout


def test_export_generate_verify_reports_logits(tmp_path, capsys):
    """A generate bundle is verified on its logits (there is no score): the export line says which."""
    hf = make_gen_decoder(tmp_path / "hf", layers=1)
    capsys.readouterr()
    assert _cli("export", hf, "-o", tmp_path / "b", "--task", "generate", "--verify") == 0
    out = capsys.readouterr().out
    assert "max |logit diff|" in out and "score diff" not in out, out


def test_prompt_file_dash_reads_standard_input(gen_bundle):
    code = ("import sys; from edge_sel.cli import main; "
            f"sys.exit(main(['generate', {str(gen_bundle)!r}, '--prompt-file', '-', '-n', '3', '--json']))")
    res = subprocess.run([sys.executable, "-c", code], input="Open a file and read it.", capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["stats"]["prompt_tokens"] > 3
