"""The Core ML backend (``provider="coreml"`` on a bundle with CoreML packages).

On Linux: the choice from injected platform facts; the refusal off macOS through the real API and CLI; every feed the
real engines build (rerank: depth-first, streamed, prefix reuse and last-token-only; generate: prefill and decode,
with and without eviction) recorded on onnxruntime and passed through each package's contract as read from the
package; the planner counting the packages' bytes; coremltools imported without torch. Core ML itself predicts on
macOS only: the parity tests (CoreML backend vs onnxruntime CPU) are at the end, skipped elsewhere."""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools", reason="CoreML packages need the coreml extra (coremltools)")

from edge_sel import cli  # noqa: E402
from edge_sel.runtime import Generator, Reranker  # noqa: E402
from edge_sel.runtime.bundle import Bundle  # noqa: E402
from edge_sel.runtime.coreml import INT32_MAX, CoreMLBackend  # noqa: E402
from edge_sel.runtime.errors import BundleError, InputError  # noqa: E402
from edge_sel.runtime.planning.rerank import SESSION_OVERHEAD  # noqa: E402
from edge_sel.runtime.providers import COREML, CPU, choose, coreml_options  # noqa: E402
from edge_sel.runtime.rerank.reranker import planner_for  # noqa: E402
from edge_sel.runtime.sessions import OnnxRuntimeBackend  # noqa: E402

ON_MAC = sys.platform == "darwin"
NOT_MAC = pytest.mark.skipif(ON_MAC, reason="checks the refusal off macOS")
MAC_ONLY = pytest.mark.skipif(not ON_MAC, reason="Core ML predicts on macOS only; here coremltools converts and reads packages")
LINUX_WHEEL = ["AzureExecutionProvider", CPU]
MACOS_WHEEL = [COREML, "AzureExecutionProvider", CPU]
QUERY = "Return the number of items in a container."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import tiny_coreml_bundles

    return tiny_coreml_bundles(tmp_path_factory, layers=3, context=256)


# ---- choosing the backend ------------------------------------------------------------------------------------------
def test_coreml_on_a_packaged_bundle_selects_the_core_ml_backend_on_macos_only():
    mac = choose("coreml", LINUX_WHEEL, packages=True, system="Darwin")  # no onnxruntime CoreML provider needed
    assert mac.backend == "coreml" and mac.providers == (COREML,) and mac.options[0]["MLComputeUnits"] == "ALL"
    units = choose("CoreML", MACOS_WHEEL, {COREML: coreml_options("CPUAndNeuralEngine")}, packages=True, system="Darwin")
    assert units.backend == "coreml" and units.options[0]["MLComputeUnits"] == "CPUAndNeuralEngine"
    with pytest.raises(InputError) as e:
        choose("coreml", MACOS_WHEEL, packages=True, system="Linux")
    assert "macOS only" in str(e.value) and "Linux" in str(e.value) and "\n" not in str(e.value)
    # without packages, or asked by onnxruntime's full name, or "auto": onnxruntime and its provider, as before
    for c in (choose("coreml", MACOS_WHEEL, packages=False, system="Darwin"),
              choose(COREML, MACOS_WHEEL, packages=True, system="Darwin"),
              choose("auto", MACOS_WHEEL, packages=True, system="Darwin")):
        assert c.backend == "onnxruntime" and c.providers == (COREML, CPU)
    assert choose("cpu", MACOS_WHEEL, packages=True, system="Darwin").backend == "onnxruntime"
    with pytest.raises(InputError, match="no CoreML packages"):
        choose("coreml", LINUX_WHEEL, packages=False, system="Linux")


@NOT_MAC
def test_engines_and_cli_refuse_coreml_off_macos_in_one_line(tiny, tmp_path, capsys):
    for make, name in ((Reranker, "bert_ce"), (Reranker, "llama_rerank"), (Generator, "llama_generate")):
        with pytest.raises(InputError, match="macOS only"):
            make(tiny[name].root, provider="coreml")
        make(tiny[name].root, provider="cpu").close()  # the same bundle on onnxruntime
    docs = tmp_path / "d.txt"
    docs.write_text("one document\nanother document\n")
    code = cli.main(["rerank", str(tiny["bert_ce"].root), "-q", "x", "-d", str(docs), "--provider", "coreml"])
    err = capsys.readouterr().err
    assert code == 2 and "macOS only" in err and err.count("\n") == 1 and "Traceback" not in err


