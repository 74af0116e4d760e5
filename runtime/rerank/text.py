"""Turn a query and documents into the token ids the bundle's graphs expect (``tokenizers`` only)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.tokenizer import Tokenizer

from .scoring import scoring_class


@dataclass
class Encoded:
    doc_ids: list[np.ndarray]
    doc_types: list[np.ndarray] | None = None
    query_ids: np.ndarray | None = None
    n_truncated: int = 0
    prefix_len: int = 0  # shared prompt prefix length (decoder rerankers)
    extra: dict = field(default_factory=dict)


class TextEncoder:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.scoring = scoring_class(bundle)
        self.max_length = bundle.max_length
        self.tokenizer = Tokenizer(bundle)  # the bundle's tokenizer, shared with the generator
        self.tok = self.tokenizer.tok       # batches of pairs and truncation use the tokenizers object itself
        self.prompt = bundle.spec.prompt  # decoders: the prompt around each document

    def _ids(self, texts: list[str], add_special: bool) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special)]

    def encode(self, query: str, documents: list[str], instruction: str | None = None) -> Encoded:
        if not isinstance(query, str) or not query.strip():
            raise InputError("query is empty")
        return self.scoring.encode(self, query, documents, instruction)

    def encode_single(self, query: str, documents: list[str]) -> Encoded:
        """Query and documents as separate sequences (bi-encoders)."""
        self.tok.enable_truncation(self.max_length)
        try:
            encs = self.tok.encode_batch([query] + list(documents))
        finally:
            self.tok.no_truncation()
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encs]
        truncated = sum(1 for e in encs[1:] if e.overflowing)
        return Encoded(doc_ids=ids[1:], query_ids=ids[0], n_truncated=truncated)

    def encode_pairs(self, query: str, documents: list[str]) -> Encoded:
        """One (query, document) pair per document, the document truncated to fit (cross-encoders)."""
        self.tok.enable_truncation(self.max_length, strategy="only_second")
        try:
            encs = self.tok.encode_batch([(query, d) for d in documents])
        except Exception as e:
            raise InputError(f"query is too long to pair with documents within {self.max_length} tokens ({e})") from None
        finally:
            self.tok.no_truncation()
        return Encoded(
            doc_ids=[np.asarray(e.ids, dtype=np.int64) for e in encs],
            doc_types=[np.asarray(e.type_ids, dtype=np.int64) for e in encs],
            n_truncated=sum(1 for e in encs if e.overflowing),
        )

    def encode_prompt(self, query: str, documents: list[str], instruction: str | None) -> Encoded:
        """The bundle's prompt around each document; the instruction + query part is a shared prefix (decoders)."""
        p = self.prompt
        prefix = p.prefix.format(instruction=instruction or p.instruction, query=query)
        head = self._ids([prefix], False)[0]
        tail = self._ids([p.suffix], False)[0]
        room = self.max_length - len(head) - len(tail)
        if room < 1:
            raise InputError(f"query prompt takes {len(head) + len(tail)} tokens, leaving no room for a document within max length {self.max_length}")
        bodies = self._ids(list(documents), False)
        truncated = sum(1 for b in bodies if len(b) > room)
        ids = [np.asarray(head + b[:room] + tail, dtype=np.int64) for b in bodies]
        return Encoded(doc_ids=ids, n_truncated=truncated, prefix_len=len(head))
