"""Execution providers: the choice from injected platform facts (the available-provider lists of a Linux wheel, a
macOS wheel, a CUDA build), and end to end on this machine's onnxruntime — real sessions, real node assignment."""

import json

import onnxruntime as ort
import pytest

from edge_sel import cli
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.providers import COREML, CPU, ProviderChoice, choose, coreml_options

LINUX_WHEEL = ["AzureExecutionProvider", CPU]
MACOS_WHEEL = [COREML, "AzureExecutionProvider", CPU]
CUDA_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
AVAILABLE = ort.get_available_providers()


def test_auto_takes_coreml_on_macos_and_cpu_elsewhere():
    mac = choose("auto", MACOS_WHEEL)
    assert mac.providers == (COREML, CPU)  # the CPU last: what CoreML cannot take falls back to it
    assert mac.options[0]["ModelFormat"] == "MLProgram" and mac.options[0]["MLComputeUnits"] == "ALL"
    assert mac.options[1] == {}
    assert choose("auto", LINUX_WHEEL).providers == (CPU,)
    assert choose(None, LINUX_WHEEL).providers == (CPU,)
    assert choose("auto", CUDA_BUILD).providers == (CPU,)  # server GPUs only by name


def test_named_providers_short_and_full():
    assert choose("cpu", LINUX_WHEEL) == ProviderChoice("cpu", (CPU,), ({},))
    assert choose("CoreML", MACOS_WHEEL).providers == (COREML, CPU)
    assert choose(COREML, MACOS_WHEEL).providers == (COREML, CPU)
    assert choose("cuda", CUDA_BUILD).providers == ("CUDAExecutionProvider", CPU)
    assert choose("AzureExecutionProvider", LINUX_WHEEL).providers == ("AzureExecutionProvider", CPU)


def test_unavailable_and_unknown_providers_are_refused_in_one_line():
    with pytest.raises(InputError) as e:
        choose("coreml", LINUX_WHEEL)
    msg = str(e.value)
    assert "coreml" in msg and "not available" in msg and "available: cpu" in msg and "\n" not in msg
    with pytest.raises(InputError, match="not known"):
        choose("warp-drive", MACOS_WHEEL)
    with pytest.raises(InputError, match="not available"):
        choose("cuda", MACOS_WHEEL)


def test_coreml_options_are_checked_and_override_the_defaults():
    assert coreml_options("CPUAndNeuralEngine")["MLComputeUnits"] == "CPUAndNeuralEngine"
    assert coreml_options(cache_dir="/tmp/c")["ModelCacheDirectory"] == "/tmp/c"
    with pytest.raises(InputError, match="compute units"):
        coreml_options("GPUOnly")
    with pytest.raises(InputError, match="model format"):
        coreml_options(model_format="Pickle")
    c = choose("coreml", MACOS_WHEEL, {COREML: coreml_options("CPUOnly", "NeuralNetwork")})
    assert c.options[0]["MLComputeUnits"] == "CPUOnly" and c.options[0]["ModelFormat"] == "NeuralNetwork"


def test_reranker_on_cpu_reports_provider_nodes_and_load_time(bert_ce_bundle, docs):
    from edge_sel.runtime import Reranker

    rr = Reranker(bert_ce_bundle, provider="cpu")
    rr.rank("a query", docs[0][:6], top_k=3)
    p = rr.last_stats["provider"]
    n_graphs = len(rr.bundle.spec.layers) + 1  # layers + head
    assert p["provider"] == "cpu" and p["providers"] == ["cpu"]
    assert p["graphs"] == n_graphs and p["sessions_loaded"] >= n_graphs
    assert p["nodes_by_provider"]["cpu"] > 0 and p["cpu_fallback_nodes"] == 0
    assert p["session_load_s"] > 0
    rr.close()


