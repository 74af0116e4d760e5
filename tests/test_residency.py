"""Weight pages leave the process after use and come back unchanged (runtime/residency.py), on a real
exported generate bundle's onnxruntime sessions and on a memory-mapped table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edge_sel.runtime import residency
from edge_sel.runtime.generate import TRIM_AFTER_TOKENS, Generator

pytestmark = pytest.mark.skipif(not residency.supported(), reason="needs Linux /proc and madvise")


@pytest.fixture(autouse=True)
def _no_stale_sessions():
    """Earlier tests' generators may survive in garbage cycles (a refused call's traceback holds its frames)
    with sessions mapping the same weight files; collect them so only this test's mappings count."""
    import gc

    gc.collect()


def _file_rss(path) -> int:
    """Bytes of ``path`` resident in this process (sum of Rss over its mappings in /proc/self/smaps)."""
    name, total, cur = str(Path(path).resolve()), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                cur = len(head) > 5 and head[5] == name
            elif cur and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


def test_released_weights_leave_rss_and_the_session_still_computes_the_same(gen_llama_bundle):
    g = Generator(gen_llama_bundle)
    ref = g.generate("Open a file and return a stream.", max_new_tokens=6)
    path = g.model.layer_weights[0][1]
    assert g.model.pages.mapped_bytes(path) > 0, "onnxruntime did not memory-map the layer's external weights"
    assert _file_rss(path) > 0
    g.model.pages.release(path)
    assert _file_rss(path) == 0
    again = g.generate("Open a file and return a stream.", max_new_tokens=6)
    assert again.tokens == ref.tokens
    assert _file_rss(path) > 0  # the run mapped them back from the page cache


def test_long_prompt_prefill_releases_each_layer_and_matches_a_resident_run(gen_llama_bundle):
    ids = [int(x) for x in np.random.default_rng(0).integers(5, 500, TRIM_AFTER_TOKENS + 64)]
    streaming = Generator(gen_llama_bundle)
    resident = Generator(gen_llama_bundle)
    resident.model.pages.ranges = {}  # nothing releasable: the old all-resident behaviour
    assert streaming.model.releases_weights(len(ids)) and not resident.model.releases_weights(len(ids))

    seen = []  # file-backed bytes of every layer when each layer's pass starts
    orig = streaming.model.pages.release

    def spy(*paths):
        n = orig(*paths)
        if streaming.model.layer_weights[-1][1] in paths:
            seen.append(sum(_file_rss(p) for pair in streaming.model.layer_weights[:-1] for p in pair))
        return n

    streaming.model.pages.release = spy
    a = streaming.generate(ids, max_new_tokens=8)
    b = resident.generate(ids, max_new_tokens=8)
    assert a.tokens == b.tokens
    assert seen and seen[-1] == 0, "earlier layers' weights were still resident when the last layer finished prefill"
    # decoding mapped every layer back (populated at the end of prefill)
    assert all(_file_rss(p) > 0 for pair in streaming.model.layer_weights for p in pair)


def test_a_second_generator_on_the_same_files_owns_only_its_own_mappings(gen_llama_bundle):
    """Two generators map the same weight files; releasing through one never touches the other's ranges,
    and after the first is freed the second still releases (and computes) correctly."""
    import gc

    first = Generator(gen_llama_bundle)
    second = Generator(gen_llama_bundle)
    path = first.model.layer_weights[0][1]
    mine, theirs = set(first.model.pages.ranges[str(Path(path).resolve())]), set(second.model.pages.ranges[str(Path(path).resolve())])
    assert mine and theirs and not mine & theirs
    ref = first.generate("Sort a list in place.", max_new_tokens=4).tokens
    del first
    gc.collect()
    second.model.release_weights()
    assert second.generate("Sort a list in place.", max_new_tokens=4).tokens == ref


def test_release_array_drops_the_gathered_pages_of_a_memmap(tmp_path):
    rows, width = 4096, 576
    data = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
    f = tmp_path / "table.bin"
    data.tofile(f)
    table = np.memmap(f, dtype=np.float32, mode="r", shape=(rows, width))
    ids = np.array([3, 1500, 4000])
    got = np.asarray(table[ids])
    assert _file_rss(f) > 0
    assert residency.release_array(table) > 0
    assert _file_rss(f) == 0
    np.testing.assert_array_equal(np.asarray(table[ids]), data[ids])  # re-read from the page cache, same values
    np.testing.assert_array_equal(got, data[ids])
    assert residency.release_array(np.zeros(4)) == 0  # not a mapping: nothing to advise
    del table
    os.remove(f)
