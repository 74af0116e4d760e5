"""``Reranker``: rank documents for a query by streaming a bundle's layers under a memory budget.

All live candidates advance through one layer before the next layer runs (GRATING, EuroSys'26,
"monolithic forwarding"), grouped by length and cut into chunks that fit the budget; only a window
of layer sessions is resident. ``_after_layer`` is where early ranking / progressive cluster
pruning plugs in: at the layers of the bundle's calibrated schedule it scores the live candidates,
drops the score clusters that cannot reach the top-K (see :mod:`.early_rank`) and compacts the chunks
so that dropped candidates cost nothing in later layers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import BudgetError, InputError
from edge_sel.runtime.memory import HeapGuard, PeakTracker, release_free_memory, tune_allocator
from edge_sel.runtime.units import format_size, parse_size

from .early_rank import LayerScorer, Schedule, prune_mask, prune_rank_mask
from .embedding import Embedder
from .planning import Planner
from .prefix import PairStream, is_split, qkv_weight_bytes, run_candidates, run_prefix
from .sessions import load_session
from .spill import HiddenSpill
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
    spilled: Path | None = None   # hidden state in a spill file instead of RAM (see .spill)


class Reranker:
    """Rank ``documents`` for a ``query`` with a bundle.

    >>> rr = Reranker("bundles/minilm", memory_budget="128MB")
    >>> rr.rank("how do I copy a file?", docs, top_k=5)
    [{'corpus_id': 3, 'score': 0.71}, ...]

    memory_budget: bytes or a size string ("128MB", "1.5GiB"); None keeps every layer resident. When the
    kept hidden states of all candidates do not fit the budget they are spilled to files under
    ``spill_dir`` (default: the system temp directory) — only the chunk in flight stays in RAM;
    ``spill=False`` refuses such budgets instead.
    ``top_k`` larger than the number of documents is clamped to it (with a log note); ``top_k <= 0`` is refused.

    pruning (early ranking, used by :meth:`rank`; :meth:`predict` always computes every score):
      ``"auto"`` (default) — prune with the bundle's calibrated schedule; a bundle without one runs
      every candidate through every layer (logged; ``last_stats["pruning"]`` says to calibrate);
      ``"on"`` — like auto, but a bundle without a schedule is refused (InputError: run ``edge-sel calibrate``);
      ``"off"`` / None — never prune; or a schedule (dict as in the manifest, or :class:`Schedule`).
    A schedule calibrated for top-K protects any ``top_k <= K``; for a larger ``top_k`` that call runs unpruned (warning).
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, memory_budget: int | str | None = None,
                 pruning: str | dict | Schedule | None = "auto", threads: int | None = None, optimize: str = "all",
                 spill: bool = True, spill_dir: str | os.PathLike | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        if self.bundle.task != "rerank":
            raise InputError(f"{self.bundle.root} is a {self.bundle.task!r} bundle; ranking needs a bundle exported with --task rerank")
        self.memory_budget = parse_size(memory_budget) if memory_budget is not None else None
        if self.memory_budget is not None:
            tune_allocator()  # under a budget, freed activations must leave the process (glibc; see edge_sel.runtime.memory)
        self.planner = Planner(self.bundle)
        self.split = is_split(self.bundle)  # qkv + attn layer graphs: the shared prompt prefix is computed once
        if self.split:
            self.planner.layer_bytes += max(qkv_weight_bytes(self.bundle, i) for i in range(len(self.bundle.layers)))
        if self.memory_budget is not None and self.memory_budget < self.planner.static_minimum():
            need = self.planner.static_minimum()
            raise BudgetError(
                f"memory budget {format_size(self.memory_budget)} is below the minimum this bundle can run in: "
                f"{format_size(need)} (two layers of {format_size(self.planner.layer_bytes)} + fixed costs)", minimum_bytes=need)
        self.encoder = TextEncoder(self.bundle)
        self.embedder = Embedder(self.bundle)
        self.head = load_session(self.bundle.path(self.bundle.manifest["head"]["file"]), threads)
        self.pruning = "off" if pruning is None else pruning
        self.schedule, self.pruning_note = self._resolve_schedule(self.pruning)
        self.scorer = LayerScorer(self.bundle, self.schedule, self.head) if self.schedule else None
        self.observer = None  # calibration hook: observer(layer, chunk, hidden_in) after each layer, before pruning
        self._prune_state: dict[str, Any] | None = None
        self._skip_layers: set[int] = set()  # layer-drop measurement (export --drop-layers): skip these positions
        # split (prefix-reuse) bundles with last-token pooling: the final layer computes the head's token only
        self.final_last_only = True
        self.stream = (PairStream if self.split else LayerStream)(self.bundle, len(self.bundle.layers), threads, optimize)
        self._pos_offset = 0
        self.pooling = self.bundle.manifest.get("pooling", "cls")
        self.pad_id = int(self.bundle.manifest.get("pad_id", 0))
        self.layer_inputs = self.bundle.manifest.get("layer_io", {}).get("inputs", ["hidden", "mask"])
        self.last_stats: dict[str, Any] = {}
        self.allow_spill = bool(spill)
        self.spill_dir = spill_dir
        self._spill: HiddenSpill | None = None
        self._guard = HeapGuard(None)

    def _resolve_schedule(self, pruning) -> tuple[Schedule | None, str]:
        root = self.bundle.root
        if isinstance(pruning, str):
            if pruning == "off":
                return None, "off"
            if pruning not in ("auto", "on"):
                raise InputError(f"pruning={pruning!r}: expected 'auto', 'on', 'off' or a schedule")
            raw = self.bundle.manifest.get("schedule")
            if not raw:
                if pruning == "on":
                    raise InputError(f"{root} has no early-ranking schedule, so pruning cannot be used; "
                                     f"calibrate it first: `edge-sel calibrate {root}` (or use pruning='auto'/'off')")
                log.info("%s has no early-ranking schedule: ranking without pruning (run `edge-sel calibrate %s`)", root, root)
                return None, "off (bundle not calibrated: run `edge-sel calibrate`)"
            sched = Schedule.from_manifest(raw)
        elif isinstance(pruning, Schedule):
            sched = pruning
        elif isinstance(pruning, dict):
            sched = Schedule.from_manifest(pruning)
        else:
            raise InputError(f"pruning must be 'auto', 'on', 'off' or a schedule, got {type(pruning).__name__}")
        sched.validate(self.bundle)
        return sched, f"{sched.method} at layers {sched.layers} (top-{sched.top_k})"

    # ---- public API ----------------------------------------------------------------------
    def rank(self, query: str, documents: list[str], top_k: int | None = 10, return_documents: bool = False,
             instruction: str | None = None) -> list[dict[str, Any]]:
        documents = self._check_documents(documents)
        n = len(documents)
        prune_k = top_k  # None: full ordering; pruned with the schedule's own K (dropped candidates listed last)
        if top_k is None:
            top_k = n
        if not isinstance(top_k, (int, np.integer)) or top_k <= 0:
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        if top_k > n:
            log.info("top_k=%d is larger than the %d documents; returning all %d", top_k, n, n)
            top_k = n
        scores = self._run(query, documents, instruction, top_k=prune_k, prune=True)
        dropped = self._prune_state["dropped_at"] if self._prune_state else np.full(n, -1)
        # survivors by final score, then dropped candidates: later drop first, then by their last score
        key_drop = np.where(dropped < 0, np.iinfo(np.int64).max, dropped)
        order = np.lexsort((-scores, -key_drop))[:top_k]
        results = []
        for i in order:
            r = {"corpus_id": int(i), "score": float(scores[i])}
            if dropped[i] >= 0:
                r["pruned_at_layer"] = int(dropped[i])
            if return_documents:
                r["text"] = documents[i]
            results.append(r)
        return results

    def predict(self, query: str, documents: list[str], instruction: str | None = None) -> np.ndarray:
        """Full-model scores for every document, in input order (never pruned; :meth:`rank` prunes)."""
        return self._run(query, documents, instruction, top_k=None, prune=False)

    def _run(self, query: str, documents: list[str], instruction: str | None, top_k: int | None, prune: bool) -> np.ndarray:
        documents = self._check_documents(documents)
        t0 = time.perf_counter()
        with PeakTracker() as peak:
            enc = self.encoder.encode(query, documents, instruction=instruction)
            t_tok = time.perf_counter() - t0
            if enc.n_truncated:
                log.warning("%d of %d documents were longer than the model's maximum of %d tokens and were truncated",
                            enc.n_truncated, len(documents), self.bundle.max_length)
            scores = self.score_encoded(enc, top_k=top_k, prune=prune)
        release_free_memory()
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
        return self.planner.minimum(int(lengths.sum()), int(lengths.max()), self.embedder.touched_bytes(unique), self.allow_spill)

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
        if self.split:  # candidates carry only their own tokens; the prefix runs once
            return [x[enc.prefix_len:] for x in enc.doc_ids], None
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
            pos = np.broadcast_to(np.arange(self._pos_offset, self._pos_offset + T, dtype=np.int64), (B, T)).copy()
            chunks.append(Chunk(idx, L, a, m, pos, t))
            cur.clear()

        for i in order:
            T = lengths[i]  # sorted ascending: the newest item sets the chunk's padded length
            if cur and ((len(cur) + 1) * T > chunk_tokens or len(cur) >= max_batch):
                flush()
            cur.append(int(i))
        flush()
        return chunks

    def _feeds(self, c: Chunk, hidden: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"hidden": hidden, "mask": c.mask}
        if "position_ids" in self.layer_inputs:
            feeds["position_ids"] = c.positions
        return feeds

    def _after_layer(self, layer: int, chunks: list[Chunk]) -> list[Chunk]:
        """Progressive cluster pruning at the schedule's layers (GRATING); elsewhere keep all."""
        st = self._prune_state
        if st is None or layer not in st["layers"] or layer >= len(self.bundle.layers) - 1:
            return chunks
        sched: Schedule = self.schedule
        n_docs = st["n_docs"]
        items, pooled = [], []
        q_pooled = None
        for c in chunks:
            p = self._pool(c, self._hidden(c))
            docs = c.items < n_docs
            if not docs.all():  # bi-encoder query item
                q_pooled = p[~docs][0]
            items.append(c.items[docs])
            pooled.append(p[docs])
        items = np.concatenate(items)
        if len(items) <= st["k"]:
            return chunks
        est = self.scorer(layer, np.concatenate(pooled), q_pooled)
        if sched.rule == "rank":  # keep a calibrated fraction of this call's candidates
            keep = prune_rank_mask(est, sched.keep_count(layer, n_docs), st["k"], sched.floor)
        else:
            keep = prune_mask(est, st["k"], sched.margin_at(layer), sched.floor, sched.cluster_gap * sched.margin_at(layer))
        if keep.all():
            return chunks
        gone = items[~keep]
        st["dropped_at"][gone] = layer
        st["last_score"][gone] = est[~keep]
        keep_items = np.ones(st["n_items"], dtype=bool)
        keep_items[gone] = False
        return self._compact(chunks, keep_items)

    def _compact(self, chunks: list[Chunk], keep_items: np.ndarray) -> list[Chunk]:
        """Rebuild the chunks from the surviving rows (re-packed by length, padding trimmed). With a spill,
        each new chunk gathers its rows from memory maps of the old chunks' files and is spilled in turn."""
        rows = []  # (item, length, source chunk, source row)
        for ci, c in enumerate(chunks):
            for r, it in enumerate(c.items):
                if keep_items[it]:
                    rows.append((int(it), int(c.lengths[r]), ci, r))
        rows.sort(key=lambda x: x[1])
        st = self._prune_state
        groups, cur = [], []
        for row in rows:
            if cur and ((len(cur) + 1) * row[1] > st["chunk_tokens"] or len(cur) >= st["max_batch"]):
                groups.append(cur)
                cur = []
            cur.append(row)
        if cur:
            groups.append(cur)
        out = []
        H = int(self.bundle.dims["hidden"])
        for g in groups:
            B, T = len(g), max(x[1] for x in g)
            ids = np.full((B, T), self.pad_id, dtype=np.int64)
            mask = np.zeros((B, T), dtype=np.float32)
            pos = np.broadcast_to(np.arange(self._pos_offset, self._pos_offset + T, dtype=np.int64), (B, T)).copy()
            has_types = chunks[g[0][2]].types is not None
            types = np.zeros((B, T), dtype=np.int64) if has_types else None
            hidden = np.zeros((B, T, H), dtype=np.float32)
            views: dict[int, np.ndarray] = {}
            for r, (_, L, ci, sr) in enumerate(g):
                c = chunks[ci]
                if ci not in views:
                    views[ci] = c.hidden if c.hidden is not None else self._spill.view(c.spilled)
                ids[r, :L], mask[r, :L], pos[r, :L], hidden[r, :L] = c.ids[sr, :L], 1.0, c.positions[sr, :L], views[ci][sr, :L]
                if types is not None:
                    types[r, :L] = c.types[sr, :L]
            del views
            nc = Chunk(np.array([x[0] for x in g]), np.array([x[1] for x in g]), ids, mask, pos, types, hidden)
            self._keep(nc)
            out.append(nc)
        for c in chunks:
            HiddenSpill.drop(c.spilled)
        return out

    def _hidden(self, c: Chunk) -> np.ndarray:
        """The chunk's hidden state (read back from its spill file when spilled)."""
        return c.hidden if c.hidden is not None else self._spill.get(c.spilled)

    def _keep(self, c: Chunk) -> None:
        """Between layers: spill the chunk's fresh hidden state to a file when the plan says so."""
        if self._spill is not None and c.hidden is not None:
            old = c.spilled
            c.spilled = self._spill.put(c.hidden)
            c.hidden = None
            HiddenSpill.drop(old)

    def _pool(self, c: Chunk, h: np.ndarray | None = None) -> np.ndarray:
        h = c.hidden if h is None else h
        if self.pooling == "cls":
            return h[:, 0, :]
        if self.pooling == "last":
            if h.shape[1] == 1:  # one token per row (e.g. the final layer ran for the last token only)
                return h[:, 0, :]
            return h[np.arange(len(c.lengths)), c.lengths - 1, :]
        m = c.mask[..., None]
        return (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)

    def score_encoded(self, enc: Encoded, top_k: int | None = None, prune: bool = False) -> np.ndarray:
        """Scores for the encoded documents. With ``prune`` and a schedule, prune early for ``top_k``
        (None: the schedule's K) — see :meth:`rank`; dropped candidates carry their last early score."""
        ids, types = self._items(enc)
        lengths = np.array([len(x) for x in ids])
        total, max_len = int(lengths.sum()), int(lengths.max())
        embed_bytes = self.embedder.touched_bytes(len(np.unique(np.concatenate(ids))))
        plan = self.planner.plan(self.memory_budget, total, max_len, embed_bytes, self.allow_spill)
        self.stream.set_window(plan.window)
        self._spill = HiddenSpill(self.spill_dir) if plan.spill else None
        self._guard = HeapGuard(plan.budget)  # between chunks: give back free heap pages once growth nears the budget
        try:
            # depth-first keeps the embedding table mapped while the layers run; under a budget that is only
            # allowed where the kept-states room it does not use covers the table's touched pages
            embed_fits = plan.budget is None or embed_bytes <= self.planner.hidden_bytes(total, max_len)
            return self._score_planned(enc, plan, ids, types, lengths, top_k, prune, embed_fits)
        finally:
            if self._spill is not None:
                self.last_stats["spill_bytes_written"] = self._spill.bytes_written
                self.last_stats["spill_bytes_read"] = self._spill.bytes_read
                self._spill.close()
                self._spill = None
            self.last_stats["heap_trims"] = self._guard.trims

    def _score_planned(self, enc: Encoded, plan, ids, types, lengths, top_k, prune, embed_fits: bool = True) -> np.ndarray:
        n_items = len(ids)
        t0 = time.perf_counter()
        self._pos_offset = enc.prefix_len if self.split else 0
        chunks = self._make_chunks(ids, types, plan.chunk_tokens, plan.max_batch)
        n_docs = len(enc.doc_ids)
        self._prune_state = None
        pruning_note = self.pruning_note
        if prune and self.schedule is not None:
            if top_k is not None and top_k > self.schedule.top_k:
                log.warning("top_k=%d is larger than the top-%d the pruning schedule was calibrated for: this call runs "
                            "without pruning (recalibrate with `edge-sel calibrate BUNDLE --top-k %d`)", top_k, self.schedule.top_k, top_k)
                pruning_note = f"off for this call (top_k={top_k} > calibrated top-{self.schedule.top_k})"
            else:
                # protect the calibrated K: the final top-top_k is a subset of the final top-K
                self._prune_state = {"layers": set(self.schedule.layers), "k": int(self.schedule.top_k), "n_docs": n_docs,
                                     "n_items": n_items, "dropped_at": np.full(n_docs, -1, dtype=np.int64),
                                     "last_score": np.zeros(n_docs, dtype=np.float32),
                                     "chunk_tokens": plan.chunk_tokens, "max_batch": plan.max_batch}
        elif self.schedule is not None:
            pruning_note = "off (predict computes every score)"
        order = [j for j in range(len(self.bundle.layers)) if j not in self._skip_layers] if self._skip_layers else None
        # Nothing to compare between layers and every layer resident: run each chunk through all layers and the head
        # in turn (depth-first) instead of holding every candidate's hidden state between layers (monolithic).
        last = len(self.bundle.layers) - 1
        nothing_to_prune = self._prune_state is None or not (self._prune_state["layers"] - {last})  # e.g. an empty schedule
        depth_first = (nothing_to_prune and embed_fits and self.stream.keep_all and not plan.spill and not self.split
                       and self.observer is None)
        out = np.zeros(n_items, dtype=np.float32)
        emb: list[np.ndarray | None] = [None]
        live_per_layer: list[int] = []   # documents computed by each layer
        tokens_per_layer: list[int] = []
        last_only_used = False
        if depth_first:
            t_embed, t_layers, t_head = self._depth_first(chunks, order, out, emb)
            n_run = len(order) if order is not None else len(self.bundle.layers)
            live_per_layer = [n_docs] * n_run
            tokens_per_layer = [int(lengths[:n_docs].sum())] * n_run
        else:
            table = self.embedder.open_table()
            prefix_h = prefix_pos = None
            if self.split and enc.prefix_len:
                prefix_pos = np.arange(enc.prefix_len, dtype=np.int64)[None]
                prefix_h = self.embedder(table, np.asarray(enc.doc_ids[0][: enc.prefix_len], dtype=np.int64)[None], None, prefix_pos)
            for c in chunks:
                c.hidden = self.embedder(table, c.ids, c.types, c.positions)
                self._keep(c)
            del table  # unmap: the touched embedding pages leave RSS
            t_embed = time.perf_counter() - t0
            chunks, t_layers, last_only_used = self._monolithic(chunks, order, n_docs, prefix_h, prefix_pos,
                                                                live_per_layer, tokens_per_layer)
            t2 = time.perf_counter()
            for c in chunks:
                self._head_into(c, self._hidden(c), out, emb)
                c.hidden = None
                HiddenSpill.drop(c.spilled)
                c.spilled = None
            t_head = time.perf_counter() - t2
        if self.bundle.scoring == "bi_encoder":
            out = emb[0][:-1] @ emb[0][-1]
        st = self._prune_state
        if st is not None:
            dropped = st["dropped_at"] >= 0
            out[dropped] = st["last_score"][dropped]  # dropped candidates keep their last (early) score
        n_layers = len(self.bundle.layers)
        full_tokens = int(lengths[:n_docs].sum()) * n_layers
        self.last_stats = {
            "embed_s": t_embed, "layers_s": t_layers, "head_s": t_head, "layer_load_wait_s": self.stream.load_wait_s,
            "window_layers": self.stream.window, "chunk_size": int(max(len(c.items) for c in chunks)) if chunks else 0,
            "chunk_tokens": plan.chunk_tokens, "n_chunks": len(chunks), "memory_budget_bytes": plan.budget,
            "plan_estimate": plan.estimate, "live_per_layer": live_per_layer, "n_layers": n_layers,
            "layer_loads": self.stream.loads, "pruning": pruning_note,
            "layer_work_saved": 1.0 - sum(live_per_layer) / max(1, n_docs * n_layers),
            "token_work_saved": 1.0 - sum(tokens_per_layer) / max(1, full_tokens),
            "n_pruned": int((st["dropped_at"] >= 0).sum()) if st is not None else 0,
            "dropped_layers": self.bundle.manifest.get("dropped_layers") or [],
            "prefix_reuse_tokens": int(enc.prefix_len) if self.split else 0, "spill": plan.spill,
            "final_layer_last_token_only": bool(last_only_used), "order": "depth-first" if depth_first else "monolithic",
        }
        return out

    def _head_into(self, c: Chunk, h: np.ndarray, out: np.ndarray, emb: list) -> None:
        """Run the scoring head on a chunk's final hidden state; scores into ``out`` (bi-encoders: embeddings into ``emb[0]``)."""
        res = self.head.run(None, {"pooled": np.ascontiguousarray(self._pool(c, h), dtype=np.float32)})[0]
        if self.bundle.scoring == "bi_encoder":
            if emb[0] is None:
                emb[0] = np.zeros((len(out), res.shape[1]), dtype=np.float32)
            emb[0][c.items] = res
        else:
            out[c.items] = res

    def _depth_first(self, chunks: list[Chunk], order: list[int] | None, out: np.ndarray, emb: list) -> tuple[float, float, float]:
        """Each chunk through every (resident) layer and the head, one chunk at a time: only one chunk's activations
        are alive. Used when no pruning needs the candidates side by side and no layer has to be streamed."""
        t0 = time.perf_counter()
        sessions = [sess for _, sess in self.stream.run(order)]  # all resident (keep_all): loaded once, kept
        t_embed = t_head = 0.0
        table = self.embedder.open_table()
        try:
            for c in chunks:
                t = time.perf_counter()
                h = self.embedder(table, c.ids, c.types, c.positions)
                t_embed += time.perf_counter() - t
                for sess in sessions:
                    h = sess.run(None, self._feeds(c, h))[0]
                t = time.perf_counter()
                self._head_into(c, h, out, emb)
                t_head += time.perf_counter() - t
                del h
                self._guard.check()
        finally:
            del table, sessions
        return t_embed, time.perf_counter() - t0 - t_embed - t_head, t_head

    def _monolithic(self, chunks, order, n_docs, prefix_h, prefix_pos, live_per_layer, tokens_per_layer):
        """All candidates through one layer at a time (GRATING's monolithic forwarding), pruning at schedule layers."""
        t1 = time.perf_counter()
        final = (order or list(range(len(self.bundle.layers))))[-1]
        last_only_used = False
        for i, sess in self.stream.run(order):
            live_per_layer.append(int(sum(int((c.items < n_docs).sum()) for c in chunks)))
            tokens_per_layer.append(int(sum(int(c.lengths[c.items < n_docs].sum()) for c in chunks)))
            # the head reads one token per candidate: the final layer computes only that token's output
            # (the calibration observer looks at every token, so it gets the full layer)
            last_only = (self.final_last_only and self.split and i == final and self.pooling == "last"
                         and self.observer is None)
            kp = vp = None
            if prefix_h is not None:
                prefix_h, kp, vp = run_prefix(sess, prefix_h, prefix_pos, kv_only=last_only)
            last_only_used |= last_only
            for c in chunks:
                h_in = self._hidden(c)
                if self.split:
                    c.hidden = run_candidates(sess, h_in, c.mask, c.positions, kp, vp, prefix_pos,
                                              last=c.lengths - 1 if last_only else None)
                else:
                    c.hidden = sess.run(None, self._feeds(c, h_in))[0]
                if self.observer is not None:
                    self.observer(i, c, h_in)
                del h_in
                self._keep(c)
                self._guard.check()
            del sess, kp, vp
            chunks = self._after_layer(i, chunks)
        return chunks, time.perf_counter() - t1, last_only_used
