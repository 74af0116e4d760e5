"""``Reranker``: rank documents for a query by streaming a bundle's layers under a memory budget.

The public API of the rerank engine. A call tokenizes the documents batch by batch as it reads them into a compact
token store (:mod:`.text`, :mod:`.tokens`), plans the budget (layer window, chunk size,
spill; :mod:`edge_sel.runtime.planning`), cuts the candidates into chunks (:mod:`.chunks`), runs them in an execution
order (:mod:`.execution`), prunes at the calibrated schedule's layers (:mod:`.pruning`) and turns the head's
output into scores with the bundle's scoring strategy (:mod:`.scoring`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterable, Iterator

import numpy as np

from edge_sel.runtime import trace
from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.embedding import Embedder
from edge_sel.runtime.errors import BudgetError, InputError
from edge_sel.runtime.memory import HeapGuard, PeakTracker, ReleaseLog, release_free_memory, tune_allocator
from edge_sel.runtime.planning import CallSize, Planner
from edge_sel.runtime.planning.rerank import ChunkCount
from edge_sel.runtime.providers import Assignment, ProviderChoice
from edge_sel.runtime.providers import check_name as check_provider_name
from edge_sel.runtime.providers import resolve as resolve_provider
from edge_sel.runtime.planning.rerank import SESSION_OVERHEAD
from edge_sel.runtime.sessions import backend_for
from edge_sel.runtime.units import format_min_size, format_size, parse_size

from .chunks import ChunkStore, HiddenSpill, Packing, make_chunks
from .execution import Call, Execution, Observer, chunk_workers
from .prefix import PairStream, is_split, qkv_weight_bytes
from .pruning import Pruner
from .schedule import Schedule
from .scoring import LayerScorer, scoring_for
from .shadow import Shadow, check_fraction
from .stats import RerankStats
from .stream import LayerStream
from .text import Encoded, Streamed, TextEncoder
from .tokens import TokenStore

log = logging.getLogger("edge_sel")


class Reranker:
    """Rank ``documents`` for a ``query`` with a bundle.

    >>> rr = Reranker("bundles/minilm", memory_budget="128MB")
    >>> rr.rank("how do I copy a file?", docs, top_k=5)
    [{'corpus_id': 3, 'score': 0.71}, ...]

    memory_budget: bytes or a size string ("128MB", "1.5GiB"); None keeps every layer resident (with its weights
    pre-packed by onnxruntime's kernels: faster, at the cost of a packed copy of the weights in memory). When the
    kept hidden states of all candidates do not fit the budget they are spilled to files under
    ``spill_dir`` (default: the system temp directory) — only the chunk in flight stays in RAM;
    ``spill=False`` refuses such budgets instead.
    documents: a list of strings, or any re-iterable with ``len()`` such as
    :class:`edge_sel.runtime.documents.DocumentsFile` (read batch by batch, never whole). Their token ids are kept
    compactly (4-5 bytes a token) and, under a budget, moved to a file in ``spill_dir`` once they pass a sixteenth of
    it; the plan counts them and every per-candidate structure, so with spilling on the minimum budget does not grow
    with the number of documents beyond ~128 bytes of bookkeeping each (plus the embedding, for bi-encoders).
    ``top_k`` larger than the number of documents is clamped to it (with a log note); ``top_k <= 0`` is refused.

    pruning (early ranking, used by :meth:`rank`; :meth:`predict` always computes every score):
      ``"auto"`` (default) — prune with the bundle's calibrated schedule; a bundle without one runs
      every candidate through every layer (logged; ``last_stats["pruning"]`` says to calibrate);
      ``"on"`` — like auto, but a bundle without a schedule is refused (InputError: run ``edge-sel calibrate``);
      ``"off"`` / None — never prune; or a schedule (dict as in the manifest, or :class:`Schedule`).
    A schedule calibrated for top-K protects any ``top_k <= K``; for a larger ``top_k`` that call runs unpruned (warning).

    provider: the onnxruntime execution provider — ``"cpu"`` (default), ``"auto"`` (CoreML where this onnxruntime build
    has it, else the CPU), ``"coreml"``, another short or full provider name, or a
    :class:`edge_sel.runtime.providers.ProviderChoice`; a provider the build lacks is refused (InputError).
    ``last_stats["provider"]`` reports the choice, how many graph nodes each provider took (those another provider
    could not take fall back to the CPU: ``cpu_fallback_ops``) and the sessions' load time (a provider that compiles
    a graph on load, as CoreML does, pays it on every streamed layer load). ``"coreml"`` on a bundle exported with
    ``--format coreml`` runs its CoreML packages with Core ML instead (macOS only; :mod:`edge_sel.runtime.coreml`).

    threads: onnxruntime intra-op threads per session. None (default): for a split decoder bundle without a budget,
    single-threaded sessions with one chunk per core running at once (:func:`.execution.chunk_workers`); else
    onnxruntime's default (every core).

    last_token_final_layer: split decoder bundles whose head reads the last token compute only that token in
    the final layer (same scores within float rounding); False runs the full final layer.

    shadow: the fraction of pruned :meth:`rank` calls that are run again unpruned once the pruned answer is
    computed; a pruned top-K that differs from the full model's tightens the schedule, stored back into the bundle
    atomically when it came from there (:mod:`.shadow`). Counts and cost: ``last_stats["shadow"]``.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, memory_budget: int | str | None = None,
                 pruning: str | dict | Schedule | None = "auto", threads: int | None = None, optimize: str = "all",
                 spill: bool = True, spill_dir: str | os.PathLike | None = None, last_token_final_layer: bool = True,
                 provider: str | ProviderChoice | None = "cpu", shadow: float = 0.0):
        check_provider_name(provider)  # before the bundle opens: a bad name fails fast
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        # "coreml" on a bundle with CoreML packages: the Core ML backend (edge_sel.runtime.coreml)
        self.providers = Assignment(resolve_provider(provider, packages=self.bundle.spec.coreml is not None))
        self.backend = backend_for(self.bundle, self.providers)
        if self.bundle.task != "rerank":
            raise InputError(f"{self.bundle.root} is a {self.bundle.task!r} bundle; ranking needs a bundle exported with --task rerank")
        self.memory_budget = parse_size(memory_budget) if memory_budget is not None else None
        if self.memory_budget is not None:
            tune_allocator()  # under a budget, freed activations must leave the process (glibc; see edge_sel.runtime.memory)
        self.split = is_split(self.bundle)  # qkv + attn layer graphs: the shared prompt prefix is computed once
        # one warning per call that truncates documents; a pass measuring on its own fixed text (drop-layers,
        # quantize's agreement) turns it off rather than print it for every one of its calls
        self.warn_truncated = True
        self.planner = planner_for(self.bundle, self.backend)
        if self.memory_budget is not None and self.memory_budget < self.planner.static_minimum():
            need = self.planner.static_minimum()
            raise BudgetError(
                f"memory budget {format_size(self.memory_budget)} is below the minimum this bundle can run in: "
                f"{format_min_size(need)} (two layers of {format_size(self.planner.layer_bytes)} + fixed costs)", minimum_bytes=need)
        self.encoder = TextEncoder(self.bundle)
        self.embedder = Embedder(self.bundle)
        head = self.backend.open(self.bundle.path(self.bundle.spec.head.file), threads)
        self.scoring = scoring_for(self.bundle, head)  # the scoring mode's strategy, chosen once
        self.pruning = "off" if pruning is None else pruning
        self.schedule, self.pruning_note = self._resolve_schedule(self.pruning)
        self.layer_scorer = LayerScorer(self.bundle, self.schedule, self.scoring) if self.schedule else None
        # no budget: every layer session stays resident for the reranker's life, so its kernels pack the weights once
        # (as a plain onnxruntime session does); under a budget the weights stay file-backed
        # no budget, a split decoder on the CPU, threads left to us: each core runs a single-threaded session on its own
        # chunk (no core waits on another's share of a small operator); otherwise each session uses every core
        self.workers = chunk_workers(threads, self.memory_budget, self.split, self.providers.choice.cpu_only)
        layer_threads = 1 if self.workers > 1 else threads
        self.stream = (PairStream if self.split else LayerStream)(self.bundle, len(self.bundle.spec.layers), layer_threads, optimize,
                                                                   self.providers, backend=self.backend,
                                                                   prepack=self.memory_budget is None)
        self.execution = Execution(self.bundle, self.stream, self.embedder, self.scoring, self.split, bool(last_token_final_layer),
                                   workers=self.workers)
        self.pad_id = self.bundle.spec.pad_id
        self.stats = RerankStats()
        self.allow_spill = bool(spill)
        self.spill_dir = spill_dir
        self._skip: frozenset[int] = frozenset()
        self._dropped_at: np.ndarray | None = None
        self.shadow = Shadow(shadow) if check_fraction(shadow) > 0 else None

    def _resolve_schedule(self, pruning) -> tuple[Schedule | None, str]:
        root = self.bundle.root
        if isinstance(pruning, str):
            if pruning == "off":
                return None, "off"
            if pruning not in ("auto", "on"):
                raise InputError(f"pruning={pruning!r}: expected 'auto', 'on', 'off' or a schedule")
            stored = self.bundle.spec.schedule
            if stored is None:
                if pruning == "on":
                    raise InputError(f"{root} has no early-ranking schedule, so pruning cannot be used; "
                                     f"calibrate it first: `edge-sel calibrate {root}` (or pruning 'auto' / 'off': "
                                     "`--pruning auto` from the command line)")
                log.info("%s has no early-ranking schedule: ranking without pruning (run `edge-sel calibrate %s`)", root, root)
                return None, "off (bundle not calibrated: run `edge-sel calibrate`)"
            sched = Schedule.from_manifest(stored.to_dict())
        elif isinstance(pruning, Schedule):
            sched = pruning
        elif isinstance(pruning, dict):
            sched = Schedule.from_manifest(pruning)
        else:
            raise InputError(f"pruning must be 'auto', 'on', 'off' or a schedule, got {type(pruning).__name__}")
        sched.validate(self.bundle)
        return sched, f"{sched.method} at layers {sched.layers} (top-{sched.top_k})"

    # ---- public API ----------------------------------------------------------------------
    @property
    def last_stats(self) -> dict[str, Any]:
        """The last call's :class:`RerankStats` as a dict."""
        return self.stats.as_dict()

    def rank(self, query: str, documents: list[str], top_k: int | None = 10, return_documents: bool = False,
             instruction: str | None = None) -> list[dict[str, Any]]:
        prune_k = top_k  # None: full ordering; pruned with the schedule's own K (dropped candidates listed last)
        if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k <= 0):
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        scores = self._run(query, documents, instruction, top_k=prune_k, prune=True)
        n = len(scores)
        if top_k is None:
            top_k = n
        if top_k > n:
            log.info("top_k=%d is larger than the %d documents; returning all %d", top_k, n, n)
            top_k = n
        dropped = self._dropped_at if self._dropped_at is not None else np.full(n, -1)
        # survivors by final score, then dropped candidates: later drop first, then by their last score
        key_drop = np.where(dropped < 0, np.iinfo(np.int64).max, dropped)
        order = np.lexsort((-scores, -key_drop))[:top_k]
        texts = _texts(documents, order) if return_documents else None
        results = []
        for i in order:
            r = {"corpus_id": int(i), "score": float(scores[i])}
            if dropped[i] >= 0:
                r["pruned_at_layer"] = int(dropped[i])
            if return_documents:
                r["text"] = texts[int(i)]
            results.append(r)
        if self.shadow is not None and self._dropped_at is not None:  # a pruned call
            self._shadow(query, documents, instruction, [r["corpus_id"] for r in results], top_k)
        return results

    def _shadow(self, query: str, documents: list[str], instruction: str | None, returned: list[int], top_k: int) -> None:
        """Shadow mode after a pruned call (see :mod:`.shadow`); the call's own stats are kept."""
        st = self.stats
        if self.shadow.due(st.latency_s or 0.0):
            new = self.shadow.run(self, query, documents, instruction, returned, top_k)
            if new is not None:
                stored = self.shadow.store(self.bundle, new) if isinstance(self.pruning, str) else None
                if stored is not None:
                    self.bundle = stored
                self.schedule = new
                self.pruning_note = f"{new.method} at layers {new.layers} (top-{new.top_k}, tightened by shadow runs)"
        else:
            self.shadow.stats.last = {"ran": False}
        st.shadow = self.shadow.stats.as_dict()
        self.stats = st

    def predict(self, query: str, documents: list[str], instruction: str | None = None) -> np.ndarray:
        """Full-model scores for every document, in input order (never pruned; :meth:`rank` prunes)."""
        return self._run(query, documents, instruction, top_k=None, prune=False)

    def trace(self, query: str, documents: list[str], observer: Observer, instruction: str | None = None) -> np.ndarray:
        """:meth:`predict`, calling ``observer(LayerObservation)`` after every layer ran on every chunk (calibration).
        Traced calls run every candidate through every token of every layer, one layer at a time."""
        return self._run(query, documents, instruction, top_k=None, prune=False, observer=observer)

    @contextlib.contextmanager
    def skipping(self, layers: Iterable[int]) -> Iterator["Reranker"]:
        """Within the block, calls leave out the layers at these positions (measuring what dropping them costs,
        without reloading the other layers' sessions)."""
        self._skip = frozenset(int(x) for x in layers)
        try:
            yield self
        finally:
            self._skip = frozenset()

    def minimum_budget(self, query: str, documents: list[str], instruction: str | None = None) -> int:
        """Smallest ``memory_budget`` (bytes) under which this query and these documents can run."""
        return self.planner.minimum_for(self.call_size(query, documents, instruction), self.allow_spill)

    def call_size(self, query: str, documents: list[str], instruction: str | None = None) -> CallSize:
        """What the planner counts of this query and these documents (tokenized once, nothing run)."""
        tokens = TokenStore(vocab=self.embedder.rows)
        try:
            self.encoder.encode_into(tokens, query, documents, instruction, split=self.split)
            tokens.freeze()
            return CallSize(int(tokens.lengths.sum()), int(tokens.lengths.max()), self.embedder.touched_bytes(tokens.unique_ids()),
                            tokens.n_items, tokens.nbytes_if_ram(), ChunkCount(tokens.lengths))
        finally:
            tokens.close()

    def close(self) -> None:
        self.execution.close()
        self.stream.close()
        self.backend.close()

    def score_encoded(self, enc: Encoded, top_k: int | None = None, prune: bool = False) -> np.ndarray:
        """Scores for the encoded documents. With ``prune`` and a schedule, prune early for ``top_k``
        (None: the schedule's K) — see :meth:`rank`; dropped candidates carry their last early score."""
        ids, types = self.scoring.items(enc)
        tokens = TokenStore(vocab=self.embedder.rows)
        try:
            tokens.add(ids, types)
            tokens.freeze()
            prefix = enc.doc_ids[0][: enc.prefix_len] if self.split else np.zeros(0, dtype=np.int64)
            text = Streamed(np.asarray(prefix, dtype=np.int64), enc.prefix_len, len(enc.doc_ids), enc.n_truncated)
            return self._score(tokens, text, top_k, prune, None, HeapGuard(self.memory_budget))
        finally:
            tokens.close()

    # ---- one call ------------------------------------------------------------------------
    def _run(self, query: str, documents, instruction: str | None, top_k: int | None, prune: bool,
             observer: Observer | None = None) -> np.ndarray:
        loads0, load_s0 = self.providers.sessions, self.providers.load_s
        released = ReleaseLog()
        t0 = time.perf_counter()
        with PeakTracker() as peak:
            guard = HeapGuard(self.memory_budget)  # between batches and chunks: give back free heap pages near the budget
            tokens = TokenStore(ram_limit=self.planner.token_ram_limit(self.memory_budget, self.allow_spill),
                                spill_dir=self.spill_dir, vocab=self.embedder.rows)
            try:
                tk = trace.begin("tokenize")
                text = self.encoder.encode_into(tokens, query, documents, instruction, split=self.split, on_batch=guard.check)
                tokens.freeze()
                trace.end(tk, documents=text.n_docs)
                t_tok = time.perf_counter() - t0
                if text.n_truncated and self.warn_truncated:
                    log.warning("%d of %d documents were longer than the model's maximum of %d tokens and were truncated",
                                text.n_truncated, text.n_docs, self.bundle.max_length)
                scores = self._score(tokens, text, top_k, prune, observer, guard)
            finally:
                tokens.close()
        release_free_memory()
        st = self.stats
        st.latency_s, st.tokenize_s = time.perf_counter() - t0, t_tok
        st.peak_rss_bytes, st.start_rss_bytes = peak.peak, peak.start
        st.n_documents, st.n_truncated = text.n_docs, text.n_truncated
        st.memory_release = released.report()
        st.provider = {**self.providers.as_dict(), "call_sessions_loaded": self.providers.sessions - loads0,
                       "call_session_load_s": round(self.providers.load_s - load_s0, 4)}
        return scores

    def _score(self, tokens: TokenStore, text: Streamed, top_k: int | None, prune: bool, observer: Observer | None,
               guard: HeapGuard) -> np.ndarray:
        lengths = tokens.lengths
        total, max_len = int(lengths.sum()), int(lengths.max())
        embed_bytes = self.embedder.touched_bytes(tokens.unique_ids())
        plan = self.planner.plan(self.memory_budget, total, max_len, embed_bytes, self.allow_spill,
                                 n_items=tokens.n_items, token_ram=tokens.ram_bytes, count=ChunkCount(lengths))
        trace.instant("plan", **plan.as_dict(), candidates=tokens.n_items, total_tokens=total, max_len=max_len)
        self.stream.set_window(plan.window)
        store = ChunkStore(HiddenSpill(self.spill_dir) if plan.spill else None)
        try:
            # depth-first keeps the embedding table mapped (and the token ids) while the layers run; under a budget
            # that is only allowed where the kept-states room it does not use covers the table's touched pages
            embed_fits = plan.budget is None or embed_bytes + tokens.ram_bytes <= self.planner.hidden_bytes(total, max_len)
            return self._score_planned(tokens, text, plan, top_k, prune, embed_fits, store, guard, observer)
        finally:
            if store.spill is not None:
                self.stats.spill_bytes_written = store.bytes_written
                self.stats.spill_bytes_read = store.bytes_read
            store.close()
            self.stats.heap_trims = guard.trims

    def _pruner(self, top_k: int | None, prune: bool, n_docs: int, n_items: int, packing: Packing) -> tuple[Pruner | None, str]:
        """This call's pruner (None: no pruning) and the note that says why."""
        if self.schedule is None:
            return None, self.pruning_note
        if not prune:
            return None, "off (predict computes every score)"
        if top_k is not None and top_k > self.schedule.top_k:
            log.warning("top_k=%d is larger than the top-%d the pruning schedule was calibrated for: this call runs "
                        "without pruning (recalibrate with `edge-sel calibrate BUNDLE --top-k %d`)", top_k, self.schedule.top_k, top_k)
            return None, f"off for this call (top_k={top_k} > calibrated top-{self.schedule.top_k})"
        return Pruner(self.schedule, self.layer_scorer, self.scoring, n_docs, n_items, len(self.bundle.spec.layers), packing,
                      self.bundle.spec.dims.hidden), self.pruning_note

    def _score_planned(self, tokens: TokenStore, text: Streamed, plan, top_k, prune, embed_fits: bool,
                       store: ChunkStore, guard: HeapGuard, observer: Observer | None) -> np.ndarray:
        t0 = time.perf_counter()
        lengths = tokens.lengths
        n_items, n_docs, n_layers = tokens.n_items, text.n_docs, len(self.bundle.spec.layers)
        packing = Packing(self.pad_id, text.prefix_len if self.split else 0, plan.chunk_tokens, plan.max_batch)
        chunks = make_chunks(lengths, packing)
        pruner, pruning_note = self._pruner(top_k, prune, n_docs, n_items, packing)
        order = [j for j in range(n_layers) if j not in self._skip] if self._skip else None
        # Nothing to compare between layers and every layer resident: run each chunk through all layers and the head
        # in turn (depth-first) instead of holding every candidate's hidden state between layers (monolithic).
        depth_first = ((pruner is None or not pruner.prunes_anything) and embed_fits and self.stream.keep_all
                       and not plan.spill and not self.split and observer is None)
        scores = self.scoring.collector(n_items)
        doc_tokens = int(lengths[:n_docs].sum())
        call = Call(store, guard, n_docs, pruner, observer, tokens, self.pad_id)
        if depth_first:
            work = self.execution.depth_first(chunks, order, scores, call, doc_tokens)
        else:
            prefix = text.prefix_ids if self.split else None
            work = self.execution.monolithic(chunks, order, scores, call, prefix, started=t0)
        out = scores.result()
        if pruner is not None:
            out = pruner.finish(out)
        self._dropped_at = pruner.dropped_at if pruner is not None else None
        chunks = work.chunks
        self.stats = RerankStats(
            embed_s=work.t_embed, layers_s=work.t_layers, head_s=work.t_head, layer_load_wait_s=self.stream.load_wait_s,
            window_layers=self.stream.window, chunk_size=int(max(len(c.items) for c in chunks)) if chunks else 0,
            chunk_tokens=plan.chunk_tokens, n_chunks=len(chunks), memory_budget_bytes=plan.budget,
            plan_estimate=plan.estimate, live_per_layer=work.live_per_layer, n_layers=n_layers,
            layer_loads=self.stream.loads, pruning=pruning_note,
            layer_work_saved=1.0 - sum(work.live_per_layer) / max(1, n_docs * n_layers),
            token_work_saved=1.0 - sum(work.tokens_per_layer) / max(1, doc_tokens * n_layers),
            n_pruned=pruner.n_pruned if pruner is not None else 0,
            dropped_layers=list(self.bundle.spec.dropped_layers),
            prefix_reuse_tokens=int(text.prefix_len) if self.split else 0, spill=plan.spill,
            final_layer_last_token_only=bool(work.last_token_only), order="depth-first" if depth_first else "monolithic")
        return out


def planner_for(bundle: Bundle, backend) -> Planner:
    """The memory planner of ``bundle``'s layers as ``backend`` opens them: a layer is its graph files (with its qkv
    graph, for split layers), or the backend's own stage files (CoreML packages) when it has them."""
    planner = Planner(bundle)
    if is_split(bundle):
        planner.layer_bytes += max(qkv_weight_bytes(bundle, i) for i in range(len(bundle.spec.layers)))
    sizes = backend.plan_sizes()
    if sizes is not None:
        layer, head = sizes
        planner.fixed += head - bundle.spec.files[bundle.spec.head.file].size
        planner.layer_bytes = layer + SESSION_OVERHEAD
    return planner


def _texts(documents, indices) -> dict[int, str]:
    """The documents at ``indices``: read once more from a documents file, else indexed."""
    if hasattr(documents, "texts"):
        return documents.texts(indices)
    return {int(i): documents[int(i)] for i in indices}