@NOT_MAC
def test_the_backend_refuses_to_open_a_stage_off_macos_and_a_bundle_without_packages(tiny, bert_ce_bundle):
    b = tiny["bert_ce"]
    with pytest.raises(InputError, match="macOS only"):
        CoreMLBackend(b).open(b.layer_path(0))
    with pytest.raises(BundleError, match="no CoreML packages"):
        CoreMLBackend(Bundle.open(bert_ce_bundle))
    with pytest.raises(InputError, match="compute units"):
        CoreMLBackend(b, compute_units="GPUOnly")


def test_the_coremltools_calls_the_backend_makes_exist_with_those_parameters():
    """What the backend calls on macOS, checked against the installed coremltools (it cannot run here)."""
    import inspect

    from edge_sel.runtime.coreml import COMPUTE_UNITS, import_coremltools
    from edge_sel.runtime.providers import COREML_COMPUTE_UNITS

    ct = import_coremltools()
    assert set(COMPUTE_UNITS) == set(COREML_COMPUTE_UNITS)  # every value of the provider option maps
    assert all(isinstance(getattr(ct.ComputeUnit, v), ct.ComputeUnit) for v in COMPUTE_UNITS.values())
    assert {"path", "compute_units"} <= set(inspect.signature(ct.models.CompiledMLModel).parameters)
    assert callable(ct.models.CompiledMLModel.predict)
    assert list(inspect.signature(ct.models.utils.compile_model).parameters)[:2] == ["model", "destination_path"]


# ---- the engines' feeds against each package's contract ------------------------------------------------------------
class Recording(OnnxRuntimeBackend):
    """onnxruntime sessions that keep a copy of every feed the engine hands them, per graph."""

    def __init__(self, bundle, providers):
        super().__init__(providers)
        self.root = bundle.root
        self.calls = defaultdict(list)   # graph -> [(output names, feeds)]
        self.outputs = {}                # graph -> the graph's output names

    def open(self, path, *args, **kw):
        sess = super().open(path, *args, **kw)
        rel = Path(path).relative_to(self.root).as_posix()
        self.outputs[rel] = [o.name for o in sess.get_outputs()]
        calls = self.calls[rel]

        class Session:
            def run(self, names, feeds):
                calls.append((names, {k: np.array(v) for k, v in feeds.items()}))
                return sess.run(names, feeds)

        return Session()


def recorded_runs(monkeypatch, bundle, run) -> Recording:
    import edge_sel.runtime.generate.api as gen_api
    import edge_sel.runtime.rerank.reranker as rr_mod

    made = []

    def backend_for(b, providers, small_ops=False):
        made.append(Recording(b, providers))
        return made[-1]

    monkeypatch.setattr(rr_mod, "backend_for", backend_for)
    monkeypatch.setattr(gen_api, "backend_for", backend_for)
    run(bundle)
    rec = made[0]
    for other in made[1:]:
        for k, v in other.calls.items():
            rec.calls[k] += v
        rec.outputs.update(other.outputs)
    return rec


def rerank_runs(bundle, docs):
    d = docs[0][:12]
    rr = Reranker(bundle, pruning="off")
    rr.rank(QUERY, d, top_k=5)                                     # every layer resident
    small = rr.minimum_budget(QUERY, d)
    rr.close()
    rr = Reranker(bundle, memory_budget=small, pruning="off")   # a window of two layers, streamed
    rr.rank(QUERY, d, top_k=5)
    assert rr.last_stats["window_layers"] < rr.last_stats["n_layers"]
    rr.close()
    rr = Reranker(bundle, pruning="off", last_token_final_layer=False)
    rr.predict(QUERY, d[:3])
    rr.close()


def generate_runs(bundle, _docs):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    for kw in ({}, {"policy": "streaming_llm", "kv_budget": "40KB"}, {"policy": "h2o", "kv_budget": "40KB"},
               {"policy": "mpcache_recall", "kv_budget": "40KB"}):
        g = Generator(bundle, chunk_tokens=16, **kw)
        g.generate(prompt, max_new_tokens=6)
        g.close()


