"""Int8 weights for a bundle's layer graphs (``edge-sel quantize BUNDLE --out OUT``, ``export --quantize int8``).

Dynamic quantization with onnxruntime's own tool (``onnxruntime.quantization.quantize_dynamic``):
every ``MatMul`` with a constant weight becomes ``DynamicQuantizeLinear`` + ``MatMulInteger`` with int8
weights (per output channel) — 4x smaller layer files, so each streamed layer costs a quarter of the
memory budget, and integer matmuls that run ~2x faster on CPUs with VNNI/AVX2. Activations are
quantized per call, so no calibration data is needed for the graphs themselves.

Quantization changes scores. The rewrite therefore *measures* what it costs before the bundle is
committed: the builtin calibration queries (never the benchmark text) are ranked by the source and the
quantized bundle, and the manifest's ``quantization.agreement`` records the max |score diff|, the
mean top-10 overlap and the fraction of queries whose top-10 set is identical. A calibrated early-ranking
schedule is kept (its margins were measured on the float model; re-run ``edge-sel calibrate`` on the
quantized bundle to re-measure them). Embedding table, head and tokenizer are hard-linked unchanged.
The output is written atomically (:class:`edge_sel.runtime.bundle_writer.BundleWriter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.bundle_writer import BundleWriter
from edge_sel.runtime.errors import InputError

from ..staging import link_files, stage_manifest

WEIGHT_TYPES = ("int8", "uint8")


@contextlib.contextmanager
def _readable(src: Path, data: Path | None):
    """``src`` itself, or a private copy of it and its weights when those are hard-linked."""
    if data is None or not data.exists() or os.stat(data).st_nlink == 1:
        yield src
        return
    # onnx refuses external data with several hard links ("potential hardlink attack"), and bundles share
    # unchanged files by hard links (quantize, drop-layers, the bench cache): read a private copy
    with tempfile.TemporaryDirectory(prefix="edge_sel_quant_") as tmp:
        shutil.copy2(src, Path(tmp) / src.name)
        shutil.copy2(data, Path(tmp) / data.name)
        yield Path(tmp) / src.name


def _quantize_graph(src: Path, dst: Path, weight_type: str, per_channel: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    qtype = QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8
    # fused rerank graphs feed o_proj from a com.microsoft MultiHeadAttention node, whose output type onnx's
    # shape inference cannot name; every activation in a bundle is float32
    logging.disable(logging.WARNING)  # its advice to run pre-processing (for image models) is noise here, once per graph
    try:
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=per_channel, weight_type=qtype,
                         use_external_data_format=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.disable(logging.NOTSET)


def agreement(source: Bundle, quantized: Bundle, n_queries: int = 8, n_candidates: int = 32, top: int = 10) -> dict:
    """Rank the builtin calibration data with both bundles; compare scores and top-``top`` sets."""
    from edge_sel.runtime import Reranker
    from edge_sel.export.passes.calibrate import builtin_data

    if source.task != "rerank":
        return {}
    data = builtin_data(n_queries=n_queries, n_candidates=n_candidates)
    a, b = Reranker(source, pruning="off"), Reranker(quantized, pruning="off")
    a.warn_truncated = b.warn_truncated = False  # the calibration text's long passages: not the user's documents
    diff, over, ident = 0.0, [], []
    for q, docs in data:
        sa, sb = a.predict(q, docs), b.predict(q, docs)
        diff = max(diff, float(np.max(np.abs(sa - sb))))
        k = min(top, len(docs))
        ta, tb = set(np.argsort(-sa, kind="stable")[:k]), set(np.argsort(-sb, kind="stable")[:k])
        over.append(len(ta & tb) / k)
        ident.append(ta == tb)
    return {"data": "builtin", "queries": len(data), "candidates": n_candidates, "max_abs_score_diff": diff,
            f"top{top}_overlap": float(np.mean(over)), f"top{top}_identical": float(np.mean(ident))}


def quantize_bundle(path: str | os.PathLike, out: str | os.PathLike, weight_type: str = "int8", per_channel: bool = True,
                    measure: bool = True, force: bool = False, say: Callable[[str], None] | None = None,
                    rewrite: Callable[[Path, Path], None] | None = None, method: str | None = None) -> Path:
    """Write a copy of the bundle at ``path`` to ``out`` with int8 layer weights; returns ``out``.

    ``rewrite(src_graph, dst_graph)`` replaces onnxruntime's rewrite of each graph (benchmarks probe
    other int8 forms through it; ``method`` names it in the manifest)."""
    say = say or (lambda msg: None)
    if weight_type not in WEIGHT_TYPES:
        raise InputError(f"unknown weight type {weight_type!r}; choose one of {', '.join(WEIGHT_TYPES)}")
    src = Bundle.open(path, verify=True)
    spec = src.spec
    if spec.quantization is not None:
        raise InputError(f"{src.root} is already quantized ({spec.quantization.weights}); quantize the float bundle instead")
    out = Path(out).expanduser().absolute()
    if out == src.root:
        raise InputError("--out must differ from the source bundle (the float bundle is kept for comparison)")
    t0 = time.perf_counter()
    with BundleWriter(out, overwrite=force) as w:
        graphs = [*spec.layers, *spec.extra_graphs.values()]  # every layer graph and its extra (qkv) graph
        written: set[str] = set()
        weights: dict[str, str | None] = {}  # graph file -> its new weight file
        for n, g in enumerate(graphs, 1):
            written.update(f for f in (g.file, g.weights) if f)
            dst = w.file(g.file)
            say(f"quantizing {g.file} ({n}/{len(graphs)})")
            with _readable(src.path(g.file), src.path(g.weights) if g.weights else None) as graph:
                if rewrite is None:
                    _quantize_graph(graph, dst, weight_type, per_channel)
                else:
                    rewrite(graph, dst)
            data = dst.with_name(dst.name + ".data")
            weights[g.file] = Path(g.file).with_name(data.name).as_posix() if data.exists() else None
        # a fused graph reads the float weights at their old offsets: it goes, with the manifest's `fused` field
        stale = {spec.fused.file} if spec.fused is not None else set()
        link_files(src, w, [rel for rel in spec.files if rel not in written and rel not in stale])
        quant = {"method": method or "onnxruntime.quantization.quantize_dynamic", "weights": weight_type, "per_channel": per_channel,
                 "ops": ["MatMul"], "source_bytes": sum(src.layer_weight_bytes(i) for i in range(len(spec.layers))),
                 "seconds": round(time.perf_counter() - t0, 2)}
        new = spec.replace(layers=[dataclasses.replace(x, weights=weights[x.file]) for x in spec.layers],
                           extra_graphs={k: dataclasses.replace(g, weights=weights[g.file]) for k, g in spec.extra_graphs.items()},
                           quantization=quant, fused=None)
        if measure and src.task == "rerank":
            staged = stage_manifest(w, new)
            say("measuring the quantized bundle against the float one on the builtin calibration data")
            new = new.replace(quantization={**quant, "agreement": agreement(src, staged)})
        w.commit(new)
    return out
