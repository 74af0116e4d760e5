"""Memory planning: turn a budget into a layer window W and a chunk size, or refuse it up front.

The budget covers the model's own share of the process (peak RSS minus idle RSS): resident layer
weights (W x the largest layer's files, file-backed pages count while mapped), the embedding pages
a gather touches, hidden states kept between layers for every live candidate, the activations of
one chunk inside a layer, plus fixed costs (tokenizer, head, session bookkeeping), plus what the call keeps per
candidate (lengths, offsets, chunk rows, scores, pruning state: :data:`ITEM_BYTES` each, and a bi-encoder's embedding)
and per chunk (:data:`CHUNK_BYTES`), and the candidates' token ids (4-5 bytes a token, or none once they are kept in a
file). A call has three successive stages over what it keeps: tokenizing (one bounded batch of tokenizer state), the
embedding stage (touched table pages and the token ids) and the layer stage (the window and one chunk's activations).

When the kept hidden states of every candidate do not fit, the plan *spills* them to files
(:mod:`edge_sel.runtime.rerank.chunks`): then only the chunk in flight holds hidden states in RAM, and the minimum no longer
grows with the number of candidates except for the few bytes of bookkeeping each one costs. Keeping them resident
is preferred whenever it fits (no I/O).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import BudgetError
from edge_sel.runtime.units import format_min_size, format_size

SESSION_OVERHEAD = 3 * 1024**2   # per live onnxruntime session beyond its weight files (graph, kernels)
FIXED_OVERHEAD = 14 * 1024**2    # head session, tokenizer state, numpy scratch, per-call Python objects, and a margin
# for heap fragmentation in a long-lived process (bounded by edge_sel.runtime.memory.HeapGuard)
SAFETY = 1.0                     # the formula already sits above onnxruntime's real per-layer peak
DEFAULT_CHUNK_TOKENS = 1024  # cache-friendly, no huge attention buffers: faster than longer chunks
DEFAULT_MAX_BATCH = 64
SPLIT_PADDING_TOKENS = 8    # a new chunk rather than padding the open one's rows by more tokens than this in all (one
# more chunk costs each layer two session runs and a prefix K/V copy, about the work of 15-20 tokens)
ITEM_BYTES = 112                 # per candidate: token lengths + offsets (12), chunk rows (16), chunk counting (8),
# scores (4), pruning state (13), re-packing after pruning (~45) and the final ordering (transient) -- all numpy
# arrays, no per-candidate Python objects
CHUNK_BYTES = 512                # per chunk: the Chunk object, its two array views and a spill file's name (~470)
TOKENIZE_BATCH_BYTES = 6 * 1024**2  # tokenizer state of one batch (runtime.rerank.text: ~100-250 bytes a token)


@dataclass
class Plan:
    budget: int | None
    window: int
    chunk_tokens: int
    max_batch: int
    estimate: dict
    spill: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def peak_estimate(self) -> int:
        """The model's share of the process at its peak: fixed costs, kept hidden states, token ids and per-candidate
        bookkeeping, plus the larger of the embedding stage and the layer stage (they do not overlap)."""
        e = self.estimate
        return int(e["fixed"] + e["hidden"] + e.get("tokens", 0) + e.get("bookkeeping", 0)
                   + max(e["embed"], e["layers"] + e["activations"]))


@dataclass(frozen=True)
class CallSize:
    """What a planner needs to know of one call's input (``Reranker.call_size``)."""

    total_tokens: int
    max_len: int
    embed_bytes: int       # embedding-table pages the call's token ids touch
    n_items: int           # candidates: the documents, and the query for bi-encoders
    token_bytes: int       # their token ids, compactly
    count: ChunkCount | None = None  # their lengths, for the number of chunks each chunk size makes