def test_streamed_layers_count_their_load_time_per_call(bert_ce_bundle, docs):
    from edge_sel.runtime import Reranker

    d = docs[0][:6]
    full = Reranker(bert_ce_bundle)
    rr = Reranker(bert_ce_bundle, provider="cpu", memory_budget=full.minimum_budget("a query", d))
    full.close()
    rr.rank("a query", d, top_k=3)
    first = rr.last_stats["provider"]
    rr.rank("a query", d, top_k=3)
    second = rr.last_stats["provider"]
    assert rr.last_stats["window_layers"] < rr.last_stats["n_layers"]  # streamed: every call loads its layers again
    assert second["call_sessions_loaded"] == first["call_sessions_loaded"] == len(rr.bundle.spec.layers)
    assert second["call_session_load_s"] > 0
    assert second["sessions_loaded"] == first["sessions_loaded"] + second["call_sessions_loaded"]
    assert second["graphs"] == first["graphs"]  # node assignment counted once per graph
    rr.close()


@pytest.mark.skipif("AzureExecutionProvider" not in AVAILABLE,
                    reason="needs an onnxruntime build with a provider that takes no nodes (the PyPI wheel's Azure EP)")
def test_nodes_another_provider_cannot_take_are_reported_as_cpu_fallback(llama_bundle, docs):
    """The Azure provider claims no node of a local graph: every node falls back to the CPU — the path a CoreML
    session takes for each operator CoreML cannot run, observed through onnxruntime's own assignment record."""
    from edge_sel.runtime import Reranker

    rr = Reranker(llama_bundle, provider="AzureExecutionProvider")
    scores = rr.predict("a query", docs[0][:4])
    ref = Reranker(llama_bundle, provider="cpu").predict("a query", docs[0][:4])
    assert (scores == ref).all()
    p = rr.last_stats["provider"]
    assert p["providers"] == ["AzureExecutionProvider", "cpu"]
    assert p["cpu_fallback_nodes"] == p["nodes_by_provider"]["cpu"] > 0
    assert sum(p["cpu_fallback_ops"].values()) == p["cpu_fallback_nodes"] and "MatMul" in p["cpu_fallback_ops"]
    rr.close()


def test_generator_reports_its_provider(gen_llama_bundle):
    from edge_sel.runtime import Generator

    gen = Generator(gen_llama_bundle, provider="cpu")
    gen.generate("hello", max_new_tokens=2)
    p = gen.last_stats["provider"]
    assert p["provider"] == "cpu" and p["graphs"] == 2 * len(gen.bundle.spec.layers) + 1
    gen.close()


def run_cli(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return (code, *capsys.readouterr())


def test_cli_provider_cpu_end_to_end(bert_bi_bundle, gen_llama_bundle, tmp_path, capsys):
    docs = tmp_path / "d.txt"
    docs.write_text("copy a file\nsort numbers\nread a string\n")
    code, out, err = run_cli(["rerank", bert_bi_bundle, "-q", "files", "-d", docs, "--provider", "cpu", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["stats"]["provider"]["provider"] == "cpu"
    code, out, err = run_cli(["generate", gen_llama_bundle, "-p", "hi", "-n", 2, "--provider", "cpu", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["stats"]["provider"]["provider"] == "cpu"
    code, out, err = run_cli(["bench", bert_bi_bundle, "-n", 3, "-t", 8, "-r", 1, "--warmup", 0, "--pruning", "off",
                              "--provider", "cpu", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["rows"][0]["provider"] == "cpu"


@pytest.mark.skipif(COREML in AVAILABLE, reason="this onnxruntime build has CoreML: nothing to refuse")
@pytest.mark.parametrize("command", ["rerank", "generate", "bench"])
def test_cli_refuses_an_unavailable_provider(command, bert_bi_bundle, gen_llama_bundle, tmp_path, capsys):
    docs = tmp_path / "d.txt"
    docs.write_text("a\nb\n")
    argv = {"rerank": ["rerank", bert_bi_bundle, "-q", "x", "-d", docs],
            "generate": ["generate", gen_llama_bundle, "-p", "hi", "-n", 1],
            "bench": ["bench", bert_bi_bundle, "-r", 1]}[command]
    code, out, err = run_cli(argv + ["--provider", "coreml"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "coreml" in err and "not available" in err and "Traceback" not in err
