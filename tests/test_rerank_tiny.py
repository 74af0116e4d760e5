"""Export + layer-streaming runtime on small random-weight models of each family (real ORT sessions)."""

import numpy as np
import pytest

from edge_sel.runtime.errors import BudgetError, InputError
from edge_sel.runtime.memory import trim_heap
from edge_sel.runtime import Reranker


@pytest.mark.parametrize("fixture", ["bert_bi_bundle", "bert_ce_bundle", "llama_bundle"])
def test_budget_streaming_matches_all_resident(fixture, request, docs):
    bundle = request.getfixturevalue(fixture)
    documents, queries = docs
    full = Reranker(bundle)
    minimum = full.minimum_budget(queries[0], documents)
    tight = Reranker(bundle, memory_budget=minimum + full.planner.layer_bytes // 2)
    for q in queries[:1]:
        a = full.predict(q, documents)
        b = tight.predict(q, documents)
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert tight.last_stats["window_layers"] == 2
        assert tight.last_stats["chunk_tokens"] < full.last_stats["chunk_tokens"]
        assert tight.last_stats["n_chunks"] >= full.last_stats["n_chunks"]
        # all resident, nothing to prune: encoders run chunk by chunk through every layer (depth-first); streamed
        # layers and prefix-reuse decoders keep every candidate at the same layer (monolithic)
        assert full.last_stats["order"] == ("monolithic" if fixture == "llama_bundle" else "depth-first")
        assert tight.last_stats["order"] == "monolithic"
        assert full.last_stats["live_per_layer"] == [len(documents)] * len(full.bundle.layers)
        assert np.std(a) > 0  # scores actually depend on the document
    with pytest.raises(BudgetError):
        Reranker(bundle, memory_budget=minimum - 1).predict(queries[0], documents)


def test_depth_first_under_a_budget_only_where_the_table_pages_fit(bert_ce_bundle, docs):
    """Depth-first keeps the embedding table mapped during the layers; the plan counts the table and the layers as
    successive peaks, so under a budget depth-first needs the unused kept-states room to cover the touched pages.
    The tiny model's 128-byte rows make every touched page count far more than its hidden states."""
    documents, queries = docs
    free = Reranker(bert_ce_bundle)
    ref = free.predict(queries[0], documents)
    assert free.last_stats["order"] == "depth-first"
    roomy = Reranker(bert_ce_bundle, memory_budget=free.minimum_budget(queries[0], documents) * 20)
    np.testing.assert_allclose(roomy.predict(queries[0], documents), ref, atol=1e-5)
    assert roomy.last_stats["window_layers"] == len(roomy.bundle.layers)  # everything resident ...
    assert roomy.last_stats["order"] == "monolithic"                      # ... but the table pages do not fit


@pytest.mark.parametrize("fixture", ["bert_bi_bundle", "bert_ce_bundle", "llama_bundle"])
def test_rank_conventions(fixture, request, docs):
    bundle = request.getfixturevalue(fixture)
    documents, queries = docs
    rr = Reranker(bundle)
    scores = rr.predict(queries[0], documents)
    res = rr.rank(queries[0], documents, top_k=5, return_documents=True)
    assert [r["corpus_id"] for r in res] == list(np.argsort(-scores, kind="stable")[:5])
    assert all(r["text"] == documents[r["corpus_id"]] for r in res)
    assert res[0]["score"] >= res[-1]["score"]
    # top_k larger than N is clamped to N
    assert len(rr.rank(queries[0], documents[:3], top_k=10)) == 3
    st = rr.last_stats
    for key in ("latency_s", "peak_rss_bytes", "window_layers", "chunk_size", "live_per_layer"):
        assert key in st


def test_bad_inputs(bert_ce_bundle, docs):
    documents, queries = docs
    rr = Reranker(bert_ce_bundle)
    with pytest.raises(InputError, match="empty"):
        rr.rank(queries[0], [])
    with pytest.raises(InputError, match="top_k"):
        rr.rank(queries[0], documents, top_k=0)
    with pytest.raises(InputError, match="query"):
        rr.rank("  ", documents)
    with pytest.raises(InputError, match="list of strings"):
        rr.rank(queries[0], "a single string")


def test_budget_below_minimum_is_refused(llama_bundle, docs):
    with pytest.raises(BudgetError) as e:
        Reranker(llama_bundle, memory_budget="1MB")
    assert e.value.minimum_bytes and e.value.minimum_bytes > 1_000_000
    documents, queries = docs
    rr = Reranker(llama_bundle, memory_budget=Reranker(llama_bundle).planner.static_minimum())
    with pytest.raises(BudgetError, match="minimum") as e:
        rr.rank(queries[0], documents * 20)
    assert e.value.minimum_bytes > rr.memory_budget


def test_truncation_warns(bert_ce_bundle, caplog):
    rr = Reranker(bert_ce_bundle)
    long_doc = "word " * 2000
    with caplog.at_level("WARNING"):
        res = rr.rank("a query about words", [long_doc, "short one"], top_k=2)
    assert len(res) == 2
    assert "1 of 2 documents" in caplog.text and "truncated" in caplog.text


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_other_decoder_families_export_and_match(kind, tmp_path, docs):
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.export import export
    from tiny_models import make_decoder

    out = export(make_decoder(tmp_path / "hf", kind=kind, layers=2), tmp_path / "b", verify=True)
    b = Bundle.open(out)
    assert b.manifest["export"]["verified_max_abs_diff"] < 1e-4
    assert b.manifest["model"]["model_type"] == kind


@pytest.mark.parametrize("cross", [True, False])
def test_xlm_roberta_family(cross, tmp_path):
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.export import export
    from tiny_models import make_bert

    out = export(make_bert(tmp_path / "hf", kind="xlm-roberta", cross_encoder=cross, layers=2), tmp_path / "b", verify=True)
    b = Bundle.open(out)
    assert b.manifest["export"]["verified_max_abs_diff"] < 1e-4
    import json

    pad = json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"]
    assert b.manifest["embedding"]["position_offset"] == pad + 1  # RoBERTa positions start after padding_idx


@pytest.mark.parametrize("fixture", ["bert_bi_bundle", "llama_bundle"])
def test_spilled_hidden_states_match_resident(fixture, request, docs, tmp_path):
    """A budget too small for every candidate's kept hidden states spills them to files: same scores,
    and the spill directory is gone afterwards; with spill=False the same budget is refused."""
    bundle = request.getfixturevalue(fixture)
    documents, queries = docs
    documents = documents * 6
    full = Reranker(bundle)
    ref = full.predict(queries[0], documents)
    size = full.call_size(queries[0], documents)
    resident = full.planner.resident_minimum(size.total_tokens, size.max_len, size.embed_bytes, size.n_items, size.token_bytes, size.count)
    spill_min = full.planner.spill_minimum(size.max_len, size.embed_bytes, size.n_items, size.token_bytes, size.count)
    assert spill_min < resident
    budget = (spill_min + resident) // 2
    rr = Reranker(bundle, memory_budget=budget, spill_dir=tmp_path)
    got = rr.predict(queries[0], documents)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert rr.last_stats["spill"] is True and rr.last_stats["spill_bytes_written"] > 0
    assert list(tmp_path.iterdir()) == []
    assert [r["corpus_id"] for r in rr.rank(queries[0], documents, top_k=5)] == list(np.argsort(-ref, kind="stable")[:5])
    with pytest.raises(BudgetError, match="minimum") as e:
        Reranker(bundle, memory_budget=budget, spill=False).predict(queries[0], documents)
    assert e.value.minimum_bytes == resident


def test_spill_with_pruning_keeps_exact_scores(bert_ce_bundle, docs, tmp_path):
    """Pruning re-packs chunks; with spilled states the survivors' scores equal the unpruned model's."""
    from edge_sel.runtime.rerank import Schedule

    documents, queries = docs
    documents = documents * 6
    full = Reranker(bert_ce_bundle, pruning="off")
    ref = full.predict(queries[0], documents)
    sched = Schedule(method="head", top_k=3, layers=[0], margins=[0.0], floor=3)
    size = full.call_size(queries[0], documents)
    spill_min = full.planner.spill_minimum(size.max_len, size.embed_bytes, size.n_items, size.token_bytes, size.count)
    rr = Reranker(bert_ce_bundle, memory_budget=spill_min + full.planner.layer_bytes // 2, pruning=sched, spill_dir=tmp_path)
    res = rr.rank(queries[0], documents, top_k=3)
    assert rr.last_stats["spill"] is True and rr.last_stats["n_pruned"] > 0
    for r in res:
        if "pruned_at_layer" not in r:
            assert r["score"] == pytest.approx(float(ref[r["corpus_id"]]), abs=1e-5)
    assert list(tmp_path.iterdir()) == []



def test_plan_counts_embedding_and_layer_stage_as_successive_peaks(llama_bundle, docs):
    """The embedding table is unmapped before the first layer loads, so the plan gives the layer stage
    (window + chunk activations) the room the touched embedding pages had: the chunk does not shrink with
    the embedding bytes as long as those stay below the layer stage's own peak; the minimum grows only past it.
    Measured: the call's peak above its start stays within the budget."""
    rr = Reranker(llama_bundle)
    p = rr.planner
    total, max_len = 4000, 60
    layer_stage = 2 * p.layer_bytes + p.act_bytes_per_token(max_len) * max_len
    base = p.resident_minimum(total, max_len, 0)
    budget = base + 40 * p.act_bytes_per_token(max_len) * max_len
    chunk0 = p.plan(budget, total, max_len, 0).chunk_tokens
    assert p.plan(budget, total, max_len, layer_stage // 2).chunk_tokens == chunk0
    assert p.resident_minimum(total, max_len, layer_stage // 2) == base
    assert p.resident_minimum(total, max_len, layer_stage + 1000) == base + 1000
    documents, queries = docs
    documents = documents * 4
    size = rr.call_size(queries[0], documents)
    need = p.resident_minimum(size.total_tokens, size.max_len, size.embed_bytes, size.n_items, size.token_bytes, size.count)
    tight = Reranker(llama_bundle, memory_budget=need + 2 * 1024**2)
    ref = rr.predict(queries[0], documents)
    np.testing.assert_allclose(tight.predict(queries[0], documents), ref, atol=1e-5)
    st = tight.last_stats
    assert st["spill"] is False
    assert st["peak_rss_bytes"] - st["start_rss_bytes"] <= need + 2 * 1024**2


def test_budget_holds_in_a_fragmented_heap(llama_bundle, docs):
    """A long-lived process's heap is full of holes (earlier work freed, trimmed back to the kernel): glibc's best
    fit puts chunk after chunk into a different hole, so RSS climbs although live memory stays flat and a run without
    the guard exceeds the budget. The reranker's heap guard trims between chunks once growth nears the budget."""
    documents, queries = docs
    documents = documents * 4
    rr = Reranker(llama_bundle)
    budget = rr.minimum_budget(queries[0], documents) + 2 * 1024**2
    tight = Reranker(llama_bundle, memory_budget=budget)
    ref = rr.predict(queries[0], documents)
    # fragment the heap: 3,000 blocks of 0.2-200 KB (malloc'd, not touched), every other one freed, holes trimmed
    blocks = [np.empty(int(s), np.uint8) for s in np.random.default_rng(0).integers(200, 200_000, 3000)]
    kept = blocks[::2]
    del blocks
    trim_heap()
    np.testing.assert_allclose(tight.predict(queries[0], documents), ref, atol=1e-5)
    st = tight.last_stats
    assert st["peak_rss_bytes"] - st["start_rss_bytes"] <= budget
    assert st["heap_trims"] >= 1
    del kept


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta"])
def test_cross_encoder_final_layer_computes_the_first_token_only(tmp_path, kind):
    """A CLS-pooled cross-encoder's last layer graph returns only the first token, equal to the torch layer's
    first-token output (padded rows included); every other layer and the bi-encoder keep all tokens."""
    import onnxruntime as ort
    import torch
    from tiny_models import make_bert
    from transformers import AutoModelForSequenceClassification

    from edge_sel.runtime.bundle import Bundle
    from edge_sel.export import export

    hf = make_bert(tmp_path / "hf", kind=kind, cross_encoder=True)
    b = Bundle.open(export(hf, tmp_path / "bundle", verify=True))
    assert b.manifest["final_layer_output"] == "first_token"
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    layer = getattr(model, model.base_model_prefix).encoder.layer[-1]
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 9, b.dims["hidden"])).astype(np.float32)
    mask = np.ones((3, 9), dtype=np.float32)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    sess = ort.InferenceSession(str(b.layer_path(len(b.layers) - 1)), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"hidden": h, "mask": mask})[0]
    assert out.shape == (3, 1, b.dims["hidden"])
    with torch.no_grad():
        bias = (1.0 - torch.from_numpy(mask))[:, None, None, :] * torch.finfo(torch.float32).min
        ref = layer(torch.from_numpy(h), attention_mask=bias)[0][:, :1].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    first = ort.InferenceSession(str(b.layer_path(0)), providers=["CPUExecutionProvider"])
    assert first.run(None, {"hidden": h, "mask": mask})[0].shape == h.shape


def test_bi_encoder_keeps_every_token_at_the_final_layer(bert_bi_bundle):
    from edge_sel.runtime.bundle import Bundle

    assert Bundle.open(bert_bi_bundle).manifest["final_layer_output"] == "all_tokens"


@pytest.mark.parametrize("fixture, strategy", [("bert_bi_bundle", "BiEncoderScoring"), ("bert_ce_bundle", "CrossEncoderScoring"),
                                               ("llama_bundle", "YesNoScoring")])
def test_scoring_strategy_and_public_stats(fixture, strategy, request, docs):
    """The scoring strategy is chosen from the bundle; the CLI's view of the stats is the public fields, in order."""
    bundle = request.getfixturevalue(fixture)
    documents, queries = docs
    rr = Reranker(bundle)
    assert type(rr.scoring).__name__ == strategy
    rr.rank(queries[0], documents, top_k=3)
    pub = rr.stats.public()
    assert list(pub) == ["latency_s", "tokenize_s", "embed_s", "layers_s", "head_s", "layer_load_wait_s", "peak_rss_bytes",
                         "start_rss_bytes", "window_layers", "chunk_size", "chunk_tokens", "n_chunks", "memory_budget_bytes",
                         "live_per_layer", "n_layers", "n_documents", "n_truncated", "layer_loads", "pruning",
                         "layer_work_saved", "token_work_saved", "n_pruned", "dropped_layers", "provider"]
    assert pub == {k: rr.last_stats[k] for k in pub}
    assert {"order", "plan_estimate", "spill", "heap_trims"} <= set(rr.last_stats) and "spill_bytes_written" not in rr.last_stats
    assert pub["n_documents"] == len(documents) and pub["live_per_layer"] == [len(documents)] * len(rr.bundle.layers)


def test_skipping_layers_runs_without_them_and_restores(bert_ce_bundle, docs):
    """``Reranker.skipping`` leaves layers out for the calls inside the block only (layer-drop measurement)."""
    documents, queries = docs
    rr = Reranker(bert_ce_bundle, pruning="off")
    full = rr.predict(queries[0], documents)
    with rr.skipping([1]):
        skipped = rr.predict(queries[0], documents)
        assert len(rr.last_stats["live_per_layer"]) == len(rr.bundle.layers) - 1
    assert np.abs(skipped - full).max() > 1e-6  # a real change (the same layers give bit-identical scores)
    np.testing.assert_array_equal(rr.predict(queries[0], documents), full)
    assert len(rr.last_stats["live_per_layer"]) == len(rr.bundle.layers)


def test_trace_observes_every_layer_of_every_chunk(bert_bi_bundle, docs):
    """``Reranker.trace`` scores like ``predict`` and shows the observer each layer's output on every item."""
    documents, queries = docs
    rr = Reranker(bert_bi_bundle, pruning="off")
    seen = []
    traced = rr.trace(queries[0], documents, seen.append)
    np.testing.assert_allclose(traced, rr.predict(queries[0], documents), atol=1e-6)
    for layer in range(len(rr.bundle.layers)):
        obs = [o for o in seen if o.layer == layer]
        items = np.sort(np.concatenate([o.items for o in obs]))
        assert list(items) == list(range(len(documents) + 1))  # every document and the query
        for o in obs:
            assert o.hidden_out.shape == o.hidden_in.shape and o.pooled.shape == (len(o.items), o.hidden_out.shape[2])


def test_chunks_side_by_side_match_multithreaded_sessions(llama_bundle, docs, monkeypatch):
    """Without a budget a split decoder runs single-threaded sessions on several chunks of a layer at once (one per
    core); scores, a pruned ranking and the traced layers equal those of multi-threaded sessions run chunk by chunk."""
    import os

    documents, queries = docs
    documents = documents * 3  # several chunks per layer
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.delenv("EDGE_SEL_THREADS", raising=False)
    schedule = {"method": "head", "rule": "rank", "top_k": 5, "layers": [{"layer": 1, "keep": 0.5}]}
    side = Reranker(llama_bundle, pruning=schedule)
    serial = Reranker(llama_bundle, pruning=schedule, threads=2)
    assert side.workers == 3 and serial.workers == 1
    assert Reranker(llama_bundle, memory_budget="64MB").workers == 1  # streamed layers: one session at a time
    for q in queries[:2]:
        np.testing.assert_allclose(side.predict(q, documents), serial.predict(q, documents), atol=1e-5)
        assert side.last_stats["n_chunks"] > 3 and side.last_stats["final_layer_last_token_only"]
        a, b = side.rank(q, documents, top_k=5), serial.rank(q, documents, top_k=5)
        assert side.last_stats["n_pruned"] == serial.last_stats["n_pruned"] > 0
        assert [r["corpus_id"] for r in a] == [r["corpus_id"] for r in b]
        np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-5)
    seen: dict[str, list] = {"side": [], "serial": []}
    side.trace(queries[0], documents, seen["side"].append)
    serial.trace(queries[0], documents, seen["serial"].append)
    key = lambda o: (o.layer, int(o.items[0]))  # noqa: E731
    for x, y in zip(sorted(seen["side"], key=key), sorted(seen["serial"], key=key)):
        assert x.layer == y.layer and list(x.items) == list(y.items)
        np.testing.assert_allclose(x.hidden_out, y.hidden_out, atol=1e-5)
    assert len(seen["side"]) == len(seen["serial"]) > 2 * len(side.bundle.layers)
    side.close()
