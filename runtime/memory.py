"""Process memory: current RSS, a resettable peak (Linux VmHWM) with a sampling fallback, and the allocator's
free-memory release per platform (glibc ``mallopt`` / ``malloc_trim``; macOS ``malloc_zone_pressure_relief``).

Every platform-specific call is guarded: on a platform without the mechanism it is not made, and
:func:`mechanisms` says which ones this process uses (the engines report it in ``last_stats``).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import psutil

from .errors import InputError
from .units import env_int

_PROC = psutil.Process()
DARWIN_LIBSYSTEM = "/usr/lib/libSystem.B.dylib"


def maxrss_bytes(ru_maxrss: int, platform: str | None = None) -> int:
    """``getrusage().ru_maxrss`` in bytes: macOS reports bytes, Linux and the BSDs KiB."""
    platform = sys.platform if platform is None else platform
    return int(ru_maxrss) if platform == "darwin" else int(ru_maxrss) * 1024


def rss_bytes() -> int:
    return _PROC.memory_info().rss


def _read_status(field: str) -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak RSS of this process since start or the last :func:`reset_peak`."""
    hwm = _read_status("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: write 5 to clear_refs). False when unsupported."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakTracker:
    """Measure the peak RSS over a block: kernel high-water mark when resettable, else a 5 ms sampler.

    >>> with PeakTracker() as t: work()
    >>> t.peak, t.start
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = False

    def __enter__(self) -> "PeakTracker":
        self.start = rss_bytes()
        self._kernel = reset_peak()
        self.peak = self.start
        if not self._kernel:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self._kernel:
            self.peak = max(self.peak, peak_rss_bytes())
        else:
            self._stop.set()
            if self._thread:
                self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---- allocator tuning (glibc) -------------------------------------------------------------------
# A *fixed* mmap threshold stops glibc's dynamic growth (which kept tens of MB of freed activations as heap
# between calls); malloc_trim after each call returns what is free. Measured (SmolLM2 yes/no, 128MB budget,
# 1 query, CPU s / minor faults / peak RSS MiB): N=64 — 256 KiB: 46.5 / 3.16M / 155; 64 MiB: 34.0 / 0.43M / 188;
# N=128 — 256 KiB: 88.6 / 2.14M / 185; 64 MiB: 66.0 / 0.23M / 185; untuned: 66.5 / 10k / 209; all resident:
# 63.1. A small threshold maps (and page-faults) every activation afresh on every layer run: ~25% CPU.
# 64 MiB keeps activations on the recycled heap; the model share stays inside the budget (0.7x at N=64).
# Override with EDGE_SEL_MMAP_THRESHOLD (bytes).
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 10  # free heap above this at the top is returned at once
_tuned: bool | None = None
_LIBC: list = []
_RELEASE: list = []
_COUNTS = [0]  # heap releases made by this process (read by ReleaseLog)


def _glibc() -> bool:
    try:
        return "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")
    except (AttributeError, ValueError, OSError):
        return False


def _libc():
    """glibc via ctypes (cached), or None on other C libraries / platforms."""
    if not _LIBC:
        import ctypes

        lib = None
        try:
            if _glibc():
                lib = ctypes.CDLL("libc.so.6")
        except OSError:
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]


class HeapRelease:
    """Return the allocator's free pages to the OS now. ``name`` says which call does it.

    glibc: ``malloc_trim(0)`` (every arena, also free chunks in the middle of the heap). macOS:
    ``malloc_zone_pressure_relief(NULL, 0)`` — every malloc zone gives back as much free memory as it can (its free
    pages are marked reusable, ``madvise(MADV_FREE_REUSABLE)``, and leave the process's footprint)."""

    def __init__(self, name: str, call):
        self.name = name
        self._call = call

    def __call__(self) -> None:
        self._call()


def heap_release_for(platform: str, glibc: bool, load=None) -> HeapRelease | None:
    """The heap-release mechanism of a platform (``sys.platform``, whether the C library is glibc); None where
    there is none. ``load`` opens a shared library (``ctypes.CDLL``; injected by tests)."""
    import ctypes

    load = load or ctypes.CDLL
    try:
        if platform.startswith("linux") and glibc:
            lib = load("libc.so.6")
            return HeapRelease("malloc_trim", lambda: lib.malloc_trim(0))
        if platform == "darwin":
            lib = load(DARWIN_LIBSYSTEM)
            fn = lib.malloc_zone_pressure_relief
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_size_t
            return HeapRelease("malloc_zone_pressure_relief", lambda: fn(None, 0))
    except (OSError, AttributeError):  # a C library without the call: nothing to do
        return None
    return None


def _heap_release() -> HeapRelease | None:
    if not _RELEASE:
        _RELEASE.append(heap_release_for(sys.platform, _glibc()))
    return _RELEASE[0]


class ReleaseLog:
    """Which memory mechanisms ran between its creation and :meth:`report` (one engine call), for ``last_stats``."""

    def __init__(self):
        from .residency import released_bytes

        self.heap0, self.pages0 = _COUNTS[0], released_bytes()

    def report(self) -> dict:
        from .residency import released_bytes

        m = mechanisms()
        heap, pages = _COUNTS[0] - self.heap0, released_bytes() - self.pages0
        return {"allocator_tuning": m["allocator_tuning"], "heap_release": m["heap_release"] if heap else None,
                "heap_release_calls": heap, "weight_pages": m["weight_pages"] if pages else None,
                "weight_page_bytes_released": pages, "available": m}


def mechanisms() -> dict[str, str | None]:
    """What this process uses to keep memory down (None: nothing on this platform): allocator tuning, heap
    release, and the release of file-backed weight pages (:mod:`edge_sel.runtime.residency`)."""
    from .residency import mechanism as page_mechanism

    release = _heap_release()
    return {"allocator_tuning": "mallopt" if _tuned else None, "heap_release": release.name if release else None,
            "weight_pages": page_mechanism()}


def tune_allocator() -> bool:
    """Make freed activation buffers leave the process (glibc only; once per process).

    glibc serves a large block from its heap once a block of that size has been freed (the mmap
    threshold grows dynamically up to 32 MB), and heap memory is rarely returned to the kernel: layer
    after layer of numpy/onnxruntime activations then leaves tens of MB of free-but-resident heap,
    which counts against a memory budget and piles up across calls. Fixing the threshold at
    :data:`MMAP_THRESHOLD` (and trimming after each call: :func:`release_free_memory`) bounds what stays resident. Process-wide;
    set ``EDGE_SEL_TUNE_MALLOC=0`` to leave the allocator alone.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("EDGE_SEL_TUNE_MALLOC", "1") == "0":
        return False
    libc = _libc()
    if libc is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    threshold = env_int("EDGE_SEL_MMAP_THRESHOLD", MMAP_THRESHOLD)
    trim = env_int("EDGE_SEL_TRIM_THRESHOLD", TRIM_THRESHOLD)
    _tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))
    return _tuned


def trim_heap() -> None:
    """Return the allocator's free pages to the kernel now (:class:`HeapRelease`: glibc ``malloc_trim(0)``, macOS
    ``malloc_zone_pressure_relief``); a no-op elsewhere. Unlike :func:`release_free_memory` it does not need
    :func:`tune_allocator`: the generator calls it between prefill layers, whose attention temporaries are
    freed but, fragmented among longer-lived blocks, would otherwise stay resident."""
    release = _heap_release()
    if release is not None:
        release()
        _COUNTS[0] += 1


def release_free_memory() -> None:
    """:func:`trim_heap` after a budgeted call: once :func:`tune_allocator` has tuned glibc, or on macOS (whose
    allocator has no tuning; its zones keep freed pages until asked); a no-op otherwise."""
    if _tuned or sys.platform == "darwin":
        trim_heap()


class HeapGuard:
    """Keep a budgeted call's RSS growth near what it really holds, in a fragmented heap (glibc; on macOS the same
    guard releases through ``malloc_zone_pressure_relief``, see :class:`HeapRelease`).

    glibc serves each request from the best-fitting free hole. In a long-lived process whose heap is full of holes
    (returned to the kernel by :func:`trim_heap` after earlier calls), chunk after chunk lands in a different hole and
    faults in fresh pages, while the chunk before it is freed but stays resident: RSS climbs although the live
    memory stays flat. Measured on the tiny Llama test bundle (budget 31-34 MiB, 3 layers, 9 MiB live growth): the
    call grows RSS by 18-20 MiB alone, by 40-52 MiB after the heap is fragmented (3,000+ freed holes); a trim after
    every chunk brings that to 12 MiB, this guard to 28-31 MiB. :meth:`check`, called between chunks, trims only once
    growth passes ``fraction`` of the budget (one ``/proc`` read, ~20 us; a trim costs ~2 us in a fresh process,
    ~2 ms in that fragmented one). benchmarks/RESULTS.md "memory".
    """

    def __init__(self, budget: int | None, fraction: float | None = None):
        if fraction is None:  # EDGE_SEL_HEAP_GUARD: the fraction (default 0.75); 0 turns the guard off
            raw = os.environ.get("EDGE_SEL_HEAP_GUARD", "0.75")
            try:
                fraction = float(raw)
            except ValueError:
                raise InputError(f"EDGE_SEL_HEAP_GUARD must be a fraction of the budget (0 = off), got {raw!r}") from None
        on = budget is not None and fraction > 0 and _heap_release() is not None
        self.limit = rss_bytes() + int(fraction * budget) if on else None
        self.trims = 0

    def check(self) -> None:
        if self.limit is not None and rss_bytes() > self.limit:
            trim_heap()
            self.trims += 1
