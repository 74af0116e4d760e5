"""How a bundle stores its values: raw arrays, the block-quantized embedding table, weight formats, quantization."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .node import Node, Reader as _Reader, json_field as _json


# raw arrays are little-endian; object, string and structured dtypes are never accepted (bytes are not pointers)
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")   # how a bundle stores its weights (``weights.format``)
TABLE_BITS = (4, 8)                                   # an encoded raw array's value width
SCALE_DTYPES = ("float16", "float32")                 # an encoded raw array's scales and mins


@dataclass(frozen=True, kw_only=True)
class RawArray(Node):
    """A raw little-endian C-order array file (memory-mapped by the runtime)."""

    file: str = _json("path")
    dtype: str = _json("str", choices=DTYPES)
    shape: tuple[int, ...] = _json("list", of="int", lo=0, nonempty=True)

    @property
    def nbytes(self) -> int:
        import numpy as np

        return int(math.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, kw_only=True)
class TableEncoding(Node):
    """A 2-D array stored as block-quantized values (the embedding table at 8 or 4 bits). Row ``r``'s columns
    ``[j*block_size, (j+1)*block_size)`` share ``scales[r, j]`` and, when present, ``mins[r, j]``:
    ``x = q * scale + min``; without mins ``x = q * scale`` (8 bits, ``q`` int8), ``x = (q - 128) * scale`` (8 bits
    stored as uint8) or ``x = (q - 8) * scale`` (4 bits, ``q`` in 0..15). 4-bit values are packed two per byte, the
    even column in the low nibble."""

    bits: int = _json("int", lo=1)
    block_size: int = _json("int", lo=1)
    shape: tuple[int, ...] = _json("list", of="int", lo=1, nonempty=True)   # the decoded array's shape [rows, cols]
    scales: RawArray = _json(RawArray)
    mins: RawArray | None = _json(RawArray, None)
    source: str | None = _json("str", None)   # where the blocks came from: "requantized", "gguf:Q8_0", ...

    def check(self, r: "_Reader", p: str, stored: RawArray) -> None:
        if self.bits not in TABLE_BITS:
            r.fail(f"{p}.bits", f"{self.bits} is not one of {', '.join(map(str, TABLE_BITS))}")
        if len(self.shape) != 2:
            r.fail(f"{p}.shape", f"expected [rows, cols], got {list(self.shape)}")
        rows, cols = self.shape
        if cols % self.block_size or (self.bits == 4 and self.block_size % 2):
            r.fail(f"{p}.block_size", f"{self.block_size} does not divide the {cols} columns into whole (even, at 4 bits) blocks")
        want = ("int8", [rows, cols]) if self.bits == 8 else ("uint8", [rows, cols // 2])
        if self.bits == 8 and (stored.dtype, list(stored.shape)) == ("uint8", [rows, cols]):
            want = ("uint8", [rows, cols])  # 8-bit codes with zero point 128 (MatMulNBits' layout)
        if (stored.dtype, list(stored.shape)) != want:
            r.fail(f"{p}", f"{self.bits}-bit values need a {want[0]} array of shape {want[1]}, got {stored.dtype} {list(stored.shape)}")
        for name, a in (("scales", self.scales), ("mins", self.mins)):
            if a is None:
                continue
            if a.dtype not in SCALE_DTYPES or list(a.shape) != [rows, cols // self.block_size]:
                r.fail(f"{p}.{name}", f"expected {' or '.join(SCALE_DTYPES)} of shape {[rows, cols // self.block_size]}, "
                                      f"got {a.dtype} {list(a.shape)}")


@dataclass(frozen=True, kw_only=True)
class ArraySpec(RawArray):
    """A raw array; ``encoding`` (format version 2, ``embed`` only): stored block-quantized, see :class:`TableEncoding`."""

    encoding: TableEncoding | None = _json(TableEncoding, None)

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape of the values a reader gets (the decoded shape of an encoded array)."""
        return tuple(self.encoding.shape) if self.encoding is not None else tuple(self.shape)

    def parts(self) -> list[RawArray]:
        """Every raw file this array is stored in (values, then scales and mins)."""
        e = self.encoding
        return [self] + ([] if e is None else [a for a in (e.scales, e.mins) if a is not None])


@dataclass(frozen=True, kw_only=True)
class QuantAgreement(Node):
    """A quantized bundle's scores against its float source on the builtin calibration data."""

    data: str | None = _json("str", None)
    queries: int | None = _json("int", None, lo=0)
    candidates: int | None = _json("int", None, lo=0)
    max_abs_score_diff: float | None = _json("float", None)
    top10_overlap: float | None = _json("fraction", None)
    top10_identical: float | None = _json("fraction", None)


@dataclass(frozen=True, kw_only=True)
class Quantization(Node):
    method: str = _json("str")
    weights: str = _json("str")
    per_channel: bool = _json("bool", False)
    ops: tuple[str, ...] = _json("list", (), of="str")
    source_bytes: int | None = _json("int", None, lo=0)
    seconds: float | None = _json("float", None)
    agreement: QuantAgreement | None = _json(QuantAgreement, None)


@dataclass(frozen=True, kw_only=True)
class TensorFormat(Node):
    """How one file's weights are stored: ``format`` (fp32/fp16/int8/int4), ``block_size`` (int8/int4: values sharing
    one scale), ``accuracy_level`` (``MatMulNBits``' compute precision: 0 = float activations, 4 = int8 activations),
    ``count`` (matrices stored so), ``source`` (``export``, ``requantized``, ``gguf:Q4_0``/``gguf:Q4_1``/``gguf:Q8_0`` =
    the GGUF's own blocks repacked, never dequantized; ``+requantized`` when some matrices of the file were not found
    in it), ``max_abs_diff`` (GGUF blocks: largest |stored weight - the ``gguf`` package's dequantization|)."""

    format: str = _json("str", choices=WEIGHT_FORMATS)
    block_size: int | None = _json("int", None, lo=1)
    accuracy_level: int | None = _json("int", None, lo=0, hi=4)
    count: int | None = _json("int", None, lo=0)
    source: str | None = _json("str", None)
    max_abs_diff: float | None = _json("float", None)


@dataclass(frozen=True, kw_only=True)
class WeightsSpec(TensorFormat):
    """The bundle's weight format (format version 2 when not fp32): the default ``format`` and, per file (a graph file
    or the embedding table's file), the format its tensors are stored in (``tensors``)."""

    tensors: Mapping[str, TensorFormat] = field(default_factory=lambda: MappingProxyType({}))
    seconds: float | None = _json("float", None)
    agreement: QuantAgreement | None = _json(QuantAgreement, None)   # rerank: scores against the float32 source

    @classmethod
    def _read_first(cls, r, d, p):
        raw = r.obj(d.get("tensors", {}), f"{p}.tensors")
        return {"tensors": MappingProxyType({r.path(k, f"{p}.tensors key"): TensorFormat.read(r, v, f"{p}.tensors[{k!r}]")
                                             for k, v in raw.items()})}