@pytest.mark.parametrize("name", ["bert_bi", "bert_ce", "llama_rerank", "llama_generate"])
def test_every_feed_the_engine_builds_fits_its_package(tiny, docs, monkeypatch, name):
    bundle = tiny[name]
    rec = recorded_runs(monkeypatch, bundle, lambda b: (generate_runs if name == "llama_generate" else rerank_runs)(b, docs))
    backend = CoreMLBackend(bundle)
    stages = {s.graph for s in bundle.spec.coreml.stages.values()}
    assert set(rec.calls) == stages  # every streamed graph ran, and each has a package
    for graph, calls in rec.calls.items():
        contract = backend.contract(bundle.root / graph)
        assert list(contract.outputs) == rec.outputs[graph]  # outputs by name, in the graph's order
        for names, feeds in calls:
            assert names is None or set(names) <= set(contract.outputs)
            got = contract.feeds(feeds, backend.empty_pos)
            for port in contract.inputs:
                src, out = feeds[port.name], got[port.name]
                assert out.shape == src.shape and out.flags.c_contiguous
                if port.dtype == "int32":
                    assert src.dtype == np.int64 and out.dtype == np.int32
                    beyond = src > INT32_MAX                   # the manifest's empty position
                    assert (out[beyond] == backend.empty_pos).all() and (out[~beyond] == src[~beyond]).all()
                else:
                    assert out.dtype == np.float32 and np.array_equal(out, src)
    if name == "llama_generate":  # eviction ran: the empty position was fed and mapped
        kp = [f["key_pos"] for _, f in rec.calls[bundle.spec.layers[0].file]]
        assert any((k > INT32_MAX).any() for k in kp)


def test_a_feed_outside_the_package_contract_is_refused_by_name(tiny):
    b = tiny["llama_rerank"]
    contract = CoreMLBackend(b).contract(b.path(b.spec.qkv_graph(0).file))
    H, L = b.spec.dims.hidden, b.max_length
    ok = {"hidden": np.zeros((2, 5, H), np.float32), "position_ids": np.zeros((2, 5), np.int64)}
    assert contract.feeds(ok)["position_ids"].dtype == np.int32
    with pytest.raises(BundleError, match="'hidden'.*outside"):
        contract.feeds({**ok, "hidden": np.zeros((2, 5, H + 1), np.float32)})       # a fixed size differs
    with pytest.raises(BundleError, match=rf"'hidden' of shape \(2, {L + 1}, {H}\) is outside.*\[1, {L}\]"):  # past max_length
        contract.feeds({"hidden": np.zeros((2, L + 1, H), np.float32), "position_ids": np.zeros((2, L + 1), np.int64)})
    with pytest.raises(BundleError, match="takes inputs"):
        contract.feeds({"hidden": ok["hidden"]})


# ---- the memory budget counts the packages -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert_ce", "llama_rerank"])
def test_the_planner_counts_the_packages_bytes_per_layer(tiny, name):
    b = tiny[name]
    backend = CoreMLBackend(b)
    layer, head = backend.plan_sizes()
    files = b.spec.files

    def package(graph):
        prefix = next(s.package for s in b.spec.coreml.stages.values() if s.graph == graph) + "/"
        return sum(f.size for rel, f in files.items() if rel.startswith(prefix))

    per_layer = [package(L.file) + (package(b.spec.qkv_graph(i).file) if L.qkv else 0) for i, L in enumerate(b.spec.layers)]
    assert layer == max(per_layer) and head == package(b.spec.head.file)
    onnx, cml = planner_for(b, OnnxRuntimeBackend()), planner_for(b, backend)
    assert cml.layer_bytes == layer + SESSION_OVERHEAD
    assert cml.fixed - onnx.fixed == head - files[b.spec.head.file].size
    # fp16 packages are about half the float32 ONNX weights: a smaller per-layer cost and minimum budget
    assert cml.layer_bytes < onnx.layer_bytes and cml.static_minimum() < onnx.static_minimum()


# ---- no torch on the runtime side ----------------------------------------------------------------------------------
IMPORT_CODE = r"""
import json, sys
from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.coreml import CoreMLBackend
b = Bundle.open(sys.argv[1])
c = CoreMLBackend(b).contract(b.layer_path(0))
import coremltools
banned = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum")]
print(json.dumps({"banned": banned, "inputs": [p.name for p in c.inputs], "ct_torch": coremltools._deps._HAS_TORCH}))
"""


