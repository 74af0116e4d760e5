"""onnxruntime sessions that keep weights file-backed.

With weights as external data and ``session.disable_prepacking=1`` an
onnxruntime session's weights stay in the page cache (mmap) instead of anonymous memory, so a
layer's weights leave RSS when its session is released. The CPU arena is turned off so that a
session kept resident does not keep its largest activation allocation for life.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import onnxruntime as ort

from edge_sel.runtime import trace
from edge_sel.runtime.errors import BundleError
from edge_sel.runtime.providers import Assignment

# EDGE_SEL_SHARED_THREADS=N: every session of the process runs its ops on one process-wide pool of N threads whose
# workers spin between ops and between runs, as llama.cpp's threads do, instead of each session waking its own
# sleeping worker for every parallel op (a decode step runs 61 sessions, each op a few microseconds to a few
# hundred). Faster when the process has its cores to itself; on a loaded machine spinning threads lose their time
# slices and every op waits for them, so it is off by default. onnxruntime takes the pool's size once, before the
# first session: read when this module is imported.
SHARED_THREADS_ENV = "EDGE_SEL_SHARED_THREADS"


def _shared_threads() -> int:
    try:
        n = int(os.environ.get(SHARED_THREADS_ENV, "0") or 0)
    except ValueError:
        return 0
    if n > 0:
        from onnxruntime.capi import onnxruntime_pybind11_state as binding  # the only place onnxruntime exposes it

        binding.set_global_thread_pool_sizes(n, 1)
    return max(n, 0)


SHARED_THREADS = _shared_threads()


def session_options(threads: int | None = None, optimize: str = "all", mem_pattern: bool = True,
                    prepack: bool = False) -> ort.SessionOptions:
    """``mem_pattern=False`` for sessions that live for one call (a streaming window): onnxruntime plans a
    memory pattern on the first run of every input shape, and a fresh session never runs a shape twice.
    ``prepack``: let kernels repack constant weights into their own (anonymous) buffers; off by default so float
    weights stay file-backed, on for graphs with block-quantized weights (:func:`needs_prepacking`)."""
    so = ort.SessionOptions()
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = mem_pattern  # arena off + memory pattern: the arena's speed without its retained peak
    # Every session owns an intra-op pool whose threads spin after each op; with W..L resident sessions (and
    # the layer loader thread) on 2 cores the spinning pools steal each other's CPU: spinning off costs less CPU and time.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = {
        "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimize]
    if SHARED_THREADS:  # the process-wide pool (its size set at import) runs every session
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads or int(os.environ.get("EDGE_SEL_THREADS", "0")) or 0
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def needs_prepacking(path: Path) -> bool:
    """Whether the graph multiplies block-quantized weights (``MatMulNBits``): onnxruntime's fast CPU kernels for them
    run on prepacked weights only (unpacked, each call dequantizes the whole matrix first: ~10x slower). Their packed
    copy is small (4/8-bit), so it is worth its anonymous memory. The graph files hold no weights, so this reads little."""
    try:
        return b"MatMulNBits" in Path(path).read_bytes()
    except OSError:
        return False


def load_session(path: Path, threads: int | None = None, optimize: str = "all", mem_pattern: bool = True,
                 providers: Assignment | None = None, prepack: bool = False) -> ort.InferenceSession:
    """A session on the CPU provider, or on ``providers``' choice (its load time and node assignment recorded there).
    ``prepack``: let the kernels pack the float weights too (a session kept for the engine's life with no memory
    budget: the packed copy costs anonymous memory once and spares repacking the weights on every run)."""
    so = session_options(threads, optimize, mem_pattern, prepack=prepack or needs_prepacking(path))
    prefix = trace.op_profile_prefix()  # a profiler asked for onnxruntime's per-operator timings
    if prefix is not None:
        so.enable_profiling, so.profile_file_prefix = True, prefix
    chain: list = ["CPUExecutionProvider"]
    if providers is not None:
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        chain = providers.choice.for_session()
    t = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=chain)
    except Exception as e:  # onnxruntime raises its own exception types; name the file
        raise BundleError(f"cannot load graph {path}: {e}") from None
    if providers is not None:
        providers.record(sess, time.perf_counter() - t, str(path))
    if prefix is not None:
        trace.register_session(sess, prefix)
    return sess


class OnnxRuntimeBackend:
    """How the engines open a stage by default: an onnxruntime session per graph, on the providers' choice.

    A backend's ``open(path, threads, optimize, mem_pattern, prepack)`` returns something called like an onnxruntime session
    (``run(output_names, feeds) -> [arrays]``); :class:`edge_sel.runtime.coreml.CoreMLBackend` is the other one."""

    name = "onnxruntime"

    def __init__(self, providers: Assignment | None = None):
        self.providers = providers

    def open(self, path: Path, threads: int | None = None, optimize: str = "all", mem_pattern: bool = True,
             prepack: bool = False):
        return load_session(path, threads, optimize, mem_pattern, providers=self.providers, prepack=prepack)

    def plan_sizes(self) -> None:
        """None: the planner counts the bundle's ONNX files itself."""
        return None

    def close(self) -> None:
        pass


def backend_for(bundle, providers: Assignment):
    """The backend ``providers``' choice asks for: the bundle's CoreML packages, or onnxruntime."""
    if providers.choice.backend == "coreml":
        from .coreml import CoreMLBackend  # only on this path: nothing of Core ML is imported otherwise

        return CoreMLBackend(bundle, providers)
    return OnnxRuntimeBackend(providers)
