"""Drop file-backed weight pages from the process after use (Linux ``madvise(MADV_DONTNEED)``).

onnxruntime memory-maps a graph's external weights (``session.disable_prepacking=1``, see
:mod:`edge_sel.runtime.sessions`), so every weight page a session has touched counts in the process's
RSS until the session is released. A generator keeps its ~60 sessions for life, and a layer-major
prefill touches each layer's weights once per prompt: dropping a layer's pages right after its
prefill pass keeps the prefill's activations and the model's weights from peaking together. The
pages stay in the kernel's page cache, so the next use re-maps them without disk I/O (page faults only).

Only read-only private mappings of the named files that hold no anonymous (copied-on-write) pages
are ever released, so no modified data can be lost. Elsewhere than Linux this is a no-op (:func:`mechanism` is
None): macOS has no ``/proc`` to find onnxruntime's mappings, its ``MADV_DONTNEED`` only lowers the pages' priority
(they stay mapped), and its ``MADV_FREE_REUSABLE`` is for anonymous memory — the malloc heap, which
:func:`edge_sel.runtime.memory.trim_heap` releases there — not for file-backed weights.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import sys
from pathlib import Path

import numpy as np

MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux >= 5.14: map (read-fault) a range in one call
_PAGE = mmap.PAGESIZE
_MADVISE: list = []
_RELEASED = [0]  # bytes advised away by this process (read by edge_sel.runtime.memory.ReleaseLog)


def released_bytes() -> int:
    return _RELEASED[0]


def page_release_for(platform: str, has_proc_maps: bool) -> str | None:
    """The weight-page release a platform offers (``sys.platform``, whether ``/proc/self/maps`` exists): Linux's
    ``madvise(MADV_DONTNEED)`` on mappings found in ``/proc/self/smaps``, or None (nothing is called)."""
    return "madvise(MADV_DONTNEED)" if platform.startswith("linux") and has_proc_maps else None


def mechanism() -> str | None:
    """This process's weight-page release (:func:`page_release_for` of this platform)."""
    return page_release_for(sys.platform, os.path.exists("/proc/self/maps"))


def _madvise():
    if not _MADVISE:
        fn = None
        if mechanism() is not None:
            try:
                lib = ctypes.CDLL(None, use_errno=True)
                fn = lib.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _MADVISE.append(fn)
    return _MADVISE[0]


def supported() -> bool:
    return _madvise() is not None


def release_range(address: int, nbytes: int) -> int:
    """Drop the pages of ``[address, address + nbytes)`` (widened to whole pages) from this process.

    Only for file-backed, unmodified memory (a read-only ``np.memmap``); returns the bytes advised."""
    fn = _madvise()
    if fn is None or nbytes <= 0:
        return 0
    a = address // _PAGE * _PAGE
    b = -(-(address + nbytes) // _PAGE) * _PAGE
    if fn(a, b - a, MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), f"madvise(MADV_DONTNEED) failed on {b - a} bytes")
    _RELEASED[0] += b - a
    return b - a


def release_array(arr: np.ndarray) -> int:
    """Drop a read-only memory-mapped array's pages from the process (they stay in the page cache).

    Whole-array, not per gathered row: the kernel maps page-cache folios (up to hundreds of KB) around
    each fault, so a row's footprint is not predictable, and one call over a sparsely mapped table is cheap."""
    if getattr(arr, "_mmap", None) is None and not isinstance(getattr(arr, "base", None), mmap.mmap):
        return 0
    return release_range(arr.ctypes.data, arr.nbytes)


_MAP_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


def snapshot() -> dict[tuple[int, int], str]:
    """This process's file mappings now: ``{(start, length): path}`` (empty where /proc is missing)."""
    out: dict[tuple[int, int], str] = {}
    if not supported():
        return out
    with open("/proc/self/maps") as f:
        for line in f:
            m = _MAP_LINE.match(line)
            if m and m[4].startswith("/"):
                a, b = int(m[1], 16), int(m[2], 16)
                out[(a, b - a)] = m[4].strip()
    return out


class WeightPages:
    """The address ranges onnxruntime mapped for a set of weight files, releasable per file.

    Create it right *after* the sessions that own the mappings, passing ``before`` = :func:`snapshot` taken
    right before them: only mappings that appeared in between are this owner's (another object's sessions
    may map the same files, and are freed independently). Every release re-checks against the live maps
    that each range still maps its file, so a range unmapped (and reused) meanwhile is never touched.
    Ranges holding copied-on-write pages are skipped (a modified page must never be dropped).
    """

    def __init__(self, paths, before: dict | None = None):
        names = {str(Path(p).resolve()) for p in paths}
        self.ranges: dict[str, list[tuple[int, int]]] = {k: [] for k in names}
        if not supported():
            return
        before = before or {}
        cur = None
        with open("/proc/self/smaps") as f:
            for line in f:
                m = _MAP_LINE.match(line)
                if m:
                    a, b, perms, name = int(m[1], 16), int(m[2], 16), m[3], m[4].strip()
                    cur = None
                    if perms[0] == "r" and perms[3] == "p" and name in names and before.get((a, b - a)) != name:
                        cur = [name, a, b - a, 0]
                        self.ranges[name].append(cur)  # type: ignore[arg-type]
                elif cur is not None and line.startswith("Anonymous:"):
                    cur[3] = int(line.split()[1])
        self.ranges = {k: [(a, n) for _, a, n, anon in v if anon == 0] for k, v in self.ranges.items()}

    @property
    def releasable(self) -> bool:
        return any(self.ranges.values())

    def mapped_bytes(self, path) -> int:
        return sum(n for _, n in self.ranges.get(str(Path(path).resolve()), []))

    def _live(self, paths) -> list[tuple[int, int]]:
        live = snapshot()
        out = []
        for p in paths:
            name = str(Path(p).resolve())
            out += [(a, n) for a, n in self.ranges.get(name, []) if live.get((a, n)) == name]
        return out

    def populate(self, *paths) -> bool:
        """Map the files' pages back in now (``MADV_POPULATE_READ``), so the first use does not pay the faults;
        False where the kernel does not support it (the first use then maps them)."""
        fn = _madvise()
        if fn is None:
            return False
        return all(fn(a, n, MADV_POPULATE_READ) == 0 for a, n in self._live(paths))

    def release(self, *paths) -> int:
        """Drop the files' pages from this process; returns the bytes advised."""
        done = 0
        for a, n in self._live(paths):
            try:
                done += release_range(a, n)
            except OSError:  # a memory saving, never a reason to fail the caller's computation
                pass
        return done


__all__ = ["WeightPages", "snapshot", "release_range", "release_array", "supported", "mechanism", "page_release_for"]
