"""Turn a query and documents into the token ids the bundle's graphs expect (``tokenizers`` only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.tokenizer import Tokenizer

from .scoring import scoring_class
from .tokens import TokenStore


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
        self.cut_chars = CUT_TOKEN_CHARS * self.max_length  # longer documents are cut before tokenizing (_cut_batch)
        # start the tokenizer's worker threads now: their arenas are a one-time cost of the process, not of a call
        self.tok.encode_batch(["a", "b"])

    def _ids(self, texts: list[str], add_special: bool) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special)]

    def encode(self, query: str, documents: list[str], instruction: str | None = None) -> Encoded:
        if not isinstance(query, str) or not query.strip():
            raise InputError("query is empty")
        return self.scoring.encode(self, query, documents, instruction)

    def encode_single(self, query: str, documents: list[str]) -> Encoded:
        """Query and documents as separate sequences (bi-encoders)."""
        query_ids = self._single_batch([query])[0][0]
        ids, _, truncated = self._single_batch(list(documents))
        return Encoded(doc_ids=[np.asarray(x, dtype=np.int64) for x in ids], query_ids=np.asarray(query_ids, dtype=np.int64),
                       n_truncated=sum(truncated))

    def encode_pairs(self, query: str, documents: list[str]) -> Encoded:
        """One (query, document) pair per document, the document truncated to fit (cross-encoders)."""
        ids, types, truncated = self._pairs_batch(query, list(documents))
        return Encoded(doc_ids=[np.asarray(x, dtype=np.int64) for x in ids],
                       doc_types=[np.asarray(x, dtype=np.int64) for x in types], n_truncated=sum(truncated))

    def encode_prompt(self, query: str, documents: list[str], instruction: str | None) -> Encoded:
        """The bundle's prompt around each document; the instruction + query part is a shared prefix (decoders)."""
        head, tail, room = self._prompt_parts(query, instruction)
        ids, _, truncated = self._prompt_batch(list(documents), head, tail, room)
        return Encoded(doc_ids=[np.asarray(x, dtype=np.int64) for x in ids], n_truncated=sum(truncated), prefix_len=len(head))

    # ---- one batch of documents (shared by the whole-list and the streamed encodings) ----------------
    # each returns (ids, token types or None, truncated?) per document
    def _single_batch(self, texts: list[str]) -> tuple[list[list[int]], None, list[bool]]:
        self.tok.enable_truncation(self.max_length)
        try:
            encs = self.tok.encode_batch(texts)
        finally:
            self.tok.no_truncation()
        return [e.ids for e in encs], None, [bool(e.overflowing) for e in encs]

    def _pairs_batch(self, query: str, documents: list[str]) -> tuple[list[list[int]], list[list[int]], list[bool]]:
        self.tok.enable_truncation(self.max_length, strategy="only_second")
        try:
            encs = self.tok.encode_batch([(query, d) for d in documents])
        except Exception as e:
            raise InputError(f"query is too long to pair with documents within {self.max_length} tokens ({e})") from None
        finally:
            self.tok.no_truncation()
        return [e.ids for e in encs], [e.type_ids for e in encs], [bool(e.overflowing) for e in encs]

    def _prompt_parts(self, query: str, instruction: str | None) -> tuple[list[int], list[int], int]:
        p = self.prompt
        prefix = p.prefix.format(instruction=instruction or p.instruction, query=query)
        head = self._ids([prefix], False)[0]
        tail = self._ids([p.suffix], False)[0]
        room = self.max_length - len(head) - len(tail)
        if room < 1:
            raise InputError(f"query prompt takes {len(head) + len(tail)} tokens, leaving no room for a document within max length {self.max_length}")
        return head, tail, room

    def _prompt_batch(self, documents: list[str], head: list[int], tail: list[int], room: int,
                      with_head: bool = True) -> tuple[list[list[int]], None, list[bool]]:
        bodies = self._ids(documents, False)
        return [(head if with_head else []) + b[:room] + tail for b in bodies], None, [len(b) > room for b in bodies]

    def _cut_batch(self, encode: Callable, batch: list[str]):
        """``encode(batch)`` with every document longer than :attr:`cut_chars` cut at a space before that length:
        the model keeps only its first tokens, and tokenizing a whole long line costs ~100-250 bytes a token. The
        words before a space tokenize alone as they do in the whole text, so a cut document that is still truncated
        has exactly the whole one's ids; one that is not (mostly blanks) is tokenized whole after all."""
        cut = [_cut(d, self.cut_chars) for d in batch]
        ids, types, truncated = encode(cut)
        for i, (doc, part) in enumerate(zip(batch, cut)):
            if part is not doc and not truncated[i]:
                one_ids, one_types, one_truncated = encode([doc])
                ids[i], truncated[i] = one_ids[0], one_truncated[0]
                if types is not None:
                    types[i] = one_types[0]
        return ids, types, truncated

    # ---- streamed: documents read and tokenized batch by batch into a TokenStore ----------------------
    def encode_into(self, store: TokenStore, query: str, documents: Iterable[str], instruction: str | None = None,
                    split: bool = False, on_batch: Callable[[], None] | None = None) -> Streamed:
        """Tokenize ``documents`` in bounded batches (:data:`BATCH_DOCS` documents or :data:`BATCH_CHARS` characters)
        straight into ``store`` as the engine's items: the documents, then the query for bi-encoders; a split decoder's
        items leave out the shared prefix (returned in :class:`Streamed`). The same ids as :meth:`encode`."""
        if not isinstance(query, str) or not query.strip():
            raise InputError("query is empty")
        kind = self.scoring.name
        prefix: list[int] = []
        if kind == "yes_no":
            head, tail, room = self._prompt_parts(query, instruction)
            prefix = head if split else []
        out = Streamed(prefix_ids=np.asarray(prefix, dtype=np.int64), prefix_len=len(head) if kind == "yes_no" else 0)
        if kind == "cross_encoder":
            encode = lambda b: self._pairs_batch(query, b)  # noqa: E731
        elif kind == "bi_encoder":
            encode = self._single_batch
        else:
            encode = lambda b: self._prompt_batch(b, head, tail, room, with_head=not split)  # noqa: E731
        for batch in _batches(documents, self.cut_chars):
            ids, types, truncated = self._cut_batch(encode, batch)
            store.add(ids, types)
            out.n_docs += len(batch)
            out.n_truncated += sum(truncated)
            del ids, types
            if on_batch is not None:
                on_batch()
        if out.n_docs == 0:
            raise InputError("no documents to rank (the document list is empty)")
        if kind == "bi_encoder":  # the query runs through the same layers as the last item
            ids, _, _ = self._single_batch([query])
            store.add(ids)
        return out


