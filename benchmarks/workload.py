"""The rerank benchmark's workload: real text, deterministic, tokenized once by edge_sel's own encoder.

Documents for a query are a mix of CPython docstring passages (the query's own passage — the
"gold" answer — plus passages of other functions) and windows of Project Gutenberg's *Botchan*
of 100-130 tokens (public-domain text, so the workload ships with the code). A query is a docstring's first sentence. Everything is chosen with
seeded ``random.Random`` instances, so two runs on the same Python version build the same workload.

Every configuration scores exactly the token ids built here (``Reranker(bundle).encoder.encode``),
so differences between configurations are differences of the engines, never of tokenization.
Torch-free: the workers that must not import torch read the JSON this module writes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

DOC_MIN_TOKENS = 100
DOC_MAX_TOKENS = 130
# readable queries first (stdlib functions a person recognises), then evenly spaced docstrings
PREFERRED = ["shutil.copyfile", "json.dumps", "os.path.splitext", "textwrap.dedent", "statistics.median",
             "glob.glob", "difflib.get_close_matches", "base64.b64encode", "heapq.nlargest", "zlib.compress"]


@dataclass
class Query:
    text: str
    name: str            # qualified name of the function whose docstring gave the query
    docs: list[str]
    kinds: list[str]     # "gold" | "docstring" | "botchan" per document
    gold: int            # index of the query's own passage among docs


def _count(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False).ids)


def _cut(tok, words: list[str], max_tokens: int) -> str:
    """The longest prefix of ``words`` whose text has at most ``max_tokens`` tokens (binary search)."""
    lo, hi = 1, len(words)
    if _count(tok, " ".join(words)) <= max_tokens:
        return " ".join(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(tok, " ".join(words[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def botchan_windows(tok, n: int, text: str | None = None) -> list[str]:
    """``n`` consecutive, non-overlapping windows of *Botchan* of DOC_MIN..DOC_MAX tokens each."""
    if text is None:
        from edge_sel.export.textdata import botchan

        text = botchan()
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", text)
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    body = text[start.end() if start else 0: end.start() if end else len(text)]
    words = body.split()
    out, p = [], 0
    while len(out) < n and p < len(words):
        k = 60
        while p + k < len(words) and _count(tok, " ".join(words[p:p + k])) < DOC_MIN_TOKENS:
            k += 5
        window = _cut(tok, words[p:p + k], DOC_MAX_TOKENS)
        out.append(window)
        p += len(window.split())
    if len(out) < n:
        raise ValueError(f"Botchan yields only {len(out)} windows of {DOC_MIN_TOKENS}-{DOC_MAX_TOKENS} tokens, {n} requested")
    return out


def build_queries(tok, n_queries: int, n_docs: int, corpus: str = "mixed", seed: int = 0) -> list[Query]:
    """The benchmark's queries and candidate lists.

    corpus: ``mixed`` (half docstring passages, half Botchan windows) or ``docstrings`` (no download;
    used by the offline smoke test).
    """
    from edge_sel.export.textdata import docstring_items

    items = list(docstring_items())
    passages = [_cut(tok, p.split(), DOC_MAX_TOKENS) for _, _, p in items]
    by_name = {name: i for i, (name, _, _) in enumerate(items)}
    chosen = [by_name[n] for n in PREFERRED if n in by_name][:n_queries]
    step = max(1, len(items) // max(1, n_queries))
    j = 7
    while len(chosen) < n_queries and j < len(items):
        if j not in chosen:
            chosen.append(j)
        j += step
    n_botchan = n_docs - n_docs // 2 if corpus == "mixed" else 0
    n_doc = n_docs - n_botchan
    # sample from a pool 4x the need, capped at 512 windows (Botchan yields ~590 of 100-130 tokens; N=512 asks for
    # 256 per query): unchanged for N <= 256
    pool = botchan_windows(tok, max(min(4 * n_botchan, 512), n_botchan, 64)) if n_botchan else []
    queries = []
    for qi, idx in enumerate(chosen):
        rng = random.Random(seed * 1000 + qi)
        others = rng.sample([i for i in range(len(items)) if i != idx], n_doc - 1)
        docs = [(passages[idx], "gold")] + [(passages[i], "docstring") for i in others]
        docs += [(w, "botchan") for w in rng.sample(pool, n_botchan)]
        rng.shuffle(docs)
        texts = [d for d, _ in docs]
        kinds = [k for _, k in docs]
        queries.append(Query(items[idx][1], items[idx][0], texts, kinds, kinds.index("gold")))
    return queries


def encode_workload(encoder, queries: list[Query]) -> list[dict]:
    """Token ids of every (query, documents) pair, from edge_sel's own encoder, as JSON-ready lists."""
    out = []
    for q in queries:
        enc = encoder.encode(q.text, q.docs)
        out.append({
            "query": q.text, "name": q.name, "gold": q.gold, "kinds": q.kinds, "docs": q.docs,
            "doc_ids": [np.asarray(x).tolist() for x in enc.doc_ids],
            "doc_types": [np.asarray(x).tolist() for x in enc.doc_types] if enc.doc_types is not None else None,
            "query_ids": np.asarray(enc.query_ids).tolist() if enc.query_ids is not None else None,
            "n_truncated": int(enc.n_truncated),
        })
    return out