def chunk_runs(sorted_lengths: np.ndarray, chunk_tokens: int, max_batch: int = DEFAULT_MAX_BATCH,
               split_tokens: int = SPLIT_PADDING_TOKENS) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk over candidates sorted by length (ascending). A chunk takes the next row while
    its rows x the newest (longest) row stay within ``chunk_tokens`` and its rows within ``max_batch``, unless that row
    would pad the rows already taken by more than ``split_tokens`` tokens in all: then a new chunk starts (one more
    chunk costs less than that much padding). Walks the distinct lengths, not the rows."""
    s = np.asarray(sorted_lengths, dtype=np.int64)
    runs: list[tuple[int, int]] = []
    if not len(s):
        return runs
    values, counts = np.unique(s, return_counts=True)
    start = rows = width = 0  # the open chunk: first row, rows taken, width
    pos = 0
    for w, c in zip(values.tolist(), counts.tolist()):
        if rows and ((rows + 1) * w > chunk_tokens or rows + 1 > max_batch or rows * (w - width) > split_tokens):
            runs.append((start, pos))
            start, rows = pos, 0
        width = w
        cap = max(1, min(max_batch, chunk_tokens // w))  # rows of width w in one chunk (a longer row goes alone)
        while c:
            take = min(c, cap - rows)
            if take <= 0:
                runs.append((start, pos))
                start, rows = pos, 0
                continue
            rows, c, pos = rows + take, c - take, pos + take
    runs.append((start, pos))
    return runs


class ChunkCount:
    """How many chunks ``chunk_tokens`` makes of candidates of these lengths: the packing of
    :func:`edge_sel.runtime.rerank.chunks.make_chunks` (:func:`chunk_runs`), counted without building the chunks."""

    def __init__(self, lengths: np.ndarray, max_batch: int = DEFAULT_MAX_BATCH):
        self.sorted = np.sort(np.asarray(lengths, dtype=np.int64), kind="stable")
        self.max_batch = max_batch
        self._memo: dict[int, int] = {}

    def __call__(self, chunk_tokens: int) -> int:
        if chunk_tokens not in self._memo:
            self._memo[chunk_tokens] = len(chunk_runs(self.sorted, chunk_tokens, self.max_batch))
        return self._memo[chunk_tokens]


class Planner:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        spec = bundle.spec
        d = spec.dims
        self.H, self.I, self.heads = d.hidden, d.intermediate, d.heads
        self.kv = d.kv_heads * d.head_dim
        self.n_layers = len(spec.layers)
        self.layer_bytes = max(bundle.layer_weight_bytes(i) for i in range(self.n_layers)) + SESSION_OVERHEAD
        tok_file = spec.files[spec.tokenizer.file].size
        head_file = spec.files[spec.head.file].size
        self.fixed = FIXED_OVERHEAD + 6 * tok_file + head_file + SESSION_OVERHEAD
        # a bi-encoder keeps every candidate's embedding (the head's output, at most the hidden size) for the final dot
        self.item_extra = 4 * self.H if spec.scoring == "bi_encoder" else 0

    def act_bytes_per_token(self, seq_len: int) -> int:
        """Peak live activation bytes per token inside one layer run (attention rows grow with length)."""
        per = 4 * (4 * self.H + 2 * self.kv + 3 * self.I + 2 * self.heads * seq_len)
        return int(per * SAFETY)

    def hidden_bytes(self, total_tokens: int, max_len: int) -> int:
        # kept states for every candidate + the output of the chunk in flight
        return int(4 * self.H * (total_tokens * 1.1 + 2 * max_len))

    def spill_hidden_bytes(self, chunk_tokens: int) -> int:
        # a spilled run holds the chunk in flight only: its input, its output and one re-packed chunk
        return int(4 * self.H * 3 * chunk_tokens)

    def bookkeeping_bytes(self, n_items: int, chunk_tokens: int, max_len: int, count: ChunkCount | None = None) -> int:
        """What the call keeps per candidate and per chunk (re-packing after pruning briefly holds two chunk lists).
        ``count``: the exact number of chunks; without it, a bound (every full chunk has at least ``rows`` rows)."""
        if count is not None:
            n_chunks = count(chunk_tokens)
        else:
            rows = max(1, min(DEFAULT_MAX_BATCH, chunk_tokens // max(1, max_len)))
            n_chunks = n_items // rows + 1
        return int(n_items * (ITEM_BYTES + self.item_extra) + 2 * n_chunks * CHUNK_BYTES)

    def need(self, chunk: int, window: int, hidden: int | None, max_len: int, embed_bytes: int = 0, n_items: int = 0,
             token_ram: int = 0, count: ChunkCount | None = None) -> int:
        """Peak share of a call running ``chunk``-token chunks with ``window`` resident layers: fixed costs and
        bookkeeping, then the largest of the three successive stages -- tokenizing (one batch of tokenizer state
        and the token ids), the embedding stage (kept hidden states, token ids, touched table pages) and the layer
        stage (kept hidden states, the window, one chunk's activations). ``hidden``: every candidate's kept
        hidden states (None: spilled, only the chunk in flight's)."""
        kept = self.spill_hidden_bytes(chunk) if hidden is None else hidden
        tokenize = token_ram + TOKENIZE_BATCH_BYTES
        embedding = kept + token_ram + embed_bytes
        layers = kept + window * self.layer_bytes + self.act_bytes_per_token(max_len) * chunk
        return int(self.fixed + self.bookkeeping_bytes(n_items, chunk, max_len, count) + max(tokenize, embedding, layers))

    @staticmethod
    def _chunk_sizes(max_len: int) -> list[int]:
        """Chunk sizes worth trying, largest first: the default and multiples of the longest candidate below it."""
        top = max(DEFAULT_CHUNK_TOKENS, max_len)
        steps = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
        return sorted({top} | {k * max_len for k in steps if k * max_len < top}, reverse=True)

    def _smallest_need(self, hidden: int | None, max_len: int, embed_bytes: int, n_items: int, token_ram: int,
                       count: ChunkCount | None = None) -> tuple[int, int]:
        """(budget, chunk) of the cheapest chunk size with a window of two layers."""
        return min((self.need(c, 2, hidden, max_len, embed_bytes, n_items, token_ram, count), c) for c in self._chunk_sizes(max_len))

    def resident_minimum(self, total_tokens: int, max_len: int, embed_bytes: int = 0, n_items: int = 0, token_ram: int = 0,
                         count: ChunkCount | None = None) -> int:
        return self._smallest_need(self.hidden_bytes(total_tokens, max_len), max_len, embed_bytes, n_items, token_ram, count)[0]

    def spill_minimum(self, max_len: int, embed_bytes: int = 0, n_items: int = 0, token_ram: int = 0,
                      count: ChunkCount | None = None) -> int:
        return self._smallest_need(None, max_len, embed_bytes, n_items, token_ram, count)[0]

    def minimum(self, total_tokens: int, max_len: int, embed_bytes: int = 0, allow_spill: bool = True,
                n_items: int = 0, token_ram: int = 0, count: ChunkCount | None = None) -> int:
        need = self.resident_minimum(total_tokens, max_len, embed_bytes, n_items, token_ram, count)
        return min(need, self.spill_minimum(max_len, embed_bytes, n_items, token_ram, count)) if allow_spill else need

    def minimum_for(self, size: CallSize, allow_spill: bool = True) -> int:
        """:meth:`minimum` for a call whose token ids a budget keeps in RAM only up to :meth:`token_ram_limit`
        (beyond, they live in a file and cost nothing here)."""
        args = (size.total_tokens, size.max_len, size.embed_bytes)
        if not allow_spill:
            return self.minimum(*args, False, size.n_items, size.token_bytes, size.count)
        in_file = self.minimum(*args, True, size.n_items, 0, size.count)
        if size.token_bytes > self.token_ram_limit(in_file):
            return in_file
        return self.minimum(*args, True, size.n_items, size.token_bytes, size.count)

    def static_minimum(self) -> int:
        """Smallest budget that could run even a single short candidate (checked at construction)."""
        return self.minimum(64, 64, n_items=1)

    def token_ram_limit(self, budget: int | None, allow_spill: bool = True) -> int | None:
        """How many bytes of token ids a call keeps in RAM before moving them to a file (None: no limit)."""
        if budget is None or not allow_spill:
            return None
        return budget // 16

    def plan(self, budget: int | None, total_tokens: int, max_len: int, embed_bytes: int = 0, allow_spill: bool = True,
             n_items: int = 0, token_ram: int = 0, count: ChunkCount | None = None) -> Plan:
        """``n_items``: candidates (documents, and the query for bi-encoders); ``token_ram``: bytes of their token ids
        held in RAM; ``count``: their chunk counts (else bounded)."""
        if budget is None:
            chunk = max(DEFAULT_CHUNK_TOKENS, max_len)
            estimate = {"fixed": self.fixed, "layers": self.n_layers * self.layer_bytes,
                        "hidden": self.hidden_bytes(total_tokens, max_len), "embed": embed_bytes,
                        "activations": min(chunk, max(total_tokens, max_len)) * self.act_bytes_per_token(max_len),
                        "layer_bytes": self.layer_bytes, "tokens": token_ram,
                        "bookkeeping": self.bookkeeping_bytes(n_items, chunk, max_len, count)}
            return Plan(None, self.n_layers, chunk, DEFAULT_MAX_BATCH, estimate)
        call = (max_len, embed_bytes, n_items, token_ram, count)
        hidden = self.hidden_bytes(total_tokens, max_len)
        if budget < self.resident_minimum(total_tokens, *call):
            need = self.minimum(total_tokens, max_len, embed_bytes, allow_spill, n_items, token_ram, count)
            if budget < need:
                kept = ("the chunk in flight's hidden states (the rest spilled to files)" if allow_spill
                        else f"kept hidden states for {total_tokens} tokens")
                # a bi-encoder's query is one more item: '51 candidates' for 50 documents read as a miscount
                items = f"{n_items - 1} documents and the query" if self.item_extra else f"{n_items} candidates"
                kept += f" + bookkeeping for {items}" if n_items else ""
                raise BudgetError(
                    f"memory budget {format_size(budget)} is below the minimum for this input: {format_min_size(need)} "
                    f"(2 layers x {format_size(self.layer_bytes)} + {kept} "
                    f"+ one {max_len}-token candidate's activations + fixed costs). Use --memory-budget {-(-need // 1024**2)}MiB "
                    f"or more, or rank shorter documents.",
                    minimum_bytes=need,
                )
            return self._spill_plan(budget, *call)
        # Spilling kept states to buy bigger chunks is *not* preferred: the I/O costs what the bigger chunks
        # save, at a higher peak. Spill only when the kept states do not fit.
        return self._resident_plan(budget, total_tokens, hidden, *call)

    def _fit(self, budget: int, window: int, chunk: int, hidden: int | None, *call) -> tuple[int, int]:
        """``(window, chunk)`` if they fit the budget, else a window of two and the largest chunk that fits."""
        if self.need(chunk, window, hidden, *call) <= budget:
            return window, chunk
        for c in self._chunk_sizes(call[0]):
            if c <= chunk and self.need(c, 2, hidden, *call) <= budget:
                return 2, c
        return 2, self._smallest_need(hidden, *call)[1]

    def _estimate(self, window: int, chunk: int, hidden: int, max_len: int, embed_bytes: int, n_items: int, token_ram: int,
                  count: ChunkCount | None) -> dict:
        return {"fixed": self.fixed, "layers": window * self.layer_bytes, "hidden": hidden, "embed": embed_bytes,
                "activations": chunk * self.act_bytes_per_token(max_len), "layer_bytes": self.layer_bytes,
                "tokens": token_ram, "bookkeeping": self.bookkeeping_bytes(n_items, chunk, max_len, count)}

    def _resident_plan(self, budget: int, total_tokens: int, hidden: int, max_len: int, embed_bytes: int, n_items: int,
                       token_ram: int, count: ChunkCount | None) -> Plan:
        call = (max_len, embed_bytes, n_items, token_ram, count)
        # the layer stage's room (embedding unmapped), with the bookkeeping of default-size chunks
        free = budget - self.fixed - hidden - self.bookkeeping_bytes(n_items, max(max_len, DEFAULT_CHUNK_TOKENS), max_len, count)
        per_tok = self.act_bytes_per_token(max_len)
        act_min = per_tok * max_len
        window = int(min(self.n_layers, max(2, (free - act_min) // self.layer_bytes)))
        # prefer a bigger chunk over one more resident layer once the window is >= 2, unless all layers fit
        if window < self.n_layers:
            window = 2 if free - 2 * self.layer_bytes < per_tok * min(total_tokens, DEFAULT_CHUNK_TOKENS) else window
        act_room = free - window * self.layer_bytes
        chunk = int(max(max_len, min(DEFAULT_CHUNK_TOKENS, act_room // per_tok)))
        window, chunk = self._fit(budget, window, chunk, hidden, *call)
        return Plan(budget, window, chunk, DEFAULT_MAX_BATCH, self._estimate(window, chunk, hidden, *call))

    def _spill_plan(self, budget: int, max_len: int, embed_bytes: int, n_items: int, token_ram: int,
                    count: ChunkCount | None) -> Plan:
        call = (max_len, embed_bytes, n_items, token_ram, count)
        free = budget - self.fixed - self.bookkeeping_bytes(n_items, max(max_len, DEFAULT_CHUNK_TOKENS), max_len, count)
        per_tok = self.act_bytes_per_token(max_len) + 4 * self.H * 3
        window = 2
        chunk = int(max(max_len, min(DEFAULT_CHUNK_TOKENS, (free - window * self.layer_bytes) // per_tok)))
        window, chunk = self._fit(budget, window, chunk, None, *call)
        return Plan(budget, window, chunk, DEFAULT_MAX_BATCH, self._estimate(window, chunk, self.spill_hidden_bytes(chunk), *call),
                    spill=True)
