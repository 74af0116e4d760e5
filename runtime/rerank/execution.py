"""Execution orders: how the chunks of one call move through the embedding, the layers and the head.

* :meth:`Execution.monolithic` — every live candidate through one layer before the next (GRATING, EuroSys'26,
  "monolithic forwarding"): each layer is loaded once per call while only a window of layer sessions is
  resident, and the candidates can be compared (pruned) between layers. Kept hidden states may be spilled.
* :meth:`Execution.depth_first` — each chunk through every layer and the head in turn: only one chunk's
  activations are alive. Used when nothing is compared between layers and every layer is resident.

Split decoder bundles (qkv + attn graphs per layer, :mod:`.prefix`) run monolithically: the prompt prefix shared
by every candidate is computed once per layer and each candidate attends to its keys and values; the final
layer computes only the token the head reads. Resident split layers without a budget run on single-threaded
sessions, one chunk per core at a time (:meth:`Execution._layers_side_by_side`): with small operators between the
large matrix products, cores that each work on their own chunk waste less than cores that share every operator.
"""

from __future__ import annotations

import os
import time
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edge_sel.runtime import trace
from edge_sel.runtime.embedding import Embedder
from edge_sel.runtime.memory import HeapGuard

from .chunks import Chunk, ChunkStore
from .prefix import run_candidates, run_prefix
from .pruning import Pruner
from .scoring import Scores, Scoring
from .tokens import TokenStore


def chunk_workers(threads: int | None, memory_budget: int | None, split: bool, cpu_only: bool) -> int:
    """How many chunks of one layer run at once: one per available core for resident split decoder layers on the CPU
    when the caller left ``threads`` (and ``EDGE_SEL_THREADS``) unset; else 1 (each session multi-threaded)."""
    if threads is not None or memory_budget is not None or not split or not cpu_only or os.environ.get("EDGE_SEL_THREADS"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores)


@dataclass
class LayerObservation:
    """What an observer sees after a layer ran on a chunk (before pruning): calibration records these."""

    layer: int                 # position in the bundle's layer list
    items: np.ndarray          # [B] item indices (documents, then the query for bi-encoders)
    mask: np.ndarray           # [B, T] 1.0 on real tokens
    hidden_in: np.ndarray      # [B, T, H] the layer's input
    hidden_out: np.ndarray     # [B, T', H] its output (T' = 1 for a first-token-only final layer)
    pooled: np.ndarray         # [B, H] the output pooled as the head would read it


Observer = Callable[[LayerObservation], None]


@dataclass
class Call:
    """One call's context: where token ids and hidden states live, the heap guard, the pruner and observer (if any)."""

    store: ChunkStore
    guard: HeapGuard
    n_docs: int
    pruner: Pruner | None = None
    observer: Observer | None = None
    tokens: TokenStore | None = None
    pad_id: int = 0


@dataclass
class Work:
    """What an execution order did."""

    chunks: list[Chunk]                # the chunks at the end (re-packed when pruned)
    t_embed: float
    t_layers: float
    t_head: float
    live_per_layer: list[int] = field(default_factory=list)     # documents computed by each layer
    tokens_per_layer: list[int] = field(default_factory=list)
    last_token_only: bool = False      # the final layer computed the head's token only


