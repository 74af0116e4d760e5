"""The fused graph's inputs from token ids or text: what an app builds before ``session.run``.

Rows are the documents' token ids exactly as the streaming runtime tokenizes them (``docs/BUNDLE.md``, "Running a
rerank bundle"), left-aligned and padded on the right; yes/no bundles with split layers pass the shared prompt prefix
once, beside each document's own tokens. :func:`text_feeds` is the reference (it uses the runtime's own encoder).
"""

from __future__ import annotations

from typing import Any

from .fused_rerank import inputs_for
def fused_feeds(spec, doc_ids, prefix_len: int = 0, type_ids=None, query_ids=None) -> dict[str, Any]:
    """The fused graph's inputs from token ids as the runtime's tokenization gives them (``docs/BUNDLE.md``,
    "Running a rerank bundle"): ``doc_ids`` per document (yes/no: the whole prompt, of which the first
    ``prefix_len`` tokens are the shared prefix), ``type_ids`` (cross-encoders), ``query_ids`` (bi-encoders).
    Rows are padded on the right with ``pad_id``."""
    import numpy as np

    names = inputs_for(spec)
    feeds: dict[str, Any] = {}
    if "prefix_ids" in names:
        feeds["prefix_ids"] = np.asarray(doc_ids[0][:prefix_len], dtype=np.int64)[None]
        doc_ids = [x[prefix_len:] for x in doc_ids]
    width = max(len(x) for x in doc_ids)
    ids = np.full((len(doc_ids), width), spec.pad_id, dtype=np.int64)
    mask = np.zeros((len(doc_ids), width), dtype=np.int64)
    types = np.zeros((len(doc_ids), width), dtype=np.int64)
    for i, x in enumerate(doc_ids):
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
        if type_ids is not None:
            types[i, :len(x)] = type_ids[i]
    feeds["input_ids"], feeds["attention_mask"] = ids, mask
    if "token_type_ids" in names:
        feeds["token_type_ids"] = types
    if "query_ids" in names:
        feeds["query_ids"] = np.asarray(query_ids, dtype=np.int64)[None]
    return feeds


def text_feeds(bundle, query: str, documents: list[str], instruction: str | None = None, encoder=None) -> dict[str, Any]:
    """:func:`fused_feeds` for a query and documents, tokenized as the Python runtime tokenizes them (``encoder``: a
    :class:`edge_sel.runtime.rerank.text.TextEncoder` of the bundle, to reuse across calls)."""
    from edge_sel.runtime.rerank.text import TextEncoder

    enc = (encoder or TextEncoder(bundle)).encode(query, list(documents), instruction)
    return fused_feeds(bundle.spec, enc.doc_ids, enc.prefix_len, enc.doc_types, enc.query_ids)