def test_the_backend_reads_packages_without_importing_torch(tiny):
    out = subprocess.run([sys.executable, "-c", IMPORT_CODE, str(tiny["bert_ce"].root)], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["banned"] == [] and r["inputs"] == ["hidden", "mask"] and r["ct_torch"] is False


EXPORT_AFTER_CODE = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.coreml import CoreMLBackend
b = Bundle.open(sys.argv[1])
CoreMLBackend(b).contract(b.layer_path(0))  # coremltools now imported without its torch frontend
from tiny_models import make_bert
from edge_sel.export import export
out = export(make_bert(Path(sys.argv[2]) / "hf", layers=1), Path(sys.argv[2]) / "b", format="coreml")
print("STAGES", len(Bundle.open(out).spec.coreml.stages))
"""


def test_export_in_the_same_process_after_the_backend_still_converts(tiny, tmp_path):
    out = subprocess.run([sys.executable, "-c", EXPORT_AFTER_CODE, str(tiny["bert_ce"].root), str(tmp_path),
                          str(Path(__file__).parent)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "STAGES 2" in out.stdout


# ---- numeric parity: macOS only ------------------------------------------------------------------------------------
@MAC_ONLY
@pytest.mark.parametrize("name", ["bert_bi", "bert_ce", "llama_rerank"])
@pytest.mark.parametrize("budgeted", [False, True])
def test_core_ml_backend_ranks_like_onnxruntime_cpu(tiny, docs, name, budgeted):
    b, d = tiny[name], docs[0][:24]
    ref = Reranker(b, provider="cpu", pruning="off")
    budget = ref.minimum_budget(QUERY, d) if budgeted else None
    cml = Reranker(b, provider="coreml", pruning="off", memory_budget=budget)
    want, got = ref.rank(QUERY, d, top_k=10), cml.rank(QUERY, d, top_k=10)
    assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in want]
    assert np.abs(cml.predict(QUERY, d) - ref.predict(QUERY, d)).max() < 1e-2
    p = cml.last_stats["provider"]
    assert p["backend"] == "coreml" and p["sessions_loaded"] > 0
    ref.close(), cml.close()


@MAC_ONLY
def test_core_ml_backend_ranks_minilm_like_onnxruntime_cpu(tmp_path, docs):
    from edge_sel.export import export
    from edge_sel.export.sources import is_fetched

    if not is_fetched("all-minilm-l6-v2"):
        pytest.skip("all-MiniLM-L6-v2 is not fetched (edge-sel models fetch all-minilm-l6-v2)")
    b = Bundle.open(export("all-minilm-l6-v2", tmp_path / "b", format="coreml"))
    ref, cml = Reranker(b, provider="cpu"), Reranker(b, provider="coreml")
    for q in docs[1]:
        assert [r["corpus_id"] for r in cml.rank(q, docs[0], top_k=10)] == [r["corpus_id"] for r in ref.rank(q, docs[0], top_k=10)]
        assert np.abs(cml.predict(q, docs[0]) - ref.predict(q, docs[0])).max() < 1e-2


@MAC_ONLY
@pytest.mark.parametrize("kw", [{}, {"policy": "streaming_llm", "kv_budget": "40KB"}])  # eviction by position only
def test_core_ml_backend_decodes_like_onnxruntime_cpu(tiny, kw):
    """Prefill and decode on Core ML against onnxruntime CPU: the first logits, then every decode step teacher-forced
    on the CPU's greedy tokens (so a near-tie in random weights cannot make the two runs diverge)."""
    b, prompt = tiny["llama_generate"], "The quick brown fox jumps over the lazy dog. " * 4
    ref, cml = Generator(b, provider="cpu", **kw), Generator(b, provider="coreml", **kw)
    want = ref.generate(prompt, max_new_tokens=8, return_logits=True)
    got = cml.generate(prompt, max_new_tokens=1, return_logits=True)
    assert np.abs(np.asarray(got.logits[0]) - np.asarray(want.logits[0])).max() < 1e-2
    a, c = ref.score(prompt, want.tokens), cml.score(prompt, want.tokens)
    assert np.abs(np.asarray(a["nll_tokens"]) - np.asarray(c["nll_tokens"])).max() < 1e-2
    assert cml.last_stats["provider"]["backend"] == "coreml"
    ref.close(), cml.close()
