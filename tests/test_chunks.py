"""How candidates sorted by length are cut into chunks (the engine's packing and the planner's count of it)."""

import numpy as np
import pytest

from edge_sel.runtime.planning.rerank import ChunkCount, chunk_runs
from edge_sel.runtime.rerank.chunks import Packing, make_chunks


def reference_runs(lengths, chunk_tokens, max_batch, split_tokens):
    """The rule row by row: the next row joins the open chunk unless the chunk would exceed its limits or that row
    would pad the rows already in it by more than ``split_tokens`` tokens."""
    runs, start = [], 0
    for pos in range(1, len(lengths)):
        rows = pos - start
        if ((rows + 1) * lengths[pos] > chunk_tokens or rows + 1 > max_batch
                or rows * (lengths[pos] - lengths[pos - 1]) > split_tokens):
            runs.append((start, pos))
            start = pos
    if len(lengths):
        runs.append((start, len(lengths)))
    return runs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("split", [0, 8, 10**9])
def test_chunk_runs_follow_the_row_by_row_rule(seed, split):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    hi = [20, 130, 600, 3000][seed % 4]  # short rows, passages, long rows, rows longer than a chunk
    lengths = np.sort(rng.integers(1, hi, n))
    for chunk_tokens, max_batch in ((1024, 64), (256, 8), (4096, 64)):
        got = chunk_runs(lengths, chunk_tokens, max_batch, split)
        assert got == reference_runs(lengths, chunk_tokens, max_batch, split)
        assert ChunkCount(lengths, max_batch)(chunk_tokens) == len(chunk_runs(lengths, chunk_tokens, max_batch))
        for a, b in got:  # every row once, limits kept (a row longer than a chunk goes alone)
            assert b > a and (b - a <= max_batch) and ((b - a) * lengths[b - 1] <= chunk_tokens or b - a == 1)
        assert [a for a, _ in got[1:]] == [b for _, b in got[:-1]] and got[0][0] == 0 and got[-1][1] == n


def test_padding_splits_chunks_of_mixed_lengths():
    lengths = np.array([16] * 20 + [48] * 20)
    # without the padding rule the 48-token rows would pad the first 20 rows by 640 tokens
    assert chunk_runs(lengths, 1024, 64, 10**9)[0] == (0, 21)
    assert chunk_runs(lengths, 1024, 64, 8) == [(0, 20), (20, 40)]
    chunks = make_chunks(lengths[::-1].copy(), Packing(0, 5, 1024, 64))
    assert [(len(c.items), c.width, c.pos_offset) for c in chunks] == [(20, 16, 5), (20, 48, 5)]
    assert sorted(np.concatenate([c.items for c in chunks]).tolist()) == list(range(40))
