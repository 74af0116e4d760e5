"""Documents are read and tokenized batch by batch into a compact token store: the same ids and the same scores as
the whole list held in memory, and a documents file is checked up front with clear limits."""

import json
import os
import threading

import numpy as np
import pytest

from edge_sel.runtime import Reranker
from edge_sel.runtime.documents import DocumentsFile, read_documents
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.rerank import text as text_mod
from edge_sel.runtime.rerank.tokens import TokenStore

BUNDLES = ["bert_bi_bundle", "bert_ce_bundle", "llama_bundle"]


def _write(path, documents):
    path.write_text("\n".join(d.replace("\n", " ") for d in documents) + "\n")
    return path


@pytest.mark.parametrize("fixture", BUNDLES)
@pytest.mark.parametrize("ram_limit", [None, 0])
def test_token_store_rows_equal_the_whole_list_encoding(fixture, ram_limit, request, docs, tmp_path, monkeypatch):
    """Stored in RAM or in a file, in batches of a few documents: every item's ids (and token types) are the ones
    the whole-list encoding gives, the query (bi-encoder) last and a split decoder's prefix apart."""
    monkeypatch.setattr(text_mod, "BATCH_DOCS", 7)  # many small batches
    documents, queries = docs
    rr = Reranker(request.getfixturevalue(fixture))
    enc = rr.encoder.encode(queries[0], documents)
    ids, types = rr.scoring.items(enc)
    store = TokenStore(ram_limit=ram_limit, spill_dir=tmp_path, vocab=rr.embedder.rows)
    streamed = rr.encoder.encode_into(store, queries[0], iter(documents), split=rr.split)
    store.freeze()
    assert store.in_ram == (ram_limit is None) and (ram_limit is None or store.ram_bytes == 0)
    assert store.n_items == len(ids) and streamed.n_docs == len(documents) and streamed.n_truncated == enc.n_truncated
    assert list(streamed.prefix_ids) == (list(enc.doc_ids[0][: enc.prefix_len]) if rr.split else [])
    items = np.arange(store.n_items)[::-1].copy()  # any order, padded to the longest
    got_ids, got_types = store.rows(items, pad_id=-5)
    for r, i in enumerate(items):
        L = len(ids[i])
        np.testing.assert_array_equal(got_ids[r, :L], ids[i])
        assert (got_ids[r, L:] == -5).all()
        if types is not None and i < len(types):
            np.testing.assert_array_equal(got_types[r, :L], types[i])
    assert (got_types is None) == (types is None)
    assert store.unique_ids() == len(np.unique(np.concatenate(ids)))
    store.close()


@pytest.mark.parametrize("fixture", BUNDLES)
def test_streamed_scores_are_bit_identical_to_the_whole_list(fixture, request, docs, tmp_path, monkeypatch):
    """A list, a generator and a documents file, tokenized in small batches, score exactly like the whole list
    encoded at once (``score_encoded``), with every candidate's ids in memory; resident and spilled alike."""
    monkeypatch.setattr(text_mod, "BATCH_DOCS", 5)
    documents, queries = docs
    documents = [d.replace("\n", " ").strip() for d in documents]
    bundle = request.getfixturevalue(fixture)
    path = _write(tmp_path / "docs.txt", documents)
    full = Reranker(bundle)
    size = full.call_size(queries[0], documents)
    spill_budget = full.planner.spill_minimum(size.max_len, size.embed_bytes, size.n_items, size.token_bytes, size.count)
    for budget in (None, spill_budget):
        rr = Reranker(bundle, memory_budget=budget, spill_dir=tmp_path)
        whole = rr.score_encoded(rr.encoder.encode(queries[0], documents))
        assert rr.last_stats["spill"] == (budget is not None)
        np.testing.assert_array_equal(rr.predict(queries[0], documents), whole)
        np.testing.assert_array_equal(rr.predict(queries[0], (d for d in documents)), whole)
        with DocumentsFile(path) as f:
            np.testing.assert_array_equal(rr.predict(queries[0], f), whole)
            top = rr.rank(queries[0], f, top_k=3, return_documents=True)
        assert [r["text"] for r in top] == [documents[r["corpus_id"]] for r in top]
        assert list(tmp_path.iterdir()) == [path]  # nothing of the call's left in the spill folder
    assert np.std(whole) > 0


