"""onnxruntime sessions that keep weights file-backed.

With weights as external data and ``session.disable_prepacking=1`` an
onnxruntime session's weights stay in the page cache (mmap) instead of anonymous memory, so a
layer's weights leave RSS when its session is released. The CPU arena is turned off so that a
session kept resident does not keep its largest activation allocation for life.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import onnxruntime as ort

from edge_sel.runtime import trace
from edge_sel.runtime.errors import BundleError
from edge_sel.runtime.units import env_int
from edge_sel.runtime.providers import Assignment

log = logging.getLogger("edge_sel")

# Thread pools. A decode step runs 61 sessions, each op a few microseconds to a few hundred: with a pool per session
# the sleeping worker of each session's pool wakes after the caller has done most of an op's work, so a second
# thread buys nothing. One process-wide pool whose threads spin between ops and between runs (as llama.cpp's threads
# do) keeps the worker awake from op to op; but on a machine whose cores are busy with work of our priority, spinning
# threads lose their time slices and every op waits for them. onnxruntime's Python binding sets only the global
# pool's sizes (its threads always spin; stopping the spin between runs works for per-session pools only), so the
# choice is between the two kinds of pool. EDGE_SEL_SHARED_THREADS:
#   "auto" (the default in a process that ``own_process()`` declared its own: the CLI, the benchmark workers):
#                   sessions of many small ops (``small_ops``: the generate engine's, run once per token) use the
#                   shared pool of the first such session's thread count if, when it is opened, the machine has that
#                   many cores free of work at our priority or higher (sampled over FREE_SAMPLE_S from the kernel's
#                   CPU times; tasks of a lower priority -- a higher nice value -- do not count: they yield);
#                   sessions opened before that keep their own pools, every session opened after it runs on the
#                   shared one (onnxruntime refuses per-session pools once the global pool exists);
#   "0": per-session pools that never spin (the default in any other process: a library inside someone else's
#        program must not make onnxruntime refuse that program's own sessions);   "N": the shared pool of N threads.
# Decided once per process (onnxruntime sizes its global pool once): a machine that gets busy later keeps the choice.
SHARED_THREADS_ENV = "EDGE_SEL_SHARED_THREADS"
FREE_SAMPLE_S = 0.2
_shared_pool: dict = {}  # "threads": the global pool's size once decided (0: none); set once per process
_owned = {"process": False}  # own_process() was called: EDGE_SEL_SHARED_THREADS unset means auto


def own_process() -> None:
    """Declare that this process runs edge_sel alone (the CLI, a benchmark worker), so an unset
    ``EDGE_SEL_SHARED_THREADS`` means ``auto``. Elsewhere it means ``0``: once the shared pool exists onnxruntime refuses
    every session asking for its own pool, the embedding program's and other libraries' (ORT-format conversion) included."""
    _owned["process"] = True


def free_cores(sample_s: float = FREE_SAMPLE_S) -> float:
    """Cores not busy with other processes' work at this process's priority or higher, over the next ``sample_s``."""
    import psutil

    me = psutil.Process()
    a, ma = psutil.cpu_times(), me.cpu_times()
    time.sleep(sample_s)
    b, mb = psutil.cpu_times(), me.cpu_times()

    def spent(field: str) -> float:
        return getattr(b, field, 0.0) - getattr(a, field, 0.0)

    fields = ["user", "system", "irq", "softirq", "steal"]
    if hasattr(os, "getpriority") and os.getpriority(os.PRIO_PROCESS, 0) > 0:  # niced: other niced tasks compete
        fields.append("nice")
    busy = sum(spent(f) for f in fields) - ((mb.user + mb.system) - (ma.user + ma.system))
    total = sum(spent(f) for f in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"))
    cores = psutil.cpu_count() or 1
    return cores * (1.0 - max(0.0, busy) / total) if total > 0 else float(cores)


def _requested_threads(threads: int | None) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # not on macOS
    return threads or env_int("EDGE_SEL_THREADS", 0) or cores


def shared_pool_threads(threads: int | None = None, small_ops: bool = False) -> int:
    """The size of the process-wide pool a session asking for ``threads`` runs on, or 0 for a pool of its own."""
    default = "auto" if _owned["process"] else "0"
    value = os.environ.get(SHARED_THREADS_ENV, default).strip().lower() or default
    if "threads" not in _shared_pool and (small_ops or value != "auto"):
        want = _requested_threads(threads)
        if value == "auto":
            n = want if want > 1 and free_cores() >= want - 0.25 else 0
        else:
            try:
                n = max(int(value), 0)
            except ValueError:
                log.warning("%s=%r is not auto, 0 or a thread count: per-session pools", SHARED_THREADS_ENV, value)
                n = 0
        if n:
            from onnxruntime.capi import onnxruntime_pybind11_state as binding  # the only place onnxruntime exposes it

            binding.set_global_thread_pool_sizes(n, 1)
        _shared_pool["threads"] = n
        trace.instant("threads.pool", shared=n, requested=want)
    return _shared_pool.get("threads", 0)


def session_options(threads: int | None = None, optimize: str = "all", mem_pattern: bool = True,
                    prepack: bool = False, small_ops: bool = False) -> ort.SessionOptions:
    """``mem_pattern=False`` for sessions that live for one call (a streaming window): onnxruntime plans a
    memory pattern on the first run of every input shape, and a fresh session never runs a shape twice.
    ``prepack``: let kernels repack constant weights into their own (anonymous) buffers; off by default so float
    weights stay file-backed, on for graphs with block-quantized weights (:func:`needs_prepacking`).
    ``small_ops``: the graph runs many short ops per call, so it may run on the shared spinning pool
    (:func:`shared_pool_threads`)."""
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
    if shared_pool_threads(threads, small_ops):  # the process-wide spinning pool runs this session
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads or env_int("EDGE_SEL_THREADS", 0)
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
                 providers: Assignment | None = None, prepack: bool = False, small_ops: bool = False) -> ort.InferenceSession:
    """A session on the CPU provider, or on ``providers``' choice (its load time and node assignment recorded there).
    ``prepack``: let the kernels pack the float weights too (a session kept for the engine's life with no memory
    budget: the packed copy costs anonymous memory once and spares repacking the weights on every run)."""
    so = session_options(threads, optimize, mem_pattern, prepack=prepack or needs_prepacking(path), small_ops=small_ops)
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

    def __init__(self, providers: Assignment | None = None, small_ops: bool = False):
        self.providers = providers
        self.small_ops = small_ops  # the graphs run once per decoded token: see shared_pool_threads

    def open(self, path: Path, threads: int | None = None, optimize: str = "all", mem_pattern: bool = True,
             prepack: bool = False):
        return load_session(path, threads, optimize, mem_pattern, providers=self.providers, prepack=prepack,
                            small_ops=self.small_ops)

    def plan_sizes(self) -> None:
        """None: the planner counts the bundle's ONNX files itself."""
        return None

    def close(self) -> None:
        pass


def backend_for(bundle, providers: Assignment, small_ops: bool = False):
    """The backend ``providers``' choice asks for: the bundle's CoreML packages, or onnxruntime (``small_ops``: the
    generate engine's graphs, see :func:`shared_pool_threads`)."""
    if providers.choice.backend == "coreml":
        from .coreml import CoreMLBackend  # only on this path: nothing of Core ML is imported otherwise

        return CoreMLBackend(bundle, providers)
    return OnnxRuntimeBackend(providers, small_ops)
