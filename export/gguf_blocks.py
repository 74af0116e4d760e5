"""A GGUF file's own quantized blocks, repacked without dequantizing: the embedding table and the MatMul weights of
an int8/int4 bundle.

GGUF's Q8_0 (``x = d * q``, q int8), Q4_0 (``x = d * (q - 8)``) and Q4_1 (``x = d * q + m``) blocks of 32 values
with float16 ``d`` / ``m`` are exactly the block encodings of :mod:`edge_sel.runtime.blocks`; only the order of the
4-bit values differs (GGUF puts value ``j`` in the low and value ``j + 16`` in the high nibble of byte ``j``; the
bundle and ``MatMulNBits`` put even values in the low nibble), which is a lossless shuffle.

For a graph's ``MatMul`` the same blocks become onnxruntime's ``MatMulNBits`` (``(code - zero_point) * scale`` per
block along ``K``): Q8_0 is ``code = q + 128`` with the default zero point 128, Q4_0 is ``code = q`` with the default
zero point 8. Q4_1's float minimum has no integer zero point, so it is stored as zero point 0 (``d * q``) plus a
small float term: ``x @ W = MatMulNBits(x) + blocksum(x) @ mins``, where ``blocksum(x)`` (``x @ ones-per-block``)
sums each 32-value block of the activation and ``mins`` (float16 on disk, ``[K / 32, N]``) holds the blocks'
minimums. (A float zero point would express it directly, but onnxruntime's CPU kernel runs those several times
slower.) So the bundle's weights dequantize to exactly the values llama.cpp computes from the file.

A graph weight is found in the file by value: every row of ``W.T`` (an output feature) is looked up among the rows
of the file's dequantized tensors, which also finds rows the exporter permuted (llama's q/k rotary layout) or
concatenated. Other block types (K-quants, IQ, ...) have no such layout: those weights are requantized from the
float weights (``source: requantized``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_sel.runtime.blocks import pack4

KEPT = ("Q8_0", "Q4_0", "Q4_1")   # GGUF block types kept as they are
BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
BLOCK = 32


def repack(raw: np.ndarray, kind: str, rows: int, cols: int):
    """GGUF tensor bytes ``[rows, bytes per row]`` of type ``kind`` -> ``(values, scales, mins, bits)`` in the bundle's
    block layout (4-bit values packed even-low, 8-bit values int8)."""
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


# ---- MatMul weights ------------------------------------------------------------------------------------------
@dataclass
class NBitsWeight:
    """One ``[K, N]`` weight in ``MatMulNBits`` layout: ``codes`` ``[N, K/32, 32*bits/8]``, ``scales`` ``[N, K/32]``
    float32, ``zero_points`` (packed uint8, None = the op's default ``2**(bits-1)``), ``mins`` ``[N, K/32]`` float16
    (Q4_1) or None."""

    kind: str
    bits: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    mins: np.ndarray | None

    def dequantize(self) -> np.ndarray:
        """The ``[K, N]`` float32 weight by ``MatMulNBits``' definition, ``(code - zero_point) * scale`` (+ min)."""
        n, nb, _ = self.codes.shape
        if self.bits == 4:
            c = np.empty((n, nb, BLOCK), dtype=np.uint8)
            c[..., 0::2], c[..., 1::2] = self.codes & 0x0F, self.codes >> 4
        else:
            c = self.codes
        if self.zero_points is None:
            zp = np.full((n, nb), 1 << (self.bits - 1), dtype=np.float32)
        elif self.bits == 4:
            zp = np.stack([self.zero_points & 0x0F, self.zero_points >> 4], -1).reshape(n, -1)[:, :nb].astype(np.float32)
        else:
            zp = self.zero_points.reshape(n, nb).astype(np.float32)
        w = (c.astype(np.float32) - zp[..., None]) * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins.astype(np.float32)[..., None]
        return np.ascontiguousarray(w.reshape(n, nb * BLOCK).T)


def nbits_weight(kind: str, raw: np.ndarray) -> NBitsWeight:
    """GGUF blocks ``[N, K/32, bytes per block]`` (rows = output features) -> :class:`NBitsWeight`."""
    n, nb, _ = raw.shape
    d = raw[..., 0:2].copy().view(np.float16).reshape(n, nb).astype(np.float32)
    if kind == "Q8_0":
        codes = (raw[..., 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return NBitsWeight(kind, 8, codes, d, None, None)
    head = 4 if kind == "Q4_1" else 2
    qs = raw[..., head:head + 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    codes = pack4(q)                                          # [N, nb, 16]: even value in the low nibble
    if kind == "Q4_0":
        return NBitsWeight(kind, 4, codes, d, None, None)
    zero = np.zeros(n * ((nb + 1) // 2), dtype=np.uint8)
    mins = raw[..., 2:4].copy().view(np.float16).reshape(n, nb)
    return NBitsWeight(kind, 4, codes, d, zero, mins)


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


@dataclass
class RowIndex:
    """The rows of a GGUF file's kept-type tensors, found by their dequantized values (``gguf``'s dequantization,
    which is what an exporter reading the file through transformers holds as float32 weights)."""

    path: Path
    rows: dict[bytes, tuple[int, int]] = field(default_factory=dict)   # digest -> (tensor, row)
    blocks: list[np.ndarray] = field(default_factory=list)             # per tensor [rows, K/32, bytes per block]
    kinds: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)              # tensor name -> its block type, not kept

    @classmethod
    def build(cls, gguf_path: str | Path) -> "RowIndex":
        from gguf import GGUFReader
        from gguf.quants import dequantize

        out = cls(Path(gguf_path))
        for t in GGUFReader(str(gguf_path)).tensors:
            kind = t.tensor_type.name
            if len(t.shape) != 2 or kind in ("F32", "F16", "BF16"):
                continue
            if kind not in KEPT:
                out.skipped[t.name] = kind
                continue
            cols, rows = (int(x) for x in t.shape[:2])
            raw = np.asarray(t.data)
            x = dequantize(raw, t.tensor_type).reshape(rows, cols).astype(np.float32)
            i = len(out.blocks)
            out.blocks.append(raw.view(np.uint8).reshape(rows, cols // BLOCK, -1))
            out.kinds.append(kind)
            for r in range(rows):
                out.rows.setdefault(_digest(x[r]), (i, r))
        return out

    def warning(self) -> str | None:
        """One line naming the file's quantized tensors whose blocks cannot be kept (None when every one can)."""
        if not self.skipped:
            return None
        kinds = sorted(set(self.skipped.values()))
        return (f"{len(self.skipped)} tensors of {self.path.name} are {'/'.join(kinds)}, a block type with no "
                f"MatMulNBits layout: those weights are requantized from their dequantized values, not kept")

    def find(self, w: np.ndarray, bits: int) -> NBitsWeight | None:
        """The file's blocks for the float ``[K, N]`` weight ``w``, when every one of its ``N`` columns is a row of one
        kept tensor type with ``bits``-bit values; else None."""
        if w.ndim != 2 or w.shape[0] % BLOCK:
            return None
        wt = np.ascontiguousarray(w.T, dtype=np.float32)
        hits = [self.rows.get(_digest(r)) for r in wt]
        if not hits or any(h is None for h in hits):
            return None
        kinds = {self.kinds[t] for t, _ in hits}
        if len(kinds) != 1 or BITS[next(iter(kinds))] != bits:
            return None
        raw = np.stack([self.blocks[t][r] for t, r in hits])
        return nbits_weight(kinds.pop(), raw)


@dataclass
class Kept:
    """What :func:`keep_blocks` did to one graph."""

    count: int = 0                      # MatMuls now holding the GGUF's blocks
    kinds: set[str] = field(default_factory=set)
    max_abs_diff: float = 0.0           # largest |dequantized bundle weight - gguf's dequantization| over them
    helpers: list[str] = field(default_factory=list)   # the block-sum MatMuls: float32, never to be quantized


def warn(message: str | None) -> None:
    """A warning line on stderr (the conversion goes on)."""
    if message:
        import sys

        print(f"warning: {message}", file=sys.stderr)


def keep_blocks(model, index: RowIndex, bits: int, accuracy_level: int) -> Kept:
    """Rewrite every ``MatMul`` of ``model`` whose constant weight is found in ``index`` (at ``bits`` bits) as
    ``MatMulNBits`` on the file's own blocks (Q4_1: plus the block-minimum term); the rest are left for the
    quantizer."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    kept, nodes, sums = Kept(), [], {}
    ranks = _ranks(model)
    for n in g.node:
        w_init = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) > 1 else None
        found = None
        if w_init is not None and w_init.data_type == TensorProto.FLOAT and len(w_init.dims) == 2:
            w = numpy_helper.to_array(w_init)
            found = index.find(w, bits)
        if found is None:
            nodes.append(n)
            continue
        K, N = w.shape
        kept.max_abs_diff = max(kept.max_abs_diff, float(np.abs(found.dequantize() - w).max()))
        kept.count += 1
        kept.kinds.add(found.kind)
        base = w_init.name
        g.initializer.append(numpy_helper.from_array(found.codes, base + "_Q"))
        g.initializer.append(numpy_helper.from_array(found.scales.reshape(-1), base + "_scales"))
        ins = [n.input[0], base + "_Q", base + "_scales"]
        if found.zero_points is not None:
            g.initializer.append(numpy_helper.from_array(found.zero_points, base + "_zp"))
            ins.append(base + "_zp")
        y = n.output[0] if found.mins is None else n.output[0] + "_nbits"
        nodes.append(helper.make_node("MatMulNBits", ins, [y], name=n.name + "_Q", domain="com.microsoft", K=K, N=N,
                                      bits=bits, block_size=BLOCK, accuracy_level=accuracy_level))
        if found.mins is not None:
            src = n.input[0]
            if src not in sums:  # the activation's block sums [..., K/32], once per input (q/k/v, gate/up share it)
                sums[src] = _block_sum(nodes, g, src, K, f"{base}_in", ranks.get(src))
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(found.mins.T), base + "_mins16"))
            nodes += [helper.make_node("Cast", [base + "_mins16"], [base + "_mins"], to=TensorProto.FLOAT,
                                       name=base + "_mins_cast"),
                      helper.make_node("MatMul", [sums[src], base + "_mins"], [y + "_min"], name=n.name + "_min"),
                      helper.make_node("Add", [y, y + "_min"], [n.output[0]], name=n.name + "_add_min")]
            kept.helpers.append(n.name + "_min")
    del g.node[:]
    g.node.extend(nodes)
    if kept.count:
        used = {i for x in g.node for i in x.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return kept


def _ranks(model) -> dict[str, int]:
    """The rank of every value whose shape onnx's shape inference knows (a static rank makes the block sum two nodes)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - no ranks known: the block sums read the shape at run time
        return {}
    g = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info, *g.output]
            if v.type.tensor_type.HasField("shape")}


def _block_sum(nodes: list, g, x: str, k: int, name: str, rank: int | None) -> str:
    """Append nodes computing ``x [..., K]`` -> its 32-value block sums ``[..., K/32]`` (Reshape + ReduceSum: no
    stored constant); with ``rank`` unknown the reshape's target is read from ``x``'s shape at run time. Returns the
    output's name."""
    from onnx import helper, numpy_helper

    g.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), name + "_axis"))
    blocks = np.array([k // BLOCK, BLOCK], dtype=np.int64)
    if rank:  # 0 copies a dimension of x: the leading dimensions stay as they are
        g.initializer.append(numpy_helper.from_array(np.concatenate([np.zeros(rank - 1, np.int64), blocks]),
                                                     name + "_bshape"))
    else:
        g.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), name + "_start"))
        g.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), name + "_stop"))
        g.initializer.append(numpy_helper.from_array(blocks, name + "_blocks"))
        nodes += [helper.make_node("Shape", [x], [name + "_shape"], name=name + "_shape"),
                  helper.make_node("Slice", [name + "_shape", name + "_start", name + "_stop"], [name + "_lead"],
                                   name=name + "_lead"),
                  helper.make_node("Concat", [name + "_lead", name + "_blocks"], [name + "_bshape"], axis=0,
                                   name=name + "_bshape")]
    nodes += [helper.make_node("Reshape", [x, name + "_bshape"], [name + "_blocked"], name=name + "_reshape"),
              helper.make_node("ReduceSum", [name + "_blocked", name + "_axis"], [name + "_bsum"], keepdims=0,
                               name=name + "_bsum")]
    return name + "_bsum"


