"""Memory planning: turn a budget into a layer window W and a chunk size, or refuse it up front.

The budget covers the model's own share of the process (peak RSS minus idle RSS): resident layer
weights (W x the largest layer's files, file-backed pages count while mapped), the embedding pages
a gather touches, hidden states kept between layers for every live candidate, the activations of
one chunk inside a layer, plus fixed costs (tokenizer, head, session bookkeeping).

When the kept hidden states of every candidate do not fit, the plan *spills* them to files
(:mod:`edge_sel.runtime.rerank.chunks`): then only the chunk in flight holds hidden states in RAM, and the minimum no longer
grows with the number of candidates. Keeping them resident is preferred whenever it fits (no I/O).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import BudgetError
from edge_sel.runtime.units import format_size

SESSION_OVERHEAD = 3 * 1024**2   # per live onnxruntime session beyond its weight files (graph, kernels)
FIXED_OVERHEAD = 14 * 1024**2    # head session, tokenizer state, numpy scratch, per-call Python objects, and a margin
# for heap fragmentation in a long-lived process (bounded by edge_sel.runtime.memory.HeapGuard)
SAFETY = 1.0                     # the formula already sits above onnxruntime's real per-layer peak
DEFAULT_CHUNK_TOKENS = 1024  # cache-friendly, no huge attention buffers: faster than longer chunks
DEFAULT_MAX_BATCH = 64


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
        """The model's share of the process at its peak: fixed costs and kept hidden states, plus the larger of the
        embedding stage and the layer stage (they do not overlap)."""
        e = self.estimate
        return int(e["fixed"] + e["hidden"] + max(e["embed"], e["layers"] + e["activations"]))


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

    # The embedding stage and the layer stage do not overlap: the table is mapped only while the inputs are
    # gathered and unmapped before the first layer loads (runtime/embedding.py), so its touched pages and the
    # layer window + activations are two successive peaks over the kept hidden states, not one sum.
    def resident_minimum(self, total_tokens: int, max_len: int, embed_bytes: int = 0) -> int:
        return int(self.fixed + self.hidden_bytes(total_tokens, max_len)
                   + max(embed_bytes, 2 * self.layer_bytes + self.act_bytes_per_token(max_len) * max_len))

    def spill_minimum(self, max_len: int, embed_bytes: int = 0) -> int:
        return int(self.fixed + self.spill_hidden_bytes(max_len)
                   + max(embed_bytes, 2 * self.layer_bytes + self.act_bytes_per_token(max_len) * max_len))

    def minimum(self, total_tokens: int, max_len: int, embed_bytes: int = 0, allow_spill: bool = True) -> int:
        need = self.resident_minimum(total_tokens, max_len, embed_bytes)
        return min(need, self.spill_minimum(max_len, embed_bytes)) if allow_spill else need

    def static_minimum(self) -> int:
        """Smallest budget that could run even a single short candidate (checked at construction)."""
        return self.minimum(64, 64)

    def plan(self, budget: int | None, total_tokens: int, max_len: int, embed_bytes: int = 0, allow_spill: bool = True) -> Plan:
        if budget is None:
            chunk = max(DEFAULT_CHUNK_TOKENS, max_len)
            estimate = {"fixed": self.fixed, "layers": self.n_layers * self.layer_bytes,
                        "hidden": self.hidden_bytes(total_tokens, max_len), "embed": embed_bytes,
                        "activations": min(chunk, max(total_tokens, max_len)) * self.act_bytes_per_token(max_len),
                        "layer_bytes": self.layer_bytes}
            return Plan(None, self.n_layers, chunk, DEFAULT_MAX_BATCH, estimate)
        if budget < self.resident_minimum(total_tokens, max_len, embed_bytes):
            need = self.minimum(total_tokens, max_len, embed_bytes, allow_spill)
            if budget < need:
                kept = ("the chunk in flight's hidden states (the rest spilled to files)" if allow_spill
                        else f"kept hidden states for {total_tokens} tokens")
                raise BudgetError(
                    f"memory budget {format_size(budget)} is below the minimum for this input: {format_size(need)} "
                    f"(2 layers x {format_size(self.layer_bytes)} + {kept} "
                    f"+ one {max_len}-token candidate's activations + fixed costs). Use --memory-budget {-(-need // 1024**2)}MiB "
                    f"or more, or rank shorter documents.",
                    minimum_bytes=need,
                )
            return self._spill_plan(budget, max_len, embed_bytes)
        # Spilling kept states to buy bigger chunks is *not* preferred: the I/O costs what the bigger chunks
        # save, at a higher peak. Spill only when the kept states do not fit.
        return self._resident_plan(budget, total_tokens, max_len, embed_bytes)

    def _resident_plan(self, budget: int, total_tokens: int, max_len: int, embed_bytes: int) -> Plan:
        free = budget - self.fixed - self.hidden_bytes(total_tokens, max_len)  # the layer stage's room (embedding unmapped)
        per_tok = self.act_bytes_per_token(max_len)
        act_min = per_tok * max_len
        window = int(min(self.n_layers, max(2, (free - act_min) // self.layer_bytes)))
        # prefer a bigger chunk over one more resident layer once the window is >= 2, unless all layers fit
        if window < self.n_layers:
            window = 2 if free - 2 * self.layer_bytes < per_tok * min(total_tokens, DEFAULT_CHUNK_TOKENS) else window
        act_room = free - window * self.layer_bytes
        chunk = int(max(max_len, min(DEFAULT_CHUNK_TOKENS, act_room // per_tok)))
        estimate = {
            "fixed": self.fixed, "layers": window * self.layer_bytes, "hidden": self.hidden_bytes(total_tokens, max_len),
            "embed": embed_bytes, "activations": chunk * per_tok, "layer_bytes": self.layer_bytes,
        }
        return Plan(budget, window, chunk, DEFAULT_MAX_BATCH, estimate)

    def _spill_plan(self, budget: int, max_len: int, embed_bytes: int) -> Plan:
        free = budget - self.fixed  # the layer stage's room (embedding unmapped)
        per_tok = self.act_bytes_per_token(max_len) + 4 * self.H * 3
        window = 2
        chunk = int(max(max_len, min(DEFAULT_CHUNK_TOKENS, (free - window * self.layer_bytes) // per_tok)))
        estimate = {
            "fixed": self.fixed, "layers": window * self.layer_bytes, "hidden": self.spill_hidden_bytes(chunk),
            "embed": embed_bytes, "activations": chunk * self.act_bytes_per_token(max_len), "layer_bytes": self.layer_bytes,
        }
        return Plan(budget, window, chunk, DEFAULT_MAX_BATCH, estimate, spill=True)
