import os
import sys
from pathlib import Path

import pytest

# Tests use their own cache unless the caller points EDGE_SEL_HOME somewhere (CI and devs reuse fetched models).
os.environ.setdefault("EDGE_SEL_HOME", str(Path(__file__).resolve().parent.parent / ".edge_sel_home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # last, so an installed edge_sel wins: for benchmarks/ (not installed)


@pytest.fixture(scope="session")
def docs():
    from edge_sel.export.textdata import docstring_pairs

    pairs = docstring_pairs(limit=80)
    return [p for _, p in pairs[:40]], [q for q, _ in pairs[:5]]


def _tiny_bundle(tmp_path_factory, name, make, **kw):
    from edge_sel.export import export

    root = tmp_path_factory.mktemp(name)
    model_dir = make(root / "hf", **kw)
    out = export(model_dir, root / "bundle", verify=True)
    return out


@pytest.fixture(scope="session")
def bert_bi_bundle(tmp_path_factory):
    from tiny_models import make_bert

    return _tiny_bundle(tmp_path_factory, "bert_bi", make_bert)


@pytest.fixture(scope="session")
def bert_ce_bundle(tmp_path_factory):
    from tiny_models import make_bert

    return _tiny_bundle(tmp_path_factory, "bert_ce", make_bert, cross_encoder=True)


@pytest.fixture(scope="session")
def llama_bundle(tmp_path_factory):
    from tiny_models import make_decoder

    return _tiny_bundle(tmp_path_factory, "llama", make_decoder)


@pytest.fixture(scope="session")
def gen_llama_bundle(tmp_path_factory):
    """A 4-layer random-weight Llama generate bundle, exported once for the generation test modules."""
    from edge_sel.export import export
    from gen_tiny import make_gen_decoder

    root = tmp_path_factory.mktemp("gen_llama")
    hf = make_gen_decoder(root / "hf", kind="llama", layers=4)
    return export(hf, root / "bundle", task="generate", verify=True)


@pytest.fixture(scope="session")
def vector_bundles(tmp_path_factory):
    """The calibrated tiny bundles the shared test vectors (tests/vectors/) were made from, rebuilt: {case: path}."""
    from vectors.make import CASES, export_case

    root = tmp_path_factory.mktemp("vector_bundles")
    return {name: export_case(name, root) for name in CASES}


@pytest.fixture(scope="session")
def vector_bundles_ort(vector_bundles, tmp_path_factory):
    """The vector bundles with their graphs converted to the ORT format: {case: path}."""
    from edge_sel.export.passes.ort_format import convert_to_ort

    root = tmp_path_factory.mktemp("vector_bundles_ort")
    return {name: convert_to_ort(path, root / name) for name, path in vector_bundles.items()}
