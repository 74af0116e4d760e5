"""``Reranker``: rank documents for a query by streaming a bundle's layers under a memory budget.

All live candidates advance through one layer before the next layer runs (GRATING, EuroSys'26,
"monolithic forwarding"), grouped by length and cut into chunks that fit the budget; only a window
of layer sessions is resident. ``_after_layer`` is where early ranking / progressive cluster
pruning plugs in: it sees every candidate's hidden state after each layer and may shrink the live set.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sel.bundle import Bundle
from edge_sel.errors import BudgetError, InputError
from edge_sel.memory import PeakTracker, rss_bytes
from edge_sel.units import format_size, parse_size

from .embedding import Embedder
from .plan import Planner
from .sessions import load_session
from .stream import LayerStream
from .text import Encoded, TextEncoder

log = logging.getLogger("edge_sel")


@dataclass
class Chunk:
    items: np.ndarray        # indices into the item list (documents, then the query for bi-encoders)
    lengths: np.ndarray
    ids: np.ndarray          # [B, T] int64
    mask: np.ndarray         # [B, T] float32
    positions: np.ndarray    # [B, T] int64
    types: np.ndarray | None
    hidden: np.ndarray | None = None


class Reranker:
    """Rank ``documents`` for a ``query`` with a bundle.

    >>> rr = Reranker("bundles/minilm", memory_budget="128MB")
    >>> rr.rank("how do I copy a file?", docs, top_k=5)
    [{'corpus_id': 3, 'score': 0.71}, ...]

    memory_budget: bytes or a size string ("128MB", "1.5GiB"); None keeps every layer resident.
    ``top_k`` larger than the number of documents is clamped to it (with a log note); ``top_k <= 0`` is refused.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, memory_budget: int | str | None = None,
                 pruning: str | None = "off", threads: int | None = None, optimize: str = "all"):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        if self.bundle.task != "rerank":
            raise InputError(f"{self.bundle.root} is a {self.bundle.task!r} bundle; ranking needs a bundle exported with --task rerank")
        self.memory_budget = parse_size(memory_budget) if memory_budget is not None else None
        self.planner = Planner(self.bundle)
        if self.memory_budget is not None and self.memory_budget < self.planner.static_minimum():
            need = self.planner.static_minimum()
            raise BudgetError(
                f"memory budget {format_size(self.memory_budget)} is below the minimum this bundle can run in: "
                f"{format_size(need)} (two layers of {format_size(self.planner.layer_bytes)} + fixed costs)", minimum_bytes=need)
        if pruning not in (None, "off"):
            raise InputError(f"pruning={pruning!r}: early-ranking pruning is not available yet in this version (use 'off')")
        self.pruning = pruning
        self.encoder = TextEncoder(self.bundle)
        self.embedder = Embedder(self.bundle)
        self.head = load_session(self.bundle.path(self.bundle.manifest["head"]["file"]), threads)
        self.stream = LayerStream(self.bundle, len(self.bundle.layers), threads, optimize)
        self.pooling = self.bundle.manifest.get("pooling", "cls")
        self.pad_id = int(self.bundle.manifest.get("pad_id", 0))
        self.layer_inputs = self.bundle.manifest.get("layer_io", {}).get("inputs", ["hidden", "mask"])
        self.last_stats: dict[str, Any] = {}

    # ---- public API ----------------------------------------------------------------------
    def rank(self, query: str, documents: list[str], top_k: int | None = 10, return_documents: bool = False,
             instruction: str | None = None) -> list[dict[str, Any]]:
        documents = self._check_documents(documents)
        n = len(documents)
        if top_k is None:
            top_k = n
        if not isinstance(top_k, (int, np.integer)) or top_k <= 0:
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        if top_k > n:
            log.info("top_k=%d is larger than the %d documents; returning all %d", top_k, n, n)
            top_k = n
        scores = self.predict(query, documents, instruction=instruction)
        order = np.argsort(-scores, kind="stable")[:top_k]
        results = []
        for i in order:
            r = {"corpus_id": int(i), "score": float(scores[i])}
            if return_documents:
                r["text"] = documents[i]
            results.append(r)
        return results

    def predict(self, query: str, documents: list[str], instruction: str | None = None) -> np.ndarray:
        """Scores for every document, in input order."""
        documents = self._check_documents(documents)
        t0 = time.perf_counter()
        with PeakTracker() as peak:
            enc = self.encoder.encode(query, documents, instruction=instruction)
            t_tok = time.perf_counter() - t0
            if enc.n_truncated:
                log.warning("%d of %d documents were longer than the model's maximum of %d tokens and were truncated",
                            enc.n_truncated, len(documents), self.bundle.max_length)
            scores = self.score_encoded(enc)
        self.last_stats.update({
            "latency_s": time.perf_counter() - t0, "tokenize_s": t_tok,
            "peak_rss_bytes": peak.peak, "start_rss_bytes": peak.start, "n_documents": len(documents),
            "n_truncated": enc.n_truncated,
        })
        return scores

    def minimum_budget(self, query: str, documents: list[str], instruction: str | None = None) -> int:
        """Smallest ``memory_budget`` (bytes) under which this query and these documents can run."""
        enc = self.encoder.encode(query, self._check_documents(documents), instruction=instruction)
        ids, _ = self._items(enc)
        lengths = np.array([len(x) for x in ids])
        unique = len(np.unique(np.concatenate(ids)))
        return self.planner.minimum(int(lengths.sum()), int(lengths.max()), self.embedder.touched_bytes(unique))

    def close(self) -> None:
        self.stream.close()

    # ---- engine --------------------------------------------------------------------------
    @staticmethod
    def _check_documents(documents) -> list[str]:
        if isinstance(documents, str):
            raise InputError("documents must be a list of strings, not a single string")
        documents = list(documents)
        if not documents:
            raise InputError("no documents to rank (the document list is empty)")
        for i, d in enumerate(documents):
            if not isinstance(d, str):
                raise InputError(f"document {i} is {type(d).__name__}, expected str")
        return documents

    def _items(self, enc: Encoded) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        ids = list(enc.doc_ids)
        types = list(enc.doc_types) if enc.doc_types is not None else None
        if self.bundle.scoring == "bi_encoder":
            ids.append(enc.query_ids)
        return ids, types

    def _make_chunks(self, ids: list[np.ndarray], types, chunk_tokens: int, max_batch: int) -> list[Chunk]:
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(lengths, kind="stable")
        chunks, cur = [], []

        def flush():
            if not cur:
                return
            idx = np.array(cur)
            L = lengths[idx]
            T = int(L.max())
            B = len(idx)
            a = np.full((B, T), self.pad_id, dtype=np.int64)
            m = np.zeros((B, T), dtype=np.float32)
            t = np.zeros((B, T), dtype=np.int64) if types is not None else None
            for r, i in enumerate(idx):
                a[r, : L[r]] = ids[i]
                m[r, : L[r]] = 1.0
                if t is not None:
                    t[r, : L[r]] = types[i]
            pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
            chunks.append(Chunk(idx, L, a, m, pos, t))
            cur.clear()

        for i in order:
            T = lengths[i]  # sorted ascending: the newest item sets the chunk's padded length
            if cur and ((len(cur) + 1) * T > chunk_tokens or len(cur) >= max_batch):
                flush()
            cur.append(int(i))
        flush()
        return chunks

    def _feeds(self, c: Chunk) -> dict[str, np.ndarray]:
        feeds = {"hidden": c.hidden, "mask": c.mask}
        if "position_ids" in self.layer_inputs:
            feeds["position_ids"] = c.positions
        return feeds

    def _after_layer(self, layer: int, chunks: list[Chunk]) -> list[Chunk]:
        """Early-ranking hook (GRATING progressive cluster pruning plugs in here). Default: keep all."""
        return chunks

    def _pool(self, c: Chunk) -> np.ndarray:
        h = c.hidden
        if self.pooling == "cls":
            return h[:, 0, :]
        if self.pooling == "last":
            return h[np.arange(len(c.lengths)), c.lengths - 1, :]
        m = c.mask[..., None]
        return (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)

    def score_encoded(self, enc: Encoded) -> np.ndarray:
        ids, types = self._items(enc)
        lengths = np.array([len(x) for x in ids])
        n_items = len(ids)
        total, max_len = int(lengths.sum()), int(lengths.max())
        unique = len(np.unique(np.concatenate(ids)))
        plan = self.planner.plan(self.memory_budget, total, max_len, self.embedder.touched_bytes(unique))
        self.stream.set_window(plan.window)
        t0 = time.perf_counter()
        chunks = self._make_chunks(ids, types, plan.chunk_tokens, plan.max_batch)
        table = self.embedder.open_table()
        for c in chunks:
            c.hidden = self.embedder(table, c.ids, c.types, c.positions)
        del table  # unmap: the touched embedding pages leave RSS
        t_embed = time.perf_counter() - t0

        t1 = time.perf_counter()
        live_per_layer = []
        rss_peak_layers = 0
        for i, sess in self.stream.run():
            for c in chunks:
                c.hidden = sess.run(None, self._feeds(c))[0]
            del sess
            chunks = self._after_layer(i, chunks)
            live_per_layer.append(int(sum(len(c.items) for c in chunks)))
            rss_peak_layers = max(rss_peak_layers, rss_bytes())
        t_layers = time.perf_counter() - t1

        t2 = time.perf_counter()
        out = np.zeros(n_items, dtype=np.float32)
        emb = None
        for c in chunks:
            res = self.head.run(None, {"pooled": np.ascontiguousarray(self._pool(c), dtype=np.float32)})[0]
            if self.bundle.scoring == "bi_encoder":
                if emb is None:
                    emb = np.zeros((n_items, res.shape[1]), dtype=np.float32)
                emb[c.items] = res
            else:
                out[c.items] = res
            c.hidden = None
        if self.bundle.scoring == "bi_encoder":
            q = emb[-1]
            out = emb[:-1] @ q
        t_head = time.perf_counter() - t2
        self.last_stats = {
            "embed_s": t_embed, "layers_s": t_layers, "head_s": t_head, "layer_load_wait_s": self.stream.load_wait_s,
            "window_layers": self.stream.window, "chunk_size": int(max(len(c.items) for c in chunks)) if chunks else 0,
            "chunk_tokens": plan.chunk_tokens, "n_chunks": len(chunks), "memory_budget_bytes": plan.budget,
            "plan_estimate": plan.estimate, "live_per_layer": live_per_layer, "n_layers": len(self.bundle.layers),
            "layer_loads": self.stream.loads,
        }
        return out