# ---- an LM head tied to the token embedding --------------------------------------------------------------------
def unsigned_table(blocks):
    """Q8_0 table blocks ``(values int8, scales f16, None, 8, block, source)`` -> the same values as ``MatMulNBits``
    stores them: uint8 codes ``q + 128`` and float32 scales (a tied head's weight is then byte for byte the table)."""
    values, scales, mins, bits, block, source = blocks
    codes = (values.astype(np.int16) + 128).astype(np.uint8)
    return codes, scales.astype(np.float32), mins, bits, block, source


def tie_head(src: Path, src_data: Path | None, dst: Path, codes_file: Path, scales_file: Path, codes: np.ndarray, scales: np.ndarray,
             index: RowIndex, accuracy_level: int) -> float | None:
    """Write the head graph ``src`` to ``dst`` with its LM-head ``MatMul`` as an 8-bit ``MatMulNBits`` whose weight and
    scales are the table's own files (``codes_file``/``scales_file``, external data), when that weight is the GGUF's
    Q8_0 token embedding, row for row (a tied head). Returns the largest |stored weight - gguf's dequantization|, or
    None (nothing written) when the head is not tied to the table."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import tempfile

    from .passes.weights import load_graph

    with tempfile.TemporaryDirectory(prefix="edge_sel_head_") as tmp:
        model = load_graph(src, src_data, Path(tmp))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    mm = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]
    if len(mm) != 1:
        return None
    n = mm[0]
    w = numpy_helper.to_array(inits[n.input[1]])
    found = index.find(w, 8) if w.ndim == 2 and w.dtype == np.float32 else None
    rows = w.shape[1] if w.ndim == 2 else -1
    if (found is None or found.kind != "Q8_0" or codes.shape[0] != rows
            or not np.array_equal(found.codes.reshape(rows, -1), codes) or not np.array_equal(found.scales, scales)):
        return None
    K, N = w.shape

    def external(name: str, shape: list[int], dtype: int, path: Path) -> onnx.TensorProto:
        t = TensorProto(name=name, data_type=dtype, dims=shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", os.path.relpath(path, dst.parent)), ("offset", "0"),
                           ("length", str(path.stat().st_size))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    g.initializer.remove(inits[n.input[1]])
    g.initializer.extend([external(n.input[1] + "_Q", [N, K // BLOCK, BLOCK], TensorProto.UINT8, codes_file),
                          external(n.input[1] + "_scales", [N * (K // BLOCK)], TensorProto.FLOAT, scales_file)])
    nodes = [helper.make_node("MatMulNBits", [n.input[0], n.input[1] + "_Q", n.input[1] + "_scales"], list(n.output),
                              name=n.name + "_Q", domain="com.microsoft", K=K, N=N, bits=8, block_size=BLOCK,
                              accuracy_level=accuracy_level) if x is n else x for x in g.node]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save_model(model, str(tmp))  # the remaining initializers (a norm's weight) are small: inline
    os.replace(tmp, dst)
    return float(np.abs(found.dequantize() - w).max())