class Execution:
    """Runs chunks through a bundle's layers with the engine's stream, embedder and scoring strategy."""

    def __init__(self, bundle, stream, embedder: Embedder, scoring: Scoring, split: bool, last_token_final: bool = True,
                 workers: int = 1):
        self.n_layers = len(bundle.spec.layers)
        self.workers = max(1, int(workers))  # > 1: chunks of one layer run side by side (single-threaded sessions)
        self._pool: ThreadPoolExecutor | None = None
        self.layer_inputs = bundle.spec.layer_io.inputs or ()
        self.empty_pos = bundle.spec.layer_io.empty_pos  # key position of padding (split layers)
        self.stream = stream
        self.embedder = embedder
        self.scoring = scoring
        self.split = split
        self.last_token_final = last_token_final

    def _feeds(self, c: Chunk, hidden: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"hidden": hidden, "mask": c.mask}
        if "position_ids" in self.layer_inputs:
            feeds["position_ids"] = c.positions
        return feeds

    def _embed(self, table: np.ndarray, c: Chunk, call: Call) -> np.ndarray:
        ids, types = call.tokens.rows(c.items, call.pad_id)
        return self.embedder(table, ids, types, c.positions)

    def _head(self, c: Chunk, h: np.ndarray, scores: Scores) -> None:
        scores.add(c.items, self.scoring.run_head(self.scoring.pool(h, c.lengths, c.mask)))

    def depth_first(self, chunks: list[Chunk], order: list[int] | None, scores: Scores, call: Call, doc_tokens: int) -> Work:
        """Each chunk through every (resident) layer and the head, one chunk at a time."""
        t0 = time.perf_counter()
        sessions = [sess for _, sess in self.stream.run(order)]  # all resident (keep_all): loaded once, kept
        t_embed = t_head = 0.0
        table = self.embedder.open_table()
        try:
            for c in chunks:
                tk = trace.begin("chunk", rows=len(c.items), tokens=len(c.items) * c.width)
                t = time.perf_counter()
                h = self._embed(table, c, call)
                t_embed += time.perf_counter() - t
                for sess in sessions:
                    h = sess.run(None, self._feeds(c, h))[0]
                trace.counter("engine", lambda h=h: {"hidden_bytes": h.nbytes})
                t = time.perf_counter()
                self._head(c, h, scores)
                t_head += time.perf_counter() - t
                del h
                call.guard.check()
                trace.end(tk)
        finally:
            del table, sessions
        n_run = len(order) if order is not None else self.n_layers
        return Work(chunks, t_embed, time.perf_counter() - t0 - t_embed - t_head, t_head,
                    [call.n_docs] * n_run, [doc_tokens] * n_run)

    def monolithic(self, chunks: list[Chunk], order: list[int] | None, scores: Scores, call: Call,
                   prefix_ids: np.ndarray | None = None, started: float | None = None) -> Work:
        """All candidates through one layer at a time, pruning at the schedule's layers; then the head.
        ``prefix_ids``: the shared prompt prefix of a split bundle (computed once per layer)."""
        t0 = started if started is not None else time.perf_counter()
        store = call.store
        table = self.embedder.open_table()
        prefix_h = prefix_pos = None
        if prefix_ids is not None and len(prefix_ids):
            prefix_pos = np.arange(len(prefix_ids), dtype=np.int64)[None]
            prefix_h = self.embedder(table, np.asarray(prefix_ids, dtype=np.int64)[None], None, prefix_pos)
        tk = trace.begin("embed", chunks=len(chunks))
        for c in chunks:
            c.hidden = self._embed(table, c, call)
            store.keep(c)
            call.guard.check()
        del table  # unmap: the touched embedding pages leave RSS
        call.tokens.close()  # the ids are not read again: their memory goes before the layers load
        trace.end(tk)
        t_embed = time.perf_counter() - t0
        work = Work(chunks, t_embed, 0.0, 0.0)
        self._layers(work, order, call, prefix_h, prefix_pos)
        t2 = time.perf_counter()
        tk = trace.begin("head", chunks=len(work.chunks))
        for c in work.chunks:
            self._head(c, store.hidden(c), scores)
            store.release(c)
        trace.end(tk)
        work.t_head = time.perf_counter() - t2
        return work

    def _layers(self, work: Work, order: list[int] | None, call: Call, prefix_h, prefix_pos) -> None:
        if self.workers > 1 and self.split and self.stream.keep_all and call.store.spill is None:
            return self._layers_side_by_side(work, order, call, prefix_h, prefix_pos)
        t1 = time.perf_counter()
        store, n_docs, observer = call.store, call.n_docs, call.observer
        final = (order or list(range(self.n_layers)))[-1]
        chunks = work.chunks
        for i, sess in self.stream.run(order):
            tk = trace.begin("layer", layer=i)
            work.live_per_layer.append(int(sum(int((c.items < n_docs).sum()) for c in chunks)))
            work.tokens_per_layer.append(int(sum(int(c.lengths[c.items < n_docs].sum()) for c in chunks)))
            # the head reads one token per candidate: the final layer computes only that token's output
            # (an observer looks at every token, so it gets the full layer)
            last_only = (self.last_token_final and self.split and i == final and self.scoring.reads_last_token
                         and observer is None)
            kp = vp = None
            if prefix_h is not None:
                prefix_h, kp, vp = run_prefix(sess, prefix_h, prefix_pos, kv_only=last_only)
            work.last_token_only |= last_only
            for c in chunks:
                tc = trace.begin("chunk", layer=i, rows=len(c.items), tokens=len(c.items) * c.width)
                h_in = store.hidden(c)
                if self.split:
                    c.hidden = run_candidates(sess, h_in, c.mask, c.positions, kp, vp, prefix_pos, self.empty_pos,
                                              last=c.lengths - 1 if last_only else None)
                else:
                    c.hidden = sess.run(None, self._feeds(c, h_in))[0]
                if observer is not None:
                    observer(LayerObservation(i, c.items, c.mask, h_in, c.hidden,
                                              self.scoring.pool(c.hidden, c.lengths, c.mask)))
                del h_in
                store.keep(c)
                call.guard.check()
                trace.end(tc)
            trace.counter("engine", lambda: {"hidden_bytes": sum(c.hidden.nbytes for c in chunks if c.hidden is not None)})
            trace.end(tk, live=work.live_per_layer[-1])
            del sess, kp, vp
            trace.instant("layer.release", layer=i)
            if call.pruner is not None:
                chunks = call.pruner.after_layer(i, chunks, store)
        work.chunks = chunks
        work.t_layers = time.perf_counter() - t1

    # ---- chunks side by side -----------------------------------------------------------------
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="edge_sel-chunk")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _layers_side_by_side(self, work: Work, order: list[int] | None, call: Call, prefix_h, prefix_pos) -> None:
        """:meth:`_layers` for resident split layers on single-threaded sessions (one per core): every chunk moves
        through the layers as a chain of (chunk, layer) tasks on ``workers`` threads, a chunk's next layer queued
        behind the other chunks' current one, so no core waits for another's share of a small operator nor for the
        slowest chunk of a layer; all chunks meet only where something compares them (a pruning layer; every layer
        for an observer, called on this thread in chunk order). The shared prefix runs its own chain on this thread
        meanwhile (it depends on nothing else). Same kernels, same scores."""
        t1 = time.perf_counter()
        store, n_docs, observer, pruner = call.store, call.n_docs, call.observer, call.pruner
        layers = list(self.stream.run(order))  # all resident: loaded once, kept
        final = layers[-1][0]
        last_only = self.last_token_final and self.scoring.reads_last_token and observer is None
        pool = self.pool()
        kv: list[Future] | None = [Future() for _ in layers] if prefix_h is not None else None
        meet = [pos for pos, (i, _) in enumerate(layers)
                if observer is not None or (pruner is not None and i in pruner.layers) or pos == len(layers) - 1]
        inputs: dict[tuple[int, int], np.ndarray] = {}
        stop = threading.Event()  # the calling thread gave up (an error, an interrupt): queued steps end at once

        def step(c: Chunk, pos: int, end: int, done: Future) -> None:
            try:
                if stop.is_set():
                    raise CancelledError()
                i, sess = layers[pos]
                kp, vp = kv[pos].result() if kv is not None else (None, None)
                if observer is not None:
                    inputs[id(c), pos] = c.hidden
                c.hidden = run_candidates(sess, c.hidden, c.mask, c.positions, kp, vp, prefix_pos, self.empty_pos,
                                          last=c.lengths - 1 if last_only and i == final else None)
                if pos < end:
                    pool.submit(step, c, pos + 1, end, done)
                else:
                    done.set_result(None)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                done.set_exception(e)

        chunks, start = work.chunks, 0
        for end in meet:
            for pos in range(start, end + 1):
                work.live_per_layer.append(int(sum(int((c.items < n_docs).sum()) for c in chunks)))
                work.tokens_per_layer.append(int(sum(int(c.lengths[c.items < n_docs].sum()) for c in chunks)))
            tk = trace.begin("layer", layer=layers[start][0], through=layers[end][0], chunks=len(chunks))
            done = [Future() for _ in chunks]
            for c, d in sorted(zip(chunks, done), key=lambda cd: -len(cd[0].items) * cd[0].width):
                pool.submit(step, c, start, end, d)
            try:
                if kv is not None and not kv[-1].done():
                    self._prefix_chain(layers, prefix_h, prefix_pos, kv, last_only)
                for d in done:
                    d.result()
            except BaseException:
                stop.set()
                raise
            trace.end(tk)
            if observer is not None:
                for c in chunks:
                    observer(LayerObservation(layers[end][0], c.items, c.mask, inputs.pop((id(c), end)), c.hidden,
                                              self.scoring.pool(c.hidden, c.lengths, c.mask)))
            call.guard.check()
            if pruner is not None:
                chunks = pruner.after_layer(layers[end][0], chunks, store)
            start = end + 1
        work.last_token_only = last_only
        work.chunks = chunks
        work.t_layers = time.perf_counter() - t1

    @staticmethod
    def _prefix_chain(layers, h, positions, kv: list[Future], last_only: bool) -> None:
        """The shared prefix through every layer, each layer's K/V handed over as soon as it is computed
        (the final layer's output is not needed when only the head's token is)."""
        try:
            for pos, (_, sess) in enumerate(layers):
                h, k, v = run_prefix(sess, h, positions, kv_only=last_only and pos == len(layers) - 1)
                kv[pos].set_result((k, v))
        except BaseException as e:  # noqa: BLE001 - the chunks waiting for it fail with it
            for f in kv:
                if not f.done():
                    f.set_exception(e)
            raise
