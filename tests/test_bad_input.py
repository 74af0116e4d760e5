"""Bad input to every `edge-sel` command: exit 2, one clear line on stderr (never a traceback), and nothing the
user owns changed or left behind. Runs the CLI in-process (``edge_sel.cli.main``) on the shared tiny bundles."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_sel import cli

STAMP = ".verified"  # the bundle's verification stamp: this machine's record, written by any open


def run_cli(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(*roots):
    """Every file under ``roots``: (size, mtime) — what a bad input must leave exactly as it was."""
    state = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in paths:
            if p.name != STAMP:
                st = p.lstat()
                state[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else "dir"
    return state


@pytest.fixture
def ctx(tmp_path, bert_bi_bundle, bert_ce_bundle, llama_bundle, gen_llama_bundle):
    docs = tmp_path / "docs.txt"
    docs.write_text("the first document about files\na second about numbers\nthird: about strings\n")
    return SimpleNamespace(tmp=tmp_path, bi=bert_bi_bundle, ce=bert_ce_bundle, llama=llama_bundle, gen=gen_llama_bundle,
                           docs=docs, hf=Path(bert_bi_bundle).parent / "hf")


def write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def bundle_copy(c, src, edit_manifest=None, edit_file=None):
    """A copy of a tiny bundle under the test's folder, its manifest or one file damaged."""
    dst = c.tmp / "copy"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(STAMP))
    if edit_manifest is not None:
        m = json.loads((dst / "manifest.json").read_text())
        edit_manifest(m)
        (dst / "manifest.json").write_text(json.dumps(m))
    if edit_file is not None:
        name, data = edit_file
        (dst / name).write_bytes(data)
    return dst


def _del(m, *keys):
    for k in keys[:-1]:
        m = m[k]
    del m[keys[-1]]


def _set(m, value, *keys):
    for k in keys[:-1]:
        m = m[k]
    m[keys[-1]] = value


GEN = lambda c, *a: ["generate", c.gen, "-p", "hello there", "-n", 2, *a]  # noqa: E731
RERANK = lambda c, b, *a: ["rerank", b, "-q", "numbers", "-d", c.docs, *a]  # noqa: E731

