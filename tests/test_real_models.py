"""Real weights from the packaged defaults (fetched once into EDGE_SEL_HOME): parity with torch."""

import numpy as np
import pytest

from edge_sel.runtime import Reranker

pytestmark = pytest.mark.real

N_DOCS = 32


def _data():
    from edge_sel.export.textdata import docstring_pairs

    pairs = docstring_pairs()
    docs = [p for _, p in pairs[100:100 + N_DOCS]]
    queries = [pairs[100 + i][0] for i in (0, 7, 19)]
    return queries, docs


@pytest.fixture(scope="module")
def real_bundles(tmp_path_factory):
    from edge_sel.export import export
    from edge_sel.export.sources import fetch

    root = tmp_path_factory.mktemp("real")
    fetch("all-minilm-l6-v2", quiet=True)
    fetch("smollm2-135m-instruct", quiet=True)
    return {
        "bi": export("all-minilm-l6-v2", root / "bi"),
        "ce": export("all-minilm-l6-v2", root / "ce", scoring="cross_encoder", seed=0),
        "yes_no": export("smollm2-135m-instruct", root / "yn"),
    }


def _torch_reference(kind, queries, docs, bundle):
    from edge_sel.export.adapters import adapter_for
    from edge_sel.export.sources import resolve

    resolved = resolve("smollm2-135m-instruct" if kind == "yes_no" else "all-minilm-l6-v2")
    adapter = adapter_for("llama" if kind == "yes_no" else "bert")
    scoring = {"bi": "bi_encoder", "ce": "cross_encoder", "yes_no": "yes_no"}[kind]
    model, tok = adapter.load(resolved, scoring, seed=0)
    rr = Reranker(bundle)
    out = []
    for q in queries:
        enc = rr.encoder.encode(q, docs)
        out.append(adapter.reference_scores(model, tok, scoring, enc.doc_ids, enc.doc_types, query_ids=enc.query_ids))
    return out


@pytest.mark.parametrize("kind", ["bi", "ce", "yes_no"])
def test_parity_with_torch_and_same_top10(kind, real_bundles):
    queries, docs = _data()
    if kind == "yes_no":
        queries = queries[:2]
    refs = _torch_reference(kind, queries, docs, real_bundles[kind])
    rr = Reranker(real_bundles[kind])
    tight = Reranker(real_bundles[kind], memory_budget="192MB" if kind == "yes_no" else "96MB")
    for q, ref in zip(queries, refs):
        mine = rr.predict(q, docs)
        assert np.max(np.abs(mine - ref)) < 1e-3
        top_ref = set(np.argsort(-ref)[:10])
        assert set(np.argsort(-mine)[:10]) == top_ref
        streamed = tight.predict(q, docs)
        assert set(np.argsort(-streamed)[:10]) == top_ref
        assert tight.last_stats["window_layers"] < len(tight.bundle.layers)


def test_minilm_bi_encoder_finds_the_docstring(real_bundles):
    """Real weights give rankings a person recognises: the docstring's own body is near the top."""
    from edge_sel.export.textdata import docstring_pairs

    pairs = docstring_pairs()[:200]
    docs = [p for _, p in pairs]
    rr = Reranker(real_bundles["bi"])
    hits = 0
    for i in range(0, 200, 20):
        res = rr.rank(pairs[i][0], docs, top_k=10)
        hits += any(r["corpus_id"] == i for r in res)
    assert hits >= 7  # a well-trained bi-encoder finds its own docstring near the top most of the time
