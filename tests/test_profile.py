"""``edge-sel profile`` and the profiler on the tiny bundles (real sessions): the trace is valid trace-event JSON
with the engines' stages, onnxruntime's operators and the memory counters; memory at the peak adds up; the HTML
report renders in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edge_sel.cli import main
from edge_sel.runtime import trace
from edge_sel.runtime.profiler import Profiler

# The trace-event format (Chrome's "Trace Event Format"): the fields each phase we write must carry.
_NUM = {"type": "number"}
TRACE_SCHEMA = {
    "type": "object", "required": ["traceEvents"],
    "properties": {"traceEvents": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["ph", "pid", "name"],
        "properties": {"ph": {"enum": ["X", "i", "C", "M"]}, "pid": {"type": "integer"}, "tid": {"type": "integer"},
                       "name": {"type": "string"}, "ts": _NUM, "dur": {"type": "number", "minimum": 0},
                       "args": {"type": "object"}, "s": {"enum": ["g", "p", "t"]}},
        "allOf": [
            {"if": {"properties": {"ph": {"const": "X"}}}, "then": {"required": ["ts", "dur", "tid"]}},
            {"if": {"properties": {"ph": {"const": "i"}}}, "then": {"required": ["ts", "s", "tid"]}},
            {"if": {"properties": {"ph": {"const": "C"}}},
             "then": {"required": ["ts", "args"], "properties": {"args": {"additionalProperties": _NUM}}}},
            {"if": {"properties": {"ph": {"const": "M"}}}, "then": {"required": ["args"]}},
        ]}},
        "displayTimeUnit": {"enum": ["ms", "ns"]}},
}


def _docs(tmp_path, n=24):
    words = "copy a file remove the directory tree sort numbers in place read lines of text".split()
    rng = np.random.default_rng(0)
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, size=int(rng.integers(4, 30)))) for _ in range(n)) + "\n")
    return path


def test_hooks_do_nothing_without_a_profiler():
    assert not trace.active()
    assert trace.begin("x", a=1) is None
    trace.end(None)
    called = []
    trace.counter("engine", lambda: called.append(1) or {"x": 1})
    assert not called  # the value is never computed when nothing listens
    with trace.span("y"):
        pass


def test_profile_rerank_trace_is_valid_and_has_the_stages(llama_bundle, tmp_path, capsys):
    import jsonschema

    out = tmp_path / "prof"
    docs = _docs(tmp_path)
    assert main(["profile", str(llama_bundle), "rerank", "-q", "copy a file", "-d", str(docs), "-m", "40MB",
                 "--pruning", "off", "--out", str(out), "--ops", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    doc = json.loads((out / "trace.json").read_text())
    jsonschema.validate(doc, TRACE_SCHEMA)
    events = doc["traceEvents"]
    spans = {e["name"] for e in events if e["ph"] == "X" and e["pid"] == 1}
    assert {"tokenize", "layer.load", "layer", "chunk", "embed", "head"} <= spans, spans
    instants = {e["name"] for e in events if e["ph"] == "i"}
    assert {"plan", "layer.release"} <= instants
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"RSS (bytes)", "engine-known bytes", "budget line (bytes)"} <= counters
    if sys.platform.startswith("linux"):
        assert "RSS by kind (bytes)" in counters
    ops = [e for e in events if e["ph"] == "X" and e["pid"] == 2]
    assert any(e["name"] == "MatMul" for e in ops), "onnxruntime's per-operator events are merged"
    # spans sit inside the profile's time range, and the operators on the same clock (within the call)
    end = summary["duration_s"] * 1e6
    assert all(-1e3 <= e["ts"] <= end + 1e3 for e in events if e["ph"] == "X" and e["pid"] == 1)
    layer_ts = [e["ts"] for e in events if e["ph"] == "X" and e["name"] == "layer"]
    assert min(layer_ts) - 5e6 <= np.median([e["ts"] for e in ops]) <= end + 1e3
    # one "layer" span per layer of the bundle, each after its load began
    from edge_sel.runtime import Bundle

    n_layers = len(Bundle.open(llama_bundle).spec.layers)
    assert sorted(e["args"]["layer"] for e in events if e["ph"] == "X" and e["name"] == "layer") == list(range(n_layers))
    for f in ("memory.png", "report.html", "profile.json"):
        assert (out / f).stat().st_size > 1000
    assert summary["budget_bytes"] == 40 * 10**6 or summary["budget_bytes"] == 40 << 20
    assert [r["component"] for r in summary["plan"]] == ["weights", "hidden", "total"]


def _sample_after_largest(res, key):
    """The first sample after the engine reported its largest ``key`` (the attribution there must count it)."""
    counts = [e for e in res.events if e.kind == "counter" and key in e.args]
    assert counts and max(e.args[key] for e in counts) > 0
    t = max(counts, key=lambda e: e.args[key]).t0
    sample = next(s for s in res.samples if s.t >= t)
    assert res.attribution(sample)["engine"][key] > 0
    return sample


def _adds_up(att):
    assert att["sum_bytes"] is not None
    assert abs(att["sum_bytes"] - att["rss_bytes"]) <= 0.10 * att["rss_bytes"], att
    growth = att["rss_bytes"] - att["baseline_bytes"]
    # the engine-known bytes are resident: they fit inside the anonymous growth (slack: sampling lag)
    assert att["other_anon_bytes"] >= -0.10 * max(growth, 1 << 20), att


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory by kind comes from /proc (Linux)")
def test_attribution_adds_up_rerank_and_generate(llama_bundle, gen_llama_bundle):
    from edge_sel.runtime import Generator, Reranker

    docs = ["copy a file to another place " * (1 + i % 5) for i in range(40)]
    with Profiler(interval=0.002) as prof:
        rr = Reranker(llama_bundle, memory_budget="40MB", pruning="off")
        rr.rank("copy a file", docs)
        rr.close()
    res = prof.result
    _adds_up(res.attribution())
    _adds_up(res.attribution(_sample_after_largest(res, "hidden_bytes")))
    with Profiler(interval=0.002) as prof:
        gen = Generator(gen_llama_bundle, kv_budget=64, policy="streaming_llm")
        gen.generate(list(range(5, 300)), max_new_tokens=8)
        gen.close()
    res = prof.result
    _adds_up(res.attribution())
    _adds_up(res.attribution(_sample_after_largest(res, "kv_bytes")))
    names = [e.name for e in res.events]
    assert names.count("prefill.layer") == 4 and names.count("decode") == 7 and "evict" in names
    # building the engine (every layer's sessions; an int4 bundle's peak, when MatMulNBits prepacks) is a stage too
    assert names.count("layer.load") == 4 and names.count("head.load") == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file-backed pages per mapping come from /proc (Linux)")
def test_weights_are_the_file_backed_growth(llama_bundle):
    """The profile's 'weights' (file-backed growth) match the bundle's own mapped pages read from /proc/self/smaps."""
    from edge_sel.runtime import Reranker

    import edge_sel.runtime.rerank  # noqa: F401  libraries loaded before the profile

    with Profiler(interval=0.002) as prof:
        rr = Reranker(llama_bundle, pruning="off")  # unbudgeted: every layer stays mapped after the call
        rr.rank("copy a file", ["copy a file to another place", "sort a list"] * 4)
        root = str(llama_bundle)
        mapped, cur = 0, None
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if len(head) >= 5 and "-" in head[0]:
                    cur = line.rstrip("\n").split(None, 5)[-1] if len(head) >= 6 else ""
                elif head and head[0] == "Rss:" and cur and cur.startswith(root):
                    mapped += int(head[1]) * 1024
        weights = prof.samples[-1].file - prof.samples[0].file if prof.samples[0].file is not None else None
        rr.close()
    assert mapped > 0 and weights is not None
    assert abs(weights - mapped) <= 0.10 * mapped + (1 << 20), (weights, mapped)


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or os.environ.get("EDGE_SEL_NO_BROWSER_INSTALL"):
        return found
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:  # Debian's chromium, installed once by the test setup (CI runs as root on a fresh machine)
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300, env=env)
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, capture_output=True, timeout=900, env=env)
        except (subprocess.SubprocessError, OSError):
            return None
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium():
    path = _chromium()
    if path is None:
        pytest.skip("no headless chromium here (install Debian's chromium; the test setup does so as root with apt)")
    return path


def test_report_renders_in_headless_chromium(bert_bi_bundle, tmp_path, capsys, chromium):
    from matplotlib.image import imread

    out = tmp_path / "prof"
    assert main(["profile", str(bert_bi_bundle), "rerank", "-q", "copy a file", "-d", str(_docs(tmp_path, 12)),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,1400", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=180)
    img = imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1200
    # the embedded plot and the tables drew something: many distinct colours, not a blank page
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50
