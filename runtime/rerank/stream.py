"""The layer stream: execute a bundle's layers in order holding a window of W >= 2 sessions.

While layer i computes, layers i+1 .. i+W-1 load on a background thread (GRATING's "monolithic
forwarding" keeps all candidates moving through one layer at a time, so each layer is loaded once
per call). When W covers every layer the sessions stay resident across calls (no reload cost).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

from edge_sel.runtime import trace
from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.providers import Assignment
from edge_sel.runtime.sessions import OnnxRuntimeBackend


class LayerStream:
    """``prepack``: sessions kept resident (a window covering every layer) let their kernels pack the weights once
    (faster runs, a packed copy in anonymous memory); streamed sessions never do (their weights stay file-backed)."""

    def __init__(self, bundle: Bundle, window: int, threads: int | None = None, optimize: str = "all",
                 providers: Assignment | None = None, backend=None, prepack: bool = False):
        self.bundle = bundle
        self.prepack = prepack
        self.providers = providers  # the execution providers' choice; counts every session's load time
        # opens each graph: onnxruntime sessions, or another backend's stages (edge_sel.runtime.coreml)
        self.backend = backend if backend is not None else OnnxRuntimeBackend(providers)
        self.n = len(bundle.spec.layers)
        self.threads = threads
        self.optimize = optimize
        self._resident: dict[int, object] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge_sel-layer-loader")
        self.load_wait_s = 0.0
        self.loads = 0
        self.set_window(window)

    def set_window(self, window: int) -> None:
        self.window = max(2, min(int(window), self.n)) if self.n > 1 else 1
        self.keep_all = self.window >= self.n
        if not self.keep_all:
            self._resident.clear()

    @property
    def packs(self) -> bool:
        """Whether the sessions loaded now pre-pack their weights: only resident ones, when asked for."""
        return self.prepack and self.keep_all

    def load_layer(self, i: int):
        """Load the session(s) of layer ``i`` (a subclass may load more than one graph per layer)."""
        tk = trace.begin("layer.load", layer=i)
        sess = self.backend.open(self.bundle.layer_path(i), self.threads, self.optimize, mem_pattern=self.keep_all,
                                 prepack=self.packs)
        trace.end(tk)
        self.loads += 1
        return sess

    def run(self, layers: list[int] | None = None) -> Iterator[tuple[int, object]]:
        """Yield ``(layer_index, session)`` in order; at most ``window`` sessions alive at once."""
        order = list(range(self.n)) if layers is None else list(layers)
        self.load_wait_s = 0.0
        pending: dict[int, Future] = {}

        def want(pos: int) -> None:
            if pos < len(order):
                j = order[pos]
                if j not in self._resident and j not in pending:
                    pending[j] = self._pool.submit(self.load_layer, j)

        try:
            for pos in range(min(self.window, len(order))):
                want(pos)
            for pos, i in enumerate(order):
                t = time.perf_counter()
                sess = self._resident.get(i)
                if sess is None:
                    sess = pending.pop(i).result()
                    if self.keep_all:
                        self._resident[i] = sess
                self.load_wait_s += time.perf_counter() - t
                want(pos + self.window - 1)
                yield i, sess
                del sess
        finally:
            for f in pending.values():
                f.cancel()
            pending.clear()

    def close(self) -> None:
        self._resident.clear()
        self._pool.shutdown(wait=True)
