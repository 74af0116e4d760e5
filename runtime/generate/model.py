"""The decoder as the generate engine runs it: per layer a q/k/v graph and an attention+MLP graph, the
embedding table, the LM head, and the weight pages those sessions map.

Long prompts prefill with each layer's weights mapped only during its own pass (see
:mod:`edge_sel.runtime.residency`), so the prefill's activations and the model's weights never peak
together; decoding runs every layer per token, so the weights are mapped back once before it.
"""

from __future__ import annotations

import numpy as np

from edge_sel.runtime.bundle import Bundle

from .. import trace
from ..embedding import Embedder
from ..residency import WeightPages, snapshot
from ..providers import Assignment
from ..sessions import OnnxRuntimeBackend, needs_prepacking, shared_pool_threads

# Prompts longer than this release each layer's weights after its prefill pass and trim the heap after
# every layer: their prefill's activations are large enough for the overlap to matter.
TRIM_AFTER_TOKENS = 1024


class DecoderModel:
    def __init__(self, bundle: Bundle, threads: int | None = None, providers: Assignment | None = None, backend=None):
        spec = bundle.spec
        self.providers = providers
        # opens each graph (onnxruntime sessions by default; edge_sel.runtime.sessions.backend_for)
        self.backend = backend if backend is not None else OnnxRuntimeBackend(providers, small_ops=True)
        self.embedder = Embedder(bundle)
        self.table = self.embedder.open_table()
        before = snapshot()  # the mappings the sessions below add are this model's (see WeightPages)
        # prefill shapes change every chunk: no memory pattern
        self.layers = []
        for i, layer in enumerate(spec.layers):
            qkv = bundle.path(spec.extra_graphs[layer.qkv].file)
            # a profile's stages name where the engine's build peaks (quantized kernels prepack their weights here)
            with trace.span("layer.load", layer=i):
                self.layers.append((self.backend.open(qkv, threads, mem_pattern=False),
                                    self.backend.open(bundle.layer_path(i), threads, mem_pattern=False)))
        with trace.span("head.load"):  # an LM head tied to an 8-bit table prepacks the whole vocabulary: often the peak
            self.head = self.backend.open(bundle.path(spec.head.file), threads, mem_pattern=False)
        # the process-wide spinning pool these sessions run on (0: their own pools; sessions.shared_pool_threads)
        self.shared_pool = shared_pool_threads(threads, small_ops=True) if isinstance(self.backend, OnnxRuntimeBackend) else 0
        # each layer's weight files (qkv graph, attention+MLP graph)
        self.layer_weights = [(bundle.path(spec.extra_graphs[layer.qkv].weights), bundle.path(layer.weights))
                              for layer in spec.layers]
        # none: the head's weights are inline, or (an LM head tied to an 8-bit table) the table's own files
        enc = spec.embed.encoding
        tied = [bundle.path(a.file) for a in (spec.embed, enc.scales) if a is not None] if enc is not None else []
        self.head_files = [bundle.path(spec.head.weights)] if spec.head.weights else tied
        self.pages = WeightPages(self.weight_files() + self.head_files, before)
        # Block-quantized graphs run on the packed copies their kernels made at load: the weight files' pages are
        # not read again, so they leave RSS now and are never mapped back.
        graphs = [p for i, layer in enumerate(spec.layers)
                  for p in (bundle.path(spec.extra_graphs[layer.qkv].file), bundle.layer_path(i))]
        self.prepacked = isinstance(self.backend, OnnxRuntimeBackend) and all(needs_prepacking(p) for p in graphs)
        if self.prepacked:
            self.pages.release(*self.weight_files(), *self.head_files)

    def weight_files(self) -> list:
        return [p for pair in self.layer_weights for p in pair]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Hidden states of ``ids`` ``[1, T]``; the gathered rows leave RSS again (the result is a copy)."""
        h = self.embedder(self.table, ids)
        self.embedder.release(self.table)
        return h

    def logits(self, h_last: np.ndarray) -> np.ndarray:
        return self.head.run(None, {"hidden": np.ascontiguousarray(h_last, dtype=np.float32)})[0][0]

    def head_logits(self, hidden: np.ndarray) -> np.ndarray:
        """``[T, vocab]`` logits of every row of ``hidden`` ``[T, H]``."""
        return self.head.run(None, {"hidden": np.ascontiguousarray(hidden, dtype=np.float32)})[0]

    # ---- weight residency -------------------------------------------------------------------
    def releases_weights(self, n_prompt: int) -> bool:
        return n_prompt > TRIM_AFTER_TOKENS and self.pages.releasable

    def release_weights(self) -> None:
        self.pages.release(*self.weight_files(), *self.head_files)

    def release_layer(self, layer: int) -> None:
        self.pages.release(*self.layer_weights[layer])
        trace.instant("weights.release", layer=layer)

    def map_layers(self) -> None:
        if self.prepacked:
            return
        tk = trace.begin("weights.map")
        self.pages.populate(*self.weight_files())
        trace.end(tk)

    def close(self) -> None:
        self.layers = []
        self.head = None
        self.table = None
        self.backend.close()
