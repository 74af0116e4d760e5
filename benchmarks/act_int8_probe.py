"""Int8 activations for reranking: write a copy of a float bundle whose matrices multiply in integers.

    python -m benchmarks.act_int8_probe FP32_BUNDLE OUT [--keep-float REGEX]
    python -m benchmarks.weights_rerank FP32_BUNDLE@192MB OUT@128MB --n-docs 128 --queries 8

On CPUs with VNNI, onnxruntime's integer GEMM runs a 2048-row matrix product ~3x faster than its float SGEMM, while
its 4- and 8-bit ``MatMulNBits`` kernels are no faster than SGEMM on many rows; so the only fast kernel for a batched
rerank call quantizes activations too. ``edge-sel quantize --method dynamic`` does that per tensor (onnxruntime's
``DynamicQuantizeMatMul``); this probe does it per token, as LLM.int8() and SmoothQuant's finer settings do
(Dettmers et al. 2022; Xiao et al. 2023): each row of ``x`` gets its own scale, so a token with huge activations
does not flatten the others. Every constant-weight ``MatMul`` whose output name does not match ``--keep-float``
becomes ``round(x / s_row) + 128`` (uint8) × ``W / s_col`` (int8, per output column) in ``MatMulInteger``, scaled
back by ``s_row · s_col``. A benchmark probe, not a bundle format: the manifest names the method.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np


def _scalar(name: str, value, dtype):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(value, dtype), name)


def rewrite_graph(src: Path, dst: Path, keep_float: re.Pattern | None) -> int:
    """Rewrite ``src`` into ``dst`` (weights in ``dst.data``); returns the number of matrices rewritten."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inits = {i.name: i for i in graph.initializer}
    added = [_scalar("act8_zero", 128, np.uint8), _scalar("act8_127", 127.0, np.float32),
             _scalar("act8_128", 128.0, np.float32), _scalar("act8_eps", 1e-8, np.float32),
             _scalar("act8_axes", [-1], np.int64)]
    nodes, n_rewritten = [], 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or (keep_float and keep_float.search(node.output[0])):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        s_col = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0).astype(np.float32)
        p = node.output[0] + "_act8"
        added += [numpy_helper.from_array(np.clip(np.round(w / s_col), -127, 127).astype(np.int8), p + "_w"),
                  numpy_helper.from_array(s_col, p + "_scol")]
        x = node.input[0]
        row_max = (helper.make_node("ReduceMax", [p + "_abs", "act8_axes"], [p + "_max"], keepdims=1) if opset >= 18
                   else helper.make_node("ReduceMax", [p + "_abs"], [p + "_max"], keepdims=1, axes=[-1]))
        nodes += [helper.make_node("Abs", [x], [p + "_abs"]), row_max,
                  helper.make_node("Max", [p + "_max", "act8_eps"], [p + "_maxe"]),
                  helper.make_node("Div", [p + "_maxe", "act8_127"], [p + "_srow"]),
                  helper.make_node("Div", [x, p + "_srow"], [p + "_xs"]),
                  helper.make_node("Round", [p + "_xs"], [p + "_xr"]),
                  helper.make_node("Add", [p + "_xr", "act8_128"], [p + "_xo"]),
                  helper.make_node("Cast", [p + "_xo"], [p + "_xq"], to=TensorProto.UINT8),
                  helper.make_node("MatMulInteger", [p + "_xq", p + "_w", "act8_zero"], [p + "_yi"]),
                  helper.make_node("Cast", [p + "_yi"], [p + "_yf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [p + "_yf", p + "_srow"], [p + "_yr"]),
                  helper.make_node("Mul", [p + "_yr", p + "_scol"], [node.output[0]])]
        n_rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data", size_threshold=1024)
    return n_rewritten


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="a float bundle")
    p.add_argument("out", help="where to write the probe bundle (replaced if it exists)")
    p.add_argument("--keep-float", default=None, metavar="REGEX",
                   help="matrices whose output name matches stay float, e.g. 'down_proj' or 'gate_proj|up_proj|down_proj'")
    args = p.parse_args(argv)
    from edge_sel.export.passes.quantize import quantize_bundle

    keep = re.compile(args.keep_float) if args.keep_float else None
    count = [0]

    def rewrite(src: Path, dst: Path) -> None:
        count[0] += rewrite_graph(src, dst, keep)

    method = "benchmarks.act_int8_probe (int8 activations per token" + (f", float: {args.keep_float})" if keep else ")")
    quantize_bundle(args.bundle, args.out, measure=False, force=True, rewrite=rewrite, method=method)
    print(f"wrote {args.out}: {count[0]} matrices with int8 activations per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