# (id, argv from ctx, words the one line must contain)
CASES = [
    # generate
    ("gen-temperature-nan", lambda c: GEN(c, "-t", "nan"), "temperature"),
    ("gen-temperature-inf", lambda c: GEN(c, "-t", "inf"), "temperature"),
    ("gen-temperature-negative", lambda c: GEN(c, "-t", "-1"), "temperature"),
    ("gen-top-p-zero", lambda c: GEN(c, "-t", "0.8", "--top-p", "0"), "top_p"),
    ("gen-top-p-nan", lambda c: GEN(c, "-t", "0.8", "--top-p", "nan"), "top_p"),
    ("gen-kv-budget-inf", lambda c: GEN(c, "--kv-budget", "inf"), "kv_budget"),
    ("gen-kv-budget-nan", lambda c: GEN(c, "--kv-budget", "nan"), "kv_budget"),
    ("gen-kv-budget-zero", lambda c: GEN(c, "--kv-budget", "0"), "kv_budget"),
    ("gen-kv-budget-negative", lambda c: GEN(c, "--kv-budget", "-5"), "kv_budget"),
    ("gen-kv-budget-fraction-above-one", lambda c: GEN(c, "--kv-budget", "1.5"), "kv_budget"),
    ("gen-kv-budget-junk", lambda c: GEN(c, "--kv-budget", "lots"), "kv_budget"),
    ("gen-seed-negative", lambda c: GEN(c, "-t", "0.8", "--seed", "-1"), "seed"),
    ("gen-max-new-zero", lambda c: ["generate", c.gen, "-p", "hi", "-n", 0], "max_new_tokens"),
    ("gen-prompt-file-folder", lambda c: ["generate", c.gen, "--prompt-file", c.tmp], "directory"),
    ("gen-prompt-file-missing", lambda c: ["generate", c.gen, "--prompt-file", c.tmp / "nope.txt"], "not found"),
    ("gen-prompt-file-latin1", lambda c: ["generate", c.gen, "--prompt-file", write(c.tmp / "p.txt", b"caf\xe9\n")], "UTF-8"),
    ("gen-prompt-and-file", lambda c: ["generate", c.gen, "-p", "x", "--prompt-file", c.docs], "exactly one"),
    ("gen-no-prompt", lambda c: ["generate", c.gen], "exactly one"),
    ("gen-policy-unknown", lambda c: GEN(c, "--policy", "nonsense"), "nonsense"),
    ("gen-empty-prompt", lambda c: ["generate", c.gen, "-p", "", "-n", 2], "prompt"),
    ("gen-policy-full-combined", lambda c: GEN(c, "--policy", "full+full"), "full"),
    ("gen-rerank-bundle", lambda c: ["generate", c.bi, "-p", "hi"], "rerank"),
    ("gen-policy-repeated", lambda c: GEN(c, "--policy", "h2o+h2o"), "twice"),
    ("gen-system-without-chat", lambda c: GEN(c, "--system", "be brief"), "--chat"),
    ("gen-missing-bundle", lambda c: ["generate", c.tmp / "none", "-p", "hi"], "not found"),
    # export
    ("export-max-length-zero", lambda c: ["export", c.hf, "-o", c.tmp / "out", "--max-length", 0], "--max-length"),
    ("export-max-length-negative", lambda c: ["export", c.hf, "-o", c.tmp / "out", "--max-length", -5], "--max-length"),
    ("export-config-not-json", lambda c: ["export", write(c.tmp / "m" / "config.json", "{not json").parent, "-o", c.tmp / "o"],
     "config.json"),
    ("export-config-a-list", lambda c: ["export", write(c.tmp / "m" / "config.json", "[1, 2]").parent, "-o", c.tmp / "o"],
     "config"),
    ("export-config-latin1", lambda c: ["export", write(c.tmp / "m" / "config.json", b"\xff\xfe").parent, "-o", c.tmp / "o"],
     "config.json"),
    ("export-junk-gguf", lambda c: ["export", write(c.tmp / "junk.gguf", b"not a model at all"), "-o", c.tmp / "o"], "GGUF"),
    ("export-junk-gguf-in-dir", lambda c: ["export", write(c.tmp / "g" / "x.gguf", b"\0" * 64).parent, "-o", c.tmp / "o"],
     "GGUF"),
    ("export-empty-dir", lambda c: ["export", (c.tmp / "empty").mkdir() or c.tmp / "empty", "-o", c.tmp / "o"], "config.json"),
    ("export-missing-model", lambda c: ["export", c.tmp / "no-such-model", "-o", c.tmp / "o"], "not found"),
    ("export-drop-layers-junk", lambda c: ["export", c.hf, "-o", c.tmp / "o", "--drop-layers", "some"], "--drop-layers"),
    ("export-out-under-a-file", lambda c: ["export", c.hf, "-o", c.docs / "bundle"], "docs.txt"),
    ("export-out-uncreatable", lambda c: ["export", c.hf, "-o", "/proc/no-such-dir/bundle"], "cannot create"),
    # rerank
    ("rerank-top-k-zero", lambda c: RERANK(c, c.bi, "-k", 0), "top_k"),
    ("rerank-instruction-on-encoder", lambda c: RERANK(c, c.ce, "--instruction", "judge"), "--instruction"),
    ("rerank-empty-query", lambda c: ["rerank", c.bi, "-q", "", "-d", c.docs], "query"),
    ("rerank-docs-folder", lambda c: ["rerank", c.bi, "-q", "x", "-d", c.tmp], "is a folder"),
    ("rerank-docs-missing", lambda c: ["rerank", c.bi, "-q", "x", "-d", c.tmp / "none.txt"], "not found"),
    ("rerank-jsonl-empty-text", lambda c: ["rerank", c.bi, "-q", "x", "-d",
                                           write(c.tmp / "d.jsonl", '{"text": "a"}\n{"text": ""}\n')], "line 2"),
    ("rerank-jsonl-blank-text", lambda c: ["rerank", c.bi, "-q", "x", "-d", write(c.tmp / "d.txt", '{"text": "  "}\n')],
     "line 1"),
    ("rerank-jsonl-not-json", lambda c: ["rerank", c.bi, "-q", "x", "-d", write(c.tmp / "d.jsonl", "plain words\n")],
     "line 1"),
    ("rerank-jsonl-no-text", lambda c: ["rerank", c.bi, "-q", "x", "-d", write(c.tmp / "d.txt", '{"txt": 1}\n')], "text"),
    ("rerank-docs-line-too-long", lambda c: ["rerank", c.bi, "-q", "x", "-d",
                                             write(c.tmp / "d.txt", "ok\n" + "x" * ((1 << 20) + 1) + "\n")], "line 2 is longer than 1.0 MiB"),
    ("rerank-docs-endless", lambda c: ["rerank", c.bi, "-q", "x", "-d", "/dev/zero"], "line 1 is longer than"),
    ("rerank-budget-too-small", lambda c: RERANK(c, c.bi, "-m", "1KB"), "minimum"),
    ("rerank-spill-dir-missing", lambda c: RERANK(c, c.bi, "--spill-dir", c.tmp / "nope"), "--spill-dir"),
    ("rerank-spill-dir-a-file", lambda c: RERANK(c, c.bi, "--spill-dir", c.docs), "--spill-dir"),
    ("rerank-pruning-on-uncalibrated", lambda c: RERANK(c, c.bi, "--pruning", "on"), "`--pruning auto` from the command line"),
    ("rerank-shadow-above-one", lambda c: RERANK(c, c.bi, "--shadow", "1.5"), "shadow"),
    ("rerank-shadow-negative", lambda c: RERANK(c, c.bi, "--shadow=-0.1"), "shadow"),
    ("rerank-generate-bundle", lambda c: RERANK(c, c.gen), "generate"),
    ("rerank-missing-bundle", lambda c: RERANK(c, c.tmp / "none"), "not found"),
    ("rerank-not-a-bundle", lambda c: RERANK(c, c.tmp), "manifest"),
    ("rerank-corrupt-tokenizer", lambda c: RERANK(c, bundle_copy(c, c.bi, edit_file=("tokenizer.json", b"{broken"))),
     "tokenizer.json"),
    ("rerank-manifest-model-string", lambda c: RERANK(c, bundle_copy(c, c.bi, lambda m: _set(m, "bert", "model"))), "model"),
    ("rerank-manifest-layers-strings", lambda c: RERANK(c, bundle_copy(c, c.bi, lambda m: _set(m, ["a", "b"], "layers"))),
     "layers"),
    ("rerank-manifest-no-max-length", lambda c: RERANK(c, bundle_copy(c, c.bi, lambda m: _del(m, "max_length"))),
     "max_length"),
    ("rerank-manifest-no-hidden", lambda c: RERANK(c, bundle_copy(c, c.bi, lambda m: _del(m, "dims", "hidden"))), "hidden"),
    ("rerank-format-version-negative", lambda c: RERANK(c, bundle_copy(c, c.bi, lambda m: _set(m, -7, "format_version"))),
     "format_version"),
    ("rerank-format-version-bool", lambda c: RERANK(c, bundle_copy(c, c.bi, lambda m: _set(m, True, "format_version"))),
     "format_version"),
    ("rerank-provider-unknown", lambda c: RERANK(c, c.bi, "--provider", "warp-drive"), "provider"),
    ("gen-provider-unknown", lambda c: GEN(c, "--provider", "warp-drive"), "provider"),
    ("bench-provider-unknown", lambda c: ["bench", c.bi, "--provider", "warp-drive", "-r", 1], "provider"),
    ("rerank-manifest-not-json", lambda c: RERANK(c, bundle_copy(c, c.bi, edit_file=("manifest.json", b"{"))), "manifest"),
    # calibrate
    ("calibrate-candidates-zero", lambda c: ["calibrate", c.ce, "--candidates", 0], "n_candidates"),
    ("calibrate-max-layers-negative", lambda c: ["calibrate", c.ce, "--max-layers", -1], "max_layers"),
    ("calibrate-queries-zero", lambda c: ["calibrate", c.ce, "--queries", 0], "n_queries"),
    ("calibrate-top-k-zero", lambda c: ["calibrate", c.ce, "--top-k", 0], "top_k"),
    ("calibrate-safety-nan", lambda c: ["calibrate", c.ce, "--safety", "nan"], "safety"),
    ("calibrate-data-latin1", lambda c: ["calibrate", c.ce, "--data", write(c.tmp / "cal.jsonl", b"\xe9\xe9\n")], "UTF-8"),
    ("calibrate-data-missing", lambda c: ["calibrate", c.ce, "--data", c.tmp / "none.jsonl"], "not found"),
    ("calibrate-data-not-json", lambda c: ["calibrate", c.ce, "--data", write(c.tmp / "cal.jsonl", "query? docs\n")],
     "line 1"),
    ("calibrate-data-wrong-shape", lambda c: ["calibrate", c.ce, "--data", write(c.tmp / "cal.jsonl", '{"query": 1}\n')],
     "line 1"),
    ("calibrate-generate-bundle", lambda c: ["calibrate", c.gen], "generate"),
    ("calibrate-check-unknown-domain", lambda c: ["calibrate", c.ce, "--check", "botchan,nowhere"], "nowhere"),
    # verify / info
    ("verify-missing", lambda c: ["verify", c.tmp / "none"], "not found"),
    ("verify-not-a-bundle", lambda c: ["verify", c.tmp], "manifest"),
    ("verify-truncated-weights", lambda c: ["verify", bundle_copy(c, c.bi, edit_file=("tokenizer.json", b""))], "tokenizer.json"),
    ("info-missing", lambda c: ["info", c.tmp / "none"], "not found"),
    ("info-a-file", lambda c: ["info", c.docs], "docs.txt"),
    ("info-manifest-layers-strings", lambda c: ["info", bundle_copy(c, c.ce, lambda m: _set(m, ["x"], "layers"))], "layers"),
    # models / quantize
    ("models-fetch-unknown", lambda c: ["models", "fetch", "no-such-model"], "no-such-model"),
    ("quantize-missing", lambda c: ["quantize", c.tmp / "none", "-o", c.tmp / "q"], "not found"),
    ("quantize-out-is-user-folder", lambda c: ["quantize", c.bi, "-o", write(c.tmp / "mine" / "notes.txt", "keep").parent,
                                               "--no-measure"], "mine"),
    ("quantize-out-under-a-file", lambda c: ["quantize", c.bi, "-o", c.docs / "q", "--no-measure"], "docs.txt"),
    ("quantize-generate-out-under-a-file", lambda c: ["quantize", c.gen, "-o", c.docs / "q" / "r"], "docs.txt"),
    ("export-weights-unknown", lambda c: ["export", c.hf, "-o", c.tmp / "o", "--weights", "int3"], "--weights"),
    ("quantize-weights-unknown", lambda c: ["quantize", c.bi, "-o", c.tmp / "q", "--weights", "int3"], "--weights"),
    ("quantize-uint8-weight-only", lambda c: ["quantize", c.bi, "-o", c.tmp / "q", "--weights", "uint8"], "dynamic"),
    ("quantize-dynamic-int4", lambda c: ["quantize", c.bi, "-o", c.tmp / "q", "--method", "dynamic", "--weights", "int4"],
     "dynamic"),
    ("quantize-block-size-not-power-of-two", lambda c: ["quantize", c.bi, "-o", c.tmp / "q", "--weights", "int4",
                                                        "--block-size", 24], "--block-size"),
    ("quantize-gguf-not-a-gguf", lambda c: ["quantize", c.bi, "-o", c.tmp / "q", "--weights", "int4", "--gguf", c.docs,
                                            "--no-measure"], "not a GGUF"),
    ("quantize-gguf-missing", lambda c: ["quantize", c.bi, "-o", c.tmp / "q", "--weights", "int4", "--gguf",
                                         c.tmp / "none.gguf", "--no-measure"], "none.gguf: file not found"),
    ("convert-missing", lambda c: ["convert", c.tmp / "none"], "not found"),
    ("convert-out-is-user-folder", lambda c: ["convert", c.bi, "-o", write(c.tmp / "mine" / "notes.txt", "keep").parent], "mine"),
    ("convert-out-under-a-file", lambda c: ["convert", c.bi, "-o", c.docs / "o"], "docs.txt"),
    ("fuse-missing", lambda c: ["fuse", c.tmp / "none"], "not found"),
    ("fuse-generate-bundle", lambda c: ["fuse", c.gen], "'generate' bundle"),
    ("fuse-out-is-user-folder", lambda c: ["fuse", c.bi, "-o", write(c.tmp / "mine" / "notes.txt", "keep").parent], "mine"),
    ("export-fused-generate", lambda c: ["export", c.hf, "-o", c.tmp / "o", "--task", "generate", "--fused"], "--fused"),
    ("export-fused-ort", lambda c: ["export", c.hf, "-o", c.tmp / "o", "--format", "ort", "--fused"], "--format ort"),
    ("export-generate-out-under-a-file", lambda c: ["export", c.hf, "--task", "generate", "-o", c.docs / "b"], "docs.txt"),
    # bench
    ("bench-rerank-bundle-generate-options", lambda c: ["bench", c.bi, "--policy", "mpcache"], "--policy"),
    ("bench-generate-bundle-rerank-options", lambda c: ["bench", c.gen, "-n", "8"], "--n-docs"),
    ("bench-spill-dir-missing", lambda c: ["bench", c.bi, "--spill-dir", c.tmp / "nope"], "--spill-dir"),
    ("bench-generate-bundle-spill-dir", lambda c: ["bench", c.gen, "--spill-dir", c.tmp], "--spill-dir"),
    ("bench-policy-unknown", lambda c: ["bench", c.gen, "--policy", "nonsense", "-p", 8, "-r", 1], "nonsense"),
    ("bench-kv-budget-inf", lambda c: ["bench", c.gen, "--kv-budget", "inf", "-p", 8, "-r", 1], "kv_budget"),
    ("bench-budget-too-small", lambda c: ["bench", c.bi, "-m", "1KB", "--pruning", "off", "-r", 1], "minimum"),
    ("demo-pool-zero", lambda c: ["demo", "--pool", 0], "--pool"),
    ("demo-pool-negative", lambda c: ["demo", "--pool", -4], "--pool"),
    ("bench-repeats-zero", lambda c: ["bench", c.bi, "--repeats", 0], "repeats"),
    ("bench-missing", lambda c: ["bench", c.tmp / "none"], "not found"),
    ("bench-n-docs-junk", lambda c: ["bench", c.bi, "-n", "many"], "many"),
    ("bench-n-docs-huge", lambda c: ["bench", c.bi, "-n", "100000000"], "--n-docs"),
    ("bench-prompt-file-folder", lambda c: ["bench", c.gen, "--prompt-file", c.tmp], "prompt file"),
    # devices, plan, profile
    ("devices-show-unknown", lambda c: ["devices", "show", "no-such-phone"], "unknown device"),
    ("plan-unknown-device", lambda c: ["plan", c.bi, "--device", "no-such-phone", "--task", "rerank", "-n", 4,
                                       "--doc-tokens", 8], "unknown device"),
    ("plan-device-file-invalid", lambda c: ["plan", c.bi, "--device", write(c.tmp / "d.json", '{"name": "x"}'), "--task",
                                            "rerank", "-n", 4, "--doc-tokens", 8], "not a valid device profile"),
    ("plan-infeasible-budget", lambda c: ["plan", c.bi, "--device", "iphone-se-3", "--task", "rerank", "-n", 4,
                                          "--doc-tokens", 8, "--budget", "1KB"], "smallest budget that works"),
    ("plan-wrong-task", lambda c: ["plan", c.gen, "--device", "pixel-8", "--task", "rerank", "-n", 4, "--doc-tokens", 8],
     "'generate' bundle"),
    ("plan-rerank-without-candidates", lambda c: ["plan", c.bi, "--device", "pixel-8", "--task", "rerank"], "--candidates"),
    ("plan-generate-prompt-beyond-context", lambda c: ["plan", c.gen, "--device", "pixel-8", "--task", "generate",
                                                       "--prompt-tokens", 10**7], "context"),
    ("profile-without-out", lambda c: ["profile", c.bi, "rerank", "-q", "x", "-d", c.docs], "--out"),
    ("profile-out-is-a-file", lambda c: ["profile", c.bi, "rerank", "-q", "x", "-d", c.docs, "--out", c.docs], "not a folder"),
    ("profile-interval-zero", lambda c: ["profile", c.bi, "rerank", "-q", "x", "-d", c.docs, "--out", c.tmp / "p",
                                         "--interval-ms", 0], "--interval-ms"),
    ("profile-missing-documents", lambda c: ["profile", c.bi, "rerank", "-q", "x", "-d", c.tmp / "none.txt", "--out",
                                             c.tmp / "p"], "not found"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ctx, capsys, case):
    _, make_argv, needle = case
    argv = make_argv(ctx)
    owned = [ctx.tmp, ctx.bi, ctx.ce, ctx.llama, ctx.gen]
    before = snapshot(*owned)
    code, out, err = run_cli(argv, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("edge-sel: error: ") and needle in lines[0], lines[0]
    assert out == "", f"a refused command printed {out!r} to stdout"  # e.g. a progress bar's leftover blank line
    assert snapshot(*owned) == before, "a bad input changed or left files behind"


@pytest.mark.parametrize("argv", [["models", "list"], ["demo"]])
def test_home_that_cannot_be_a_folder(ctx, capsys, monkeypatch, argv):
    monkeypatch.setenv("EDGE_SEL_HOME", str(ctx.docs))
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.strip().startswith("edge-sel: error: EDGE_SEL_HOME=") and "\n" not in err.strip(), err
    code, _, err = run_cli(RERANK(ctx, ctx.bi), capsys)  # a local bundle does not need the home
    assert code == 0, err


def test_plain_text_starting_with_brace_is_plain_text(ctx, capsys):
    f = write(ctx.tmp / "d.txt", "{braces} open this line\nthe second about numbers\n")
    code, out, err = run_cli(["rerank", ctx.bi, "-q", "numbers", "-d", f, "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["results"]) == 2


def test_spill_dir_is_used_and_left_clean(ctx, capsys, monkeypatch):
    import tempfile

    made = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*a, **kw):  # a spy: the real folder is made, its parent recorded
        path = real_mkdtemp(*a, **kw)
        made.append(Path(path).parent)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    spill = ctx.tmp / "spill"
    spill.mkdir()
    many = write(ctx.tmp / "many.txt", "\n".join(f"document {i} about " + "numbers and words " * 12 for i in range(200)))
    code, out, err = run_cli(["rerank", ctx.llama, "-q", "numbers", "-d", many, "-m", "27MB", "--spill-dir", spill, "--json"],
                             capsys)
    assert code == 0, err
    assert len(json.loads(out)["results"]) == 10
    assert spill in made  # the hidden states went to the folder the user chose
    assert list(spill.iterdir()) == []  # and nothing is left there


@pytest.mark.parametrize("debug", [False, True])
def test_internal_error_is_one_line_and_logged(ctx, capsys, monkeypatch, debug):
    def broken(args, console):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_info", broken)
    monkeypatch.setenv("EDGE_SEL_HOME", str(ctx.tmp / "home"))
    if debug:
        monkeypatch.setenv("EDGE_SEL_DEBUG", "1")
    else:
        monkeypatch.delenv("EDGE_SEL_DEBUG", raising=False)
    code, out, err = run_cli(["info", ctx.bi], capsys)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("edge-sel: internal error: ZeroDivisionError: a bug")
    if debug:
        assert "Traceback" in err
        assert not (ctx.tmp / "home" / "logs").exists()
    else:
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        logs = list((ctx.tmp / "home" / "logs").iterdir())
        assert len(logs) == 1 and str(logs[0]) in last
        assert "ZeroDivisionError" in logs[0].read_text() and "Traceback" in logs[0].read_text()


@pytest.mark.parametrize("error,code", [
    (OSError(28, "No space left on device"), 2),
    (OSError(122, "Disk quota exceeded"), 2),
    (OSError("46881792 requested and 262144 written"), 2),  # numpy's tofile on a full disk: no errno
    (OSError("Not enough free space to write 46881792 bytes after offset 0"), 2),  # numpy's memmap
    (OSError(5, "Input/output error"), 1),  # not the user's to fix: still reported as a bug
])
def test_a_full_disk_is_one_line_and_exit_2(ctx, capsys, monkeypatch, error, code):
    def writes(args, console):
        raise error

    monkeypatch.setattr(cli, "cmd_info", writes)
    monkeypatch.setenv("EDGE_SEL_HOME", str(ctx.tmp / "home"))
    monkeypatch.delenv("EDGE_SEL_DEBUG", raising=False)
    got, out, err = run_cli(["info", ctx.bi], capsys)
    assert got == code and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if code == 2:
        assert err.startswith("edge-sel: error: no space left on the device"), err


@pytest.mark.parametrize("name,needle", [
    ("EDGE_SEL_HEAP_GUARD", "EDGE_SEL_HEAP_GUARD must be a fraction of the budget (0 = off), got 'maybe'"),
    ("EDGE_SEL_THREADS", "EDGE_SEL_THREADS must be an integer, got 'maybe'"),
    ("EDGE_SEL_MMAP_THRESHOLD", "EDGE_SEL_MMAP_THRESHOLD must be an integer, got 'maybe'"),
])
def test_a_bad_environment_setting_is_one_line(ctx, capsys, monkeypatch, name, needle):
    import edge_sel.runtime.memory as memory

    monkeypatch.setattr(memory, "_tuned", None)  # the allocator is tuned once per process: read the setting again
    monkeypatch.setenv(name, "maybe")
    code, out, err = run_cli(["rerank", ctx.bi, "-q", "x", "-d", ctx.docs, "-m", "1GiB"], capsys)
    assert code == 2 and err.strip() == f"edge-sel: error: {needle}", err
