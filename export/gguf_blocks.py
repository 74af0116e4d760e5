"""A GGUF file's own quantized blocks, repacked without dequantizing: the embedding table of an int8/int4 bundle.

GGUF's Q8_0 (``x = d * q``, q int8), Q4_0 (``x = d * (q - 8)``) and Q4_1 (``x = d * q + m``) blocks of 32 values
with float16 ``d`` / ``m`` are exactly the block encodings of :mod:`edge_sel.runtime.blocks`; only the order of the
4-bit values differs (GGUF puts value ``j`` in the low and value ``j + 16`` in the high nibble of byte ``j``; the
bundle puts even columns in the low nibble), which is a lossless shuffle. So the bundle's table decodes to exactly
the values llama.cpp computes from the file. Other block types (K-quants, IQ, ...) have no such layout: their table
is converted from the dequantized weights like any float table (``source: requantized``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_sel.runtime.blocks import pack4

KEPT = ("Q8_0", "Q4_0", "Q4_1")   # GGUF block types kept as they are
BLOCK = 32


def repack(raw: np.ndarray, kind: str, rows: int, cols: int):
    """GGUF tensor bytes ``[rows, bytes per row]`` of type ``kind`` -> ``(values, scales, mins, bits)`` in the bundle's
    block layout."""
    nb = cols // BLOCK
    b = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, nb, -1)
    d = b[..., 0:2].copy().view(np.float16).reshape(rows, nb)
    if kind == "Q8_0":
        return b[..., 2:].copy().view(np.int8).reshape(rows, cols), d, None, 8
    head = 4 if kind == "Q4_1" else 2
    qs = b[..., head:head + 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)          # values 0..31 of each block, in order
    mins = b[..., 2:4].copy().view(np.float16).reshape(rows, nb) if kind == "Q4_1" else None
    return pack4(q.reshape(rows, cols)), d, mins, 4


def table_blocks(gguf_path: str | Path, name: str = "token_embd.weight"):
    """The token embedding's blocks from ``gguf_path`` as ``(values, scales, mins, bits, block, source)``, or None
    when its type is not one that maps (see :data:`KEPT`)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    for t in reader.tensors:
        if t.name == name:
            kind = t.tensor_type.name
            if kind not in KEPT:
                return None
            cols, rows = (int(x) for x in t.shape[:2])  # GGUF lists the fastest-varying dimension first
            values, scales, mins, bits = repack(np.asarray(t.data), kind, rows, cols)
            return values, scales, mins, bits, BLOCK, f"gguf:{kind}"
    return None