def test_documents_file_kinds_and_texts(tmp_path):
    plain = _write(tmp_path / "a.txt", ["{braces} open this line", "", "  second  ", "third\u2028fourth"])
    with DocumentsFile(plain) as d:
        assert not d.jsonl and len(d) == 4
        assert list(d) == ["{braces} open this line", "second", "third", "fourth"]
        assert d.texts([3, 0]) == {0: "{braces} open this line", 3: "fourth"}
        assert list(d) == list(d)  # read again from the start
    jl = tmp_path / "b.txt"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 7}) + "\n")
    assert read_documents(jl) == ["one", "two"]


@pytest.mark.parametrize("content, limits, needle", [
    (b"short\n" + b"x" * 101 + b"\nafter\n", {"max_line_bytes": 100}, "line 2 is longer than 100 B"),
    (b"x" * 50 + b"\n", {"max_line_bytes": 100, "max_file_bytes": 20}, "at most 20 B"),
    (b'{"text": "a"}\n{"text": 3}\n', {}, "line 2 has no string 'text'"),
    (b"fine\ncaf\xe9\n", {}, "not UTF-8 text (byte 8"),
    (b"\n  \n", {}, "no documents"),
])
def test_documents_file_refuses_with_one_clear_line(tmp_path, content, limits, needle):
    p = tmp_path / "d.txt"
    p.write_bytes(content)
    with pytest.raises(InputError, match=None) as e:
        DocumentsFile(p, **limits)
    assert needle in str(e.value)


def test_endless_input_is_refused_at_the_line_limit():
    with pytest.raises(InputError, match="line 1 is longer than"):
        DocumentsFile("/dev/zero", max_line_bytes=1 << 16)


def test_a_pipe_is_read_once_and_kept_in_an_unnamed_file(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    lines = [f"document {i} about pipes" for i in range(500)]

    def writer():
        with open(fifo, "w") as f:
            f.write("\n".join(lines) + "\n")

    t = threading.Thread(target=writer)
    t.start()
    with DocumentsFile(fifo, spool_dir=tmp_path) as d:
        t.join()
        assert len(d) == 500 and list(d) == lines and list(d) == lines
        assert d.texts([499]) == {499: lines[499]}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # the copy has no name


@pytest.mark.parametrize("fixture", BUNDLES)
def test_long_documents_are_cut_before_tokenizing_with_the_same_ids(fixture, request, docs):
    """Documents far beyond the model's length are cut at a space before tokenizing (bounded tokenizer memory):
    the ids are the whole text's, also for text that is mostly blanks (tokenized whole) or has no space."""
    from gen_tiny import long_text

    documents, queries = docs
    rr = Reranker(request.getfixturevalue(fixture))
    cut = rr.encoder.cut_chars
    long_docs = [long_text(40 * cut), "word" + " " * (3 * cut) + "end", "x" * (2 * cut), documents[0],
                 long_text(cut + 7), "é " * cut]
    assert sum(text_mod._cut(d, cut) is not d for d in long_docs) >= 3  # really cut
    enc = rr.encoder.encode(queries[0], long_docs)
    ids, types = rr.scoring.items(enc)
    store = TokenStore(vocab=rr.embedder.rows)
    streamed = rr.encoder.encode_into(store, queries[0], long_docs, split=rr.split)
    store.freeze()
    assert streamed.n_truncated == enc.n_truncated >= 3
    for i in range(len(ids)):
        np.testing.assert_array_equal(store.item(i), ids[i])
    np.testing.assert_array_equal(rr.predict(queries[0], long_docs), rr.score_encoded(enc))


def test_dash_reads_standard_input(tmp_path, bert_bi_bundle):
    """``-d -``: the documents come from standard input (a pipe, copied once like any other)."""
    import subprocess
    import sys

    lines = [f"document {i} about pipes" for i in range(40)] + ["copy a file to another place"]
    code = ("import sys; from edge_sel.cli import main; "
            f"sys.exit(main(['rerank', {str(bert_bi_bundle)!r}, '-q', 'copy a file', '-d', '-', '-k', '3', '--json']))")
    res = subprocess.run([sys.executable, "-c", code], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["stats"]["n_documents"] == 41 and len(out["results"]) == 3
    res = subprocess.run([sys.executable, "-c", code], input="\n\n", capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == "edge-sel: error: <stdin> holds no documents (empty file)"