@dataclass
class Streamed:
    """What :meth:`TextEncoder.encode_into` learnt besides the ids it stored."""

    prefix_ids: np.ndarray          # the shared prompt prefix run once (split decoders), else empty
    prefix_len: int = 0             # the prompt prefix's length (decoders)
    n_docs: int = 0
    n_truncated: int = 0


BATCH_DOCS = 128        # documents tokenized at once; tokenizers keeps ~100-250 bytes of state per token
BATCH_CHARS = 1 << 14   # ... and at most this much text: one batch's state stays within a few MiB


CUT_TOKEN_CHARS = 16    # characters kept per token of max_length before tokenizing a long document


def _cut(text: str, limit: int) -> str:
    """``text`` itself when it has at most ``limit`` characters, else its part before the last space under the
    limit (itself when the second half of that window has no space)."""
    if len(text) <= limit:
        return text
    at = text.rfind(" ", limit // 2, limit)
    return text if at < 0 else text[:at]


def _batches(documents: Iterable[str], cut_chars: int) -> Iterator[list[str]]:
    if isinstance(documents, str):
        raise InputError("documents must be a list of strings, not a single string")
    batch: list[str] = []
    chars = 0
    for i, d in enumerate(documents):
        if not isinstance(d, str):
            raise InputError(f"document {i} is {type(d).__name__}, expected str")
        batch.append(d)
        chars += min(len(d), cut_chars)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
