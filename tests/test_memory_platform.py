"""Memory mechanics per platform: the peak-RSS unit of ``ru_maxrss``, the heap release (glibc ``malloc_trim``, macOS
``malloc_zone_pressure_relief``) and the weight-page release, chosen from injected platform facts; on this machine
the real calls run and ``last_stats`` says which did."""

import ctypes
import resource
import sys

import numpy as np
import pytest

from edge_sel.runtime import memory, residency
from edge_sel.runtime.memory import HeapRelease, ReleaseLog, heap_release_for, maxrss_bytes
from edge_sel.runtime.residency import page_release_for

LINUX_GLIBC = sys.platform.startswith("linux") and memory._glibc()


def test_ru_maxrss_is_bytes_on_macos_and_kib_elsewhere():
    assert maxrss_bytes(5_000_000, "darwin") == 5_000_000
    assert maxrss_bytes(5_000, "linux") == 5_000 * 1024
    assert maxrss_bytes(5_000, "freebsd14") == 5_000 * 1024


def test_ru_maxrss_converted_on_this_machine_is_a_plausible_peak():
    """Wrong units are off by 1024x: the converted peak must lie between the current RSS and a few times it."""
    peak = maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    rss = memory.rss_bytes()
    assert rss * 0.9 <= peak < rss * 50


class FakeLibSystem:
    """Stands in for macOS's libSystem (cannot be loaded here): records the calls the release makes."""

    def __init__(self):
        self.calls = []
        lib = self

        def malloc_zone_pressure_relief(zone, goal):
            lib.calls.append((zone, goal))
            return 4096

        self.malloc_zone_pressure_relief = malloc_zone_pressure_relief


def test_macos_heap_release_is_malloc_zone_pressure_relief_on_every_zone():
    loaded, fake = [], FakeLibSystem()

    def load(path):
        loaded.append(path)
        return fake

    release = heap_release_for("darwin", glibc=False, load=load)
    assert isinstance(release, HeapRelease) and release.name == "malloc_zone_pressure_relief"
    assert loaded == [memory.DARWIN_LIBSYSTEM]
    fn = fake.malloc_zone_pressure_relief
    assert fn.argtypes == [ctypes.c_void_p, ctypes.c_size_t] and fn.restype is ctypes.c_size_t
    release()
    assert fake.calls == [(None, 0)]  # NULL zone: all zones; goal 0: as much as possible


def test_no_heap_release_where_the_platform_has_none():
    def unloadable(path):
        raise OSError(f"cannot load {path}")

    assert heap_release_for("darwin", glibc=False, load=unloadable) is None
    assert heap_release_for("linux", glibc=False) is None  # musl: no malloc_trim, nothing called
    assert heap_release_for("win32", glibc=False) is None
    assert heap_release_for("freebsd14", glibc=False) is None


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc's malloc_trim is only on Linux with glibc")
def test_glibc_heap_release_runs_here():
    release = heap_release_for(sys.platform, glibc=True)
    assert release.name == "malloc_trim"
    release()  # a real call: returns without error
    assert memory.mechanisms()["heap_release"] == "malloc_trim"


def test_weight_page_release_only_with_linux_madvise():
    assert page_release_for("linux", True) == "madvise(MADV_DONTNEED)"
    assert page_release_for("linux", False) is None       # no /proc: mappings cannot be found
    assert page_release_for("darwin", False) is None      # macOS: nothing is called on file-backed weights
    assert page_release_for("win32", False) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="weight pages are released with Linux madvise only")
def test_release_log_reports_the_mechanisms_that_ran(tmp_path):
    log = ReleaseLog()
    assert log.report()["weight_pages"] is None and log.report()["heap_release_calls"] == 0
    path = tmp_path / "table.bin"
    np.arange(1 << 18, dtype=np.float32).tofile(path)
    table = np.memmap(path, dtype=np.float32, mode="r")
    float(table.sum())  # map the pages
    assert residency.release_array(table) >= table.nbytes
    memory.trim_heap()
    rep = log.report()
    assert rep["weight_pages"] == "madvise(MADV_DONTNEED)" and rep["weight_page_bytes_released"] >= table.nbytes
    assert rep["heap_release_calls"] == 1 and rep["heap_release"] == memory.mechanisms()["heap_release"]


@pytest.mark.skipif(not LINUX_GLIBC, reason="the budgeted reranker's heap release is glibc's here")
def test_budgeted_rerank_reports_its_heap_release(bert_ce_bundle, docs):
    from edge_sel.runtime import Reranker

    d = docs[0][:6]
    rr = Reranker(bert_ce_bundle, memory_budget=Reranker(bert_ce_bundle).minimum_budget("q", d) * 4)
    rr.rank("q", d, top_k=3)
    rel = rr.last_stats["memory_release"]
    assert rel["allocator_tuning"] == "mallopt"
    assert rel["heap_release"] == "malloc_trim" and rel["heap_release_calls"] >= 1
    rr.close()
