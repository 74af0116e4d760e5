"""Block-quantized 2-D arrays: the embedding table stored at 8 or 4 bits, decoded one gathered row at a time.

A row is cut into blocks of ``block_size`` columns; each block has a scale and, optionally, a min
(``x = q * scale + min``, else ``x = q * scale`` at 8 bits / ``x = (q - 8) * scale`` at 4 bits, the layout of
GGUF's Q8_0, Q4_1 and Q4_0 blocks, so those keep their exact values; 8-bit values stored as uint8 are
``x = (q - 128) * scale``, ``MatMulNBits``' layout, so an LM head tied to the table can read the same file). 4-bit values are packed two per byte,
the even column in the low nibble. ``docs/BUNDLE.md`` (raw arrays, encoding) specifies the layout.

:class:`BlockTable` maps the three files and dequantizes only the rows a call gathers, so a call touches
``len(ids) * (stored row bytes)`` of the table instead of the float32 row size. :func:`encode` is the
writer's side (round to nearest, scales and mins rounded to the stored dtype first so that decoding
reproduces exactly what the encoder measured its error against).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unpack4(packed: np.ndarray) -> np.ndarray:
    """``[..., n/2]`` bytes -> ``[..., n]`` values 0..15 (even column in the low nibble)."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack4(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def decode(q: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, bits: int, block_size: int) -> np.ndarray:
    """Stored rows ``q`` (with their ``scales`` / ``mins`` rows) -> float32 ``[rows, cols]``."""
    vals = unpack4(q) if bits == 4 else q
    rows, cols = vals.shape[0], vals.shape[1]
    v = vals.reshape(rows, cols // block_size, block_size).astype(np.float32)
    if mins is None and (bits == 4 or vals.dtype == np.uint8):
        v -= 8.0 if bits == 4 else 128.0  # zero point: 4-bit codes, or 8-bit codes stored unsigned
    v *= scales.astype(np.float32)[:, :, None]
    if mins is not None:
        v += mins.astype(np.float32)[:, :, None]
    return v.reshape(rows, cols)


def encode(x: np.ndarray, bits: int, block_size: int, scale_dtype: str = "float16"):
    """float ``[rows, cols]`` -> ``(values, scales, mins)``: 8 bits symmetric (int8 values, no mins), 4 bits
    asymmetric (packed uint8 values, mins)."""
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape
    b = x.reshape(rows, cols // block_size, block_size)
    if bits == 8:
        scale = (np.abs(b).max(-1) / 127.0).astype(scale_dtype)
        s = scale.astype(np.float32)
        q = np.rint(b / np.where(s == 0, 1, s)[..., None])
        return np.clip(q, -127, 127).astype(np.int8).reshape(rows, cols), scale, None
    lo = b.min(-1).astype(scale_dtype)
    scale = ((b.max(-1) - lo.astype(np.float32)) / 15.0).astype(scale_dtype)
    s, m = scale.astype(np.float32), lo.astype(np.float32)
    q = np.clip(np.rint((b - m[..., None]) / np.where(s == 0, 1, s)[..., None]), 0, 15)
    return pack4(q.reshape(rows, cols)), scale, lo


@dataclass
class BlockTable:
    """A mapped block-quantized table that gathers like an array: ``table[ids]`` -> float32 ``ids.shape + (cols,)``."""

    values: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None
    bits: int
    block_size: int
    shape: tuple[int, int]

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        flat = ids.reshape(-1)
        rows = decode(self.values[flat], self.scales[flat], None if self.mins is None else self.mins[flat],
                      self.bits, self.block_size)
        return rows.reshape(ids.shape + (self.shape[1],))

    def mapped(self) -> list[np.ndarray]:
        """The memory-mapped arrays behind the table (to drop their pages after a gather)."""
        return [a for a in (self.values, self.scales, self.mins) if a is not None]

    @property
    def row_bytes(self) -> int:
        return sum(a.strides[0] for a in self.mapped())
