"""Weight formats: a bundle's weights stored at fp16, 8 or 4 bits (``export --weights``, ``quantize --weights``).

Weight-only quantization, so activations stay float32 between graphs:

* every ``MatMul`` with a constant weight in the layer graphs, the qkv graphs and a large head (the generate LM
  head; a ``Gemm`` is first rewritten as ``MatMul`` + ``Add``; heads under :data:`SMALL_HEAD` stay float32) becomes onnxruntime's ``MatMulNBits`` (``com.microsoft``), written by
  onnxruntime's own quantizer (``onnxruntime.quantization.matmul_nbits_quantizer``): blocks of ``block_size``
  values along the input dimension share a float scale and a 4/8-bit zero point (round to nearest);
* ``fp16`` stores each such weight as float16 behind a ``Cast`` (half the file; onnxruntime folds the cast
  when it loads the graph, so it runs as float32);
* the embedding table is stored block-quantized (:mod:`edge_sel.runtime.blocks`: int8 with one scale per row,
  int4 in blocks of ``block_size`` with a scale and a min; fp16 as a float16 array) and the runtime dequantizes
  only the rows a call gathers.

``accuracy_level`` is ``MatMulNBits``' compute precision: 0 keeps float activations (weight-only arithmetic),
4 quantizes each activation block to int8 inside the kernel (what llama.cpp does), the fast path for one token
at a time. Defaults (:func:`default_accuracy_level`): 4 at 8 bits (onnxruntime has no fast 8-bit float path; its
error is small); at 4 bits 0 for reranking (batched rows gain nothing from int8 activations on the CPU, and a GGUF's
own blocks then compute exactly what the float weights do) and 4 for generation, except the matrices whose input
is wider than the hidden state — the MLP's down projection, whose input (the gated activation) carries the outlier
features that per-block int8 rounding hurts most (Dettmers et al., LLM.int8(), 2022) — which keep 0
(:func:`keep_float_wide_inputs`; kept GGUF Q4_1 matrices then run it as two int8-activation rows,
:mod:`edge_sel.export.nbits_forms`). The manifest's ``weights`` records the format of every file it changed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_sel.runtime.blocks import encode
from edge_sel.runtime.errors import InputError

FORMATS = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZE = 32
# A head below this size stays float32: the yes/no head (two LM-head rows) and a cross-encoder's classifier weigh
# kilobytes, and their score is a difference of two close logits, where each row's rounding error does not cancel
# (on the tiny test decoder, 4-bit head rows shift every score by more than the scores' whole spread).
SMALL_HEAD = 1 << 20


def bits_of(fmt: str) -> int | None:
    return {"int8": 8, "int4": 4}.get(fmt)


def default_accuracy_level(fmt: str, task: str) -> int | None:
    bits = bits_of(fmt)
    if bits is None:
        return None
    return 4 if bits == 8 or task == "generate" else 0


def float_wide_inputs(fmt: str, task: str, accuracy_level: int | None) -> bool:
    """Whether the default level applies with :func:`keep_float_wide_inputs` (4-bit generation, no level chosen)."""
    return accuracy_level is None and bits_of(fmt) == 4 and task == "generate"


def keep_float_wide_inputs(model, hidden: int) -> int:
    """Set ``accuracy_level`` 0 on every ``MatMulNBits`` of ``model`` whose input is wider than ``hidden`` (the MLP's
    down projection); returns how many."""
    count = 0
    for n in model.graph.node:
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "MatMulNBits" and attrs["K"].i > hidden and "accuracy_level" in attrs:
            attrs["accuracy_level"].i = 0
            count += 1
    return count


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InputError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


# ---- graphs --------------------------------------------------------------------------------------------------
def load_graph(src: Path, src_data: Path | None, tmp: Path):
    """``src`` with its external weights loaded; a data file with several hard links is read from a copy in ``tmp``
    (onnx refuses those, and bundles share unchanged files by hard links)."""
    import onnx

    if src_data is not None and src_data.exists() and os.stat(src_data).st_nlink > 1:
        shutil.copy2(src, tmp / src.name)
        shutil.copy2(src_data, tmp / src_data.name)
        src = tmp / src.name
    return onnx.load(str(src), load_external_data=True)


def _gemm_to_matmul(model) -> None:
    """``Gemm(A, B, C)`` with a constant ``B`` (alpha = beta = 1, A not transposed) -> ``MatMul(A, B')`` + ``Add(C)``,
    so the quantizer (which rewrites ``MatMul``) sees the head's projections too."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    for n in g.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0
                or a.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if a.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        name = n.input[1] + "_kn"
        g.initializer.append(numpy_helper.from_array(w, name))
        if len(n.input) > 2 and n.input[2]:
            mid = n.output[0] + "_mm"
            nodes += [helper.make_node("MatMul", [n.input[0], name], [mid], name=n.name + "_mm"),
                      helper.make_node("Add", [mid, n.input[2]], [n.output[0]], name=n.name + "_bias")]
        else:
            nodes.append(helper.make_node("MatMul", [n.input[0], name], [n.output[0]], name=n.name + "_mm"))
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _fp16_weights(model) -> int:
    """float32 MatMul weights -> float16 initializers behind a Cast to float32."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    count, new_nodes = 0, []
    for n in g.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) > 1 else None
        if w is not None and w.data_type == TensorProto.FLOAT and len(w.dims) == 2:
            half = numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float16), w.name + "_fp16")
            g.initializer.remove(w)
            g.initializer.append(half)
            new_nodes.append(helper.make_node("Cast", [half.name], [w.name], to=TensorProto.FLOAT, name=w.name + "_cast"))
            inits[n.input[1]] = None
            count += 1
        new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    return count


def convert_graph(src: Path, src_data: Path | None, dst: Path, fmt: str, block_size: int = BLOCK_SIZE,
                  accuracy_level: int | None = None, gguf=None, float_inputs_wider_than: int | None = None,
                  decode_forms: bool = False):
    """Write ``src`` (weights in ``src_data``) with its MatMul weights in ``fmt`` to ``dst`` (weights in
    ``<dst name>.data``). ``gguf`` (a :class:`edge_sel.export.gguf_blocks.RowIndex`): weights found in that file keep
    its blocks. ``float_inputs_wider_than``: :func:`keep_float_wide_inputs` with that hidden size. ``decode_forms``: the
    kept Q4_1 matrices in the one-row forms of :mod:`edge_sel.export.nbits_forms` (generate bundles). Returns the data file's name (None when the graph has no external weights), the number of matrices
    converted and what was kept from the GGUF (:class:`edge_sel.export.gguf_blocks.Kept`, or None)."""
    import onnx

    # the result is renamed into place: a scratch folder beside dst stays on its filesystem (os.replace cannot cross
    # filesystems, and the system temp directory often is another one, e.g. a tmpfs /tmp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edge_sel_weights_", dir=dst.parent) as tmp:
        model = load_graph(src, src_data, Path(tmp))
        _gemm_to_matmul(model)
        kept = None
        if fmt == "fp16":
            count = _fp16_weights(model)
        else:
            if gguf is not None:
                from ..gguf_blocks import keep_blocks

                kept = keep_blocks(model, gguf, bits_of(fmt), accuracy_level or 0)
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            before = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
            q = MatMulNBitsQuantizer(model, bits=bits_of(fmt), block_size=block_size, is_symmetric=False,
                                     accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",),
                                     nodes_to_exclude=kept.helpers if kept else None)
            q.process()
            model = q.model.model
            count = sum(n.op_type == "MatMulNBits" for n in model.graph.node) - before
            if float_inputs_wider_than:
                keep_float_wide_inputs(model, float_inputs_wider_than)
            from ..merge_nbits import merge_shared_input

            merge_shared_input(model)  # after the levels are set: only matrices at the same level merge
            if decode_forms:
                from ..nbits_forms import decode_forms as one_row_forms

                one_row_forms(model)  # after the merge: it rewrites the merged products' minimum terms
        out = Path(tmp) / "out"
        out.mkdir()
        data = dst.name + ".data" if src_data is not None else None
        if data:
            onnx.save_model(model, str(out / dst.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data, size_threshold=1024, convert_attribute=False)  # shape constants inline
        else:
            onnx.save_model(model, str(out / dst.name))
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / dst.name, dst)  # a new inode: never written through a hard link
        if data:
            os.replace(out / data, dst.with_name(data))
    return data, count, kept


# ---- the embedding table -------------------------------------------------------------------------------------
def encode_table(table: np.ndarray, fmt: str, block_size: int = BLOCK_SIZE):
    """float ``[rows, cols]`` -> ``(values, scales, mins, bits, block)``; int8 keeps one scale per row."""
    bits = bits_of(fmt)
    cols = table.shape[1]
    block = cols if bits == 8 else block_size
    while cols % block:  # a width the block size does not divide: the largest smaller power of two that does
        block //= 2
    values, scales, mins = encode(table, bits, max(block, 2))
    return values, scales, mins, bits, max(block, 2)


def write_table(write_array: Callable[[str, np.ndarray], dict], table: np.ndarray, fmt: str,
                block_size: int = BLOCK_SIZE, source: str = "requantized", blocks=None) -> dict[str, Any]:
    """Write the embedding table in ``fmt`` and return its manifest array spec (with ``encoding`` at 8/4 bits).
    ``blocks``: ``(values, scales, mins, bits, block, source)`` already in the block layout (a GGUF's own blocks,
    :mod:`edge_sel.export.gguf_blocks`), written as they are."""
    if fmt == "fp32":
        return write_array("embed/tokens.bin", np.asarray(table, dtype=np.float32))
    if fmt == "fp16":
        return write_array("embed/tokens.f16.bin", np.asarray(table, dtype=np.float16))
    if blocks is not None:
        values, scales, mins, bits, block, source = blocks
    else:
        values, scales, mins, bits, block = encode_table(np.asarray(table, dtype=np.float32), fmt, block_size)
    spec = write_array(f"embed/tokens.q{bits}.bin", values)
    spec["encoding"] = {"bits": bits, "block_size": block, "shape": list(table.shape),
                        "scales": write_array(f"embed/tokens.q{bits}.scales.bin", scales),
                        "mins": None if mins is None else write_array(f"embed/tokens.q{bits}.mins.bin", mins),
                        "source": source}
    return spec


# ---- a whole bundle's files ----------------------------------------------------------------------------------
def convert_files(read: Callable[[str], Path], w, manifest: dict[str, Any], fmt: str, task: str,
                  block_size: int = BLOCK_SIZE, accuracy_level: int | None = None, table: np.ndarray | None = None,
                  say: Callable[[str], None] | None = None, table_blocks=None, gguf=None) -> tuple[dict[str, Any], set[str]]:
    """Write every graph named by ``manifest`` (layers, qkv graphs, head) and the embedding table in ``fmt`` into the
    bundle writer ``w``, reading the float32 originals through ``read(rel)``. ``gguf`` (a
    :class:`edge_sel.export.gguf_blocks.RowIndex` of the file the float weights came from): MatMul weights found there
    with ``fmt``'s bits keep the file's blocks. Returns the new manifest (``weights`` recorded, the ``embed`` spec
    replaced) and the set of source files it replaced (the rest carry over)."""
    from edge_sel.runtime.manifest import embed_entry, graph_entries, with_weights

    say = say or (lambda msg: None)
    level = accuracy_level if accuracy_level is not None else default_accuracy_level(fmt, task)
    table_rel, dtype, shape = embed_entry(manifest)
    wide = shape[1] if float_wide_inputs(fmt, task, accuracy_level) else None  # the table's width: the hidden size
    block = block_size if bits_of(fmt) else None
    graphs = graph_entries(manifest)
    tensors: dict[str, dict[str, Any]] = {}
    data_paths: dict[str, str | None] = {}
    replaced: set[str] = set()
    if block_size != BLOCK_SIZE:
        gguf = None  # GGUF blocks hold 32 values
    kept_kinds: set[str] = set()
    worst = None  # largest |bundle weight - gguf's dequantization| over every kept matrix
    table_spec = None
    if gguf is not None and task == "generate" and table_blocks is not None and table_blocks[5] == "gguf:Q8_0":
        # an LM head tied to a Q8_0 token embedding can read the table's own files: write them first, as MatMulNBits
        # stores 8-bit weights (uint8 codes, float32 scales)
        from ..gguf_blocks import unsigned_table

        table_blocks = unsigned_table(table_blocks)
        table_spec = write_table(w.write_array, table, fmt, block_size, blocks=table_blocks)
    for n, (rel, weights_rel, is_head) in enumerate(graphs, 1):
        say(f"{fmt} weights: {rel} ({n}/{len(graphs)})")
        src_data = read(weights_rel) if weights_rel else None
        if is_head and sum(p.stat().st_size for p in (read(rel), src_data) if p) < SMALL_HEAD:
            tensors[rel] = {"format": "fp32", "source": "export"}  # see SMALL_HEAD
            continue
        if is_head and table_spec is not None:
            from ..gguf_blocks import tie_head

            enc = table_spec["encoding"]
            diff = tie_head(read(rel), src_data, w.file(rel), w.file(table_spec["file"]), w.file(enc["scales"]["file"]),
                            table_blocks[0], table_blocks[1], gguf, default_accuracy_level("int8", task))
            if diff is not None:
                replaced.update(x for x in (rel, weights_rel) if x)
                data_paths[rel] = None
                tensors[rel] = {"format": "int8", "block_size": BLOCK_SIZE, "count": 1,
                                "accuracy_level": default_accuracy_level("int8", task),
                                "source": "gguf:Q8_0 (the embedding table's files)", "max_abs_diff": diff}
                kept_kinds.add("Q8_0")
                worst = max(worst or 0.0, diff)
                continue
        data, count, kept = convert_graph(read(rel), src_data, w.file(rel), fmt, block_size, level, gguf=gguf,
                                          float_inputs_wider_than=None if is_head else wide,
                                          decode_forms=wide is not None and not is_head)
        replaced.update(x for x in (rel, weights_rel) if x)
        data_paths[rel] = Path(rel).with_name(data).as_posix() if data else None
        source = "requantized" if block else "export"
        if kept is not None and kept.count:
            kinds = "+".join(sorted(kept.kinds))
            source = f"gguf:{kinds}" + ("+requantized" if count else "")
            kept_kinds |= kept.kinds
            worst = max(worst or 0.0, kept.max_abs_diff)
        tensors[rel] = {"format": fmt, "block_size": block, "accuracy_level": level if block else None,
                        "count": count + (kept.count if kept else 0), "source": source,
                        "max_abs_diff": kept.max_abs_diff if kept and kept.count else None}
    if table is None:
        table = np.fromfile(read(table_rel), dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    replaced.add(table_rel)
    spec = table_spec or write_table(w.write_array, table, fmt, block_size, blocks=table_blocks if block else None)
    enc = spec.get("encoding") or {}
    tensors[spec["file"]] = {"format": {8: "int8", 4: "int4"}.get(enc.get("bits"), fmt), "block_size": enc.get("block_size"),
                             "source": enc.get("source") or "export"}
    weights = {"format": fmt, "block_size": block, "accuracy_level": level if block else None, "tensors": tensors,
               "source": "gguf:" + "+".join(sorted(kept_kinds)) if kept_kinds else "requantized", "max_abs_diff": worst}
    return with_weights(manifest, data_paths, spec, weights), replaced


def convert_bundle(path: str | os.PathLike, out: str | os.PathLike, fmt: str, block_size: int = BLOCK_SIZE,
                   accuracy_level: int | None = None, measure: bool = True, force: bool = False,
                   say: Callable[[str], None] | None = None, gguf: str | os.PathLike | None = None) -> Path:
    """Write a copy of the float32 bundle at ``path`` to ``out`` with its weights in ``fmt``; returns ``out``. Rerank
    bundles are measured against the source on the builtin calibration data (``weights.agreement``). ``gguf``: the
    GGUF file the bundle was exported from (default: its recorded source, when that still resolves to a GGUF file);
    at int8/int4 its Q8_0 / Q4_0 / Q4_1 blocks are kept (:mod:`edge_sel.export.gguf_blocks`)."""
    import time

    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.bundle_writer import BundleWriter
    from edge_sel.runtime.manifest import editable, thaw, with_weights_facts

    from ..staging import link_files, stage_manifest
    from .quantize import agreement

    check_format(fmt)
    src = Bundle.open(path, verify=True)
    spec = src.spec
    if spec.quantization is not None or (spec.weights is not None and spec.weights.format != "fp32"):
        have = spec.quantization.weights if spec.quantization is not None else spec.weights.format
        raise InputError(f"{src.root} already stores {have} weights; convert the float32 bundle instead")
    out = Path(out).expanduser().absolute()
    if out == src.root:
        raise InputError("--out must differ from the source bundle (the float bundle is kept for comparison)")
    if spec.graph_format != "onnx" or spec.coreml is not None:
        raise InputError(f"{src.root} holds {spec.graph_format} graphs{' and CoreML packages' if spec.coreml else ''}; "
                         "convert the weights of the plain ONNX bundle, then convert its graphs")
    t0 = time.perf_counter()
    index, blocks = None, None
    if gguf is not None:
        gguf = Path(gguf).expanduser()
        if not gguf.exists():
            raise InputError(f"--gguf {gguf}: file not found")
        if not gguf.is_file() or _magic(gguf) != b"GGUF":
            raise InputError(f"--gguf {gguf}: not a GGUF file (expected a file starting with the GGUF magic bytes)")
    gguf = gguf if gguf is not None else source_gguf(spec.model.source)
    if gguf is not None and bits_of(fmt):
        from ..gguf_blocks import RowIndex, table_blocks, warn

        say and say(f"indexing the blocks of {gguf}")
        index, blocks = RowIndex.build(gguf), table_blocks(gguf)
        warn(index.warning())
        if blocks is not None and not _same_table(blocks, np.asarray(src.array("embed"))):
            blocks = None  # not this bundle's table (another file, or a table the exporter changed)
    with BundleWriter(out, overwrite=force) as w:
        raw = editable(thaw(spec))
        new, replaced = convert_files(src.path, w, raw, fmt, spec.task, block_size, accuracy_level,
                                      table=np.asarray(src.array("embed")), say=say, table_blocks=blocks, gguf=index)
        # a fused graph reads the float weights at their old offsets: it goes with the manifest's `fused` field
        stale = {spec.fused.file} if spec.fused is not None else set()
        link_files(src, w, [rel for rel in spec.files if rel not in replaced and rel not in stale])
        new = with_weights_facts(new, seconds=round(time.perf_counter() - t0, 2))
        if measure and spec.task == "rerank":
            say and say("measuring the converted bundle against the float one on the builtin calibration data")
            new = with_weights_facts(new, agreement=agreement(src, stage_manifest(w, new)))
        w.commit(new)
    return out


def source_gguf(source: str | None) -> Path | None:
    """The GGUF file a bundle's recorded ``model.source`` names, when it still resolves to one here."""
    from ..sources import resolve

    if not source:
        return None
    try:
        resolved = resolve(source)
    except Exception:  # noqa: BLE001 - a source that no longer resolves just means: no blocks to keep
        return None
    return Path(resolved.path) if resolved.kind == "gguf" else None


def _same_table(blocks, table: np.ndarray) -> bool:
    from edge_sel.runtime.blocks import decode

    values, scales, mins, bits, block, _ = blocks
    return values.shape[0] == table.shape[0] and np.array_equal(decode(values, scales, mins, bits, block), table)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)
