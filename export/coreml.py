"""CoreML packages of a bundle's streamed stages (``edge-sel export --format coreml``), converted from torch.

coremltools converts from torch only (its ONNX converter was removed in version 6), so each stage is converted
from the same torch module the ONNX graph was exported from (:class:`edge_sel.export.adapters.base.GraphSpec`):
``torch.jit.trace`` on the module's sample inputs, then ``coremltools.convert`` to an ML Program (``.mlpackage``)
with the stage's I/O names. What stays the same as the ONNX stage:

* one package per graph the runtime streams — each layer (``layer_NNN``), each split layer's ``qkv_NNN``, the
  head; the embedding table stays the raw array (a row gather needs no model);
* input and output names, their ranks and fixed sizes; the axes the ONNX graph leaves free (batch, sequence,
  cache slots, key-position heads) are ``RangeDim`` s, so the runtime batches and pads as it does for onnxruntime;
* hidden states cross stage boundaries as float32 (the package casts inside); with ``precision="fp16"`` (default)
  weights and arithmetic are float16, ``"fp32"`` keeps both float32.

What differs: integer inputs (``position_ids``, ``key_pos``) are int32 — ML Programs have no int64 inputs — so
a runtime feeds the empty-slot position as :data:`COREML_EMPTY_POS` instead of the manifest's ``empty_pos``. A
yes/no rerank bundle's ``attn`` packages return ``hidden_out`` only (as its rewritten ONNX graphs do).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from pathlib import Path
from typing import Any

from .adapters.base import GraphSpec

PRECISIONS = {"fp16": "float16", "fp32": "float32"}
DEPLOYMENT_TARGET = "macOS13"  # ML Program with float16 arithmetic and flexible shapes (also iOS16)
COREML_EMPTY_POS = 2**31 - 1   # int32 inputs: the largest position, never <= a real one
MAX_BATCH = 4096               # ML Programs need bounded ranges; the reranker runs chunks of <= 64 rows


def coremltools():
    """coremltools (the ``coreml`` extra), imported quietly: it warns about an untested torch and about its native
    predictor, which exists on macOS only."""
    import logging

    from edge_sel.runtime.coreml import forget_torchless_import

    forget_torchless_import()  # the runtime's Core ML backend may have imported it without its torch frontend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        import coremltools as ct
    return ct


def _axis_bounds(name: str, max_length: int, kv_heads: int) -> tuple[int, int]:
    return {"batch": (1, MAX_BATCH), "seq": (1, max_length), "slots": (1, max_length),
            "pos_heads": (1, kv_heads)}.get(name, (1, -1))


class _Outputs:
    """A module wrapper returning only the first ``n`` outputs (rerank attn: ``hidden_out`` only)."""

    @staticmethod
    def wrap(module, n: int):
        import torch

        class First(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, *args):
                out = self.inner(*args)
                return out[0] if n == 1 else tuple(out[:n])

        return First().eval()


def convert_stage(spec: GraphSpec, package: Path, precision: str, max_length: int, kv_heads: int,
                  outputs: list[str] | None = None) -> dict[str, Any]:
    """Convert one stage to ``package`` (an ``.mlpackage`` directory); returns its manifest entry fields."""
    import numpy as np
    import torch

    ct = coremltools()
    outputs = list(outputs or spec.output_names)
    module = spec.module if outputs == spec.output_names else _Outputs.wrap(spec.module, len(outputs))
    dims: dict[str, Any] = {}

    def dim(name: str):  # one RangeDim per axis name, so axes of one name (e.g. "seq") are tied across inputs
        if name not in dims:
            lo, hi = _axis_bounds(name, max_length, kv_heads)
            dims[name] = ct.RangeDim(lower_bound=lo, upper_bound=hi, default=None, symbol=name)
        return dims[name]

    inputs = []
    for name, sample in zip(spec.input_names, spec.sample_inputs):
        axes = spec.dynamic_axes.get(name, {})
        shape = tuple(dim(axes[i]) if i in axes else int(n) for i, n in enumerate(sample.shape))
        dtype = np.int32 if not torch.is_floating_point(sample) else np.float32
        inputs.append(ct.TensorType(name=name, shape=ct.Shape(shape), dtype=dtype))
    # coremltools draws progress bars on stderr for every pass pipeline: the export's own progress is the one shown
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, tuple(spec.sample_inputs), check_trace=False)
        model = ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=o, dtype=np.float32) for o in outputs],
                           convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
                           compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
    if package.exists():
        shutil.rmtree(package)
    model.save(str(package))
    return {"inputs": list(spec.input_names), "outputs": outputs, "weight_bytes": weight_bytes(package)}


def weight_bytes(package: Path) -> int:
    """Bytes of a package's weight files (``Data/com.apple.CoreML/weights``)."""
    return sum(p.stat().st_size for p in (Path(package) / "Data" / "com.apple.CoreML" / "weights").rglob("*") if p.is_file())


def write_packages(w, graphs, precision: str, say) -> dict[str, Any]:
    """Convert every streamed stage of ``graphs`` (:class:`BundleGraphs`, its ONNX graphs already written) into the
    staged bundle ``w``; returns the manifest's ``coreml`` field."""
    if precision not in PRECISIONS:
        from edge_sel.runtime.errors import InputError

        raise InputError(f"CoreML precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    ct = coremltools()
    max_len, kv = int(graphs.max_length), int(graphs.dims.get("kv_heads") or graphs.dims["heads"])
    # the bundle's final layer I/O: the rerank form of split layers returns hidden_out only
    io = graphs.rewrite.layer_io(graphs.layer_io) if graphs.rewrite is not None else graphs.layer_io
    attn_outputs = list(io["attn"]["outputs"]) if "attn" in io else None
    stages: dict[str, Any] = {}
    n = len(graphs.layers)

    def add(key: str, spec: GraphSpec, graph: str, outputs=None) -> None:
        rel = f"coreml/{key}.mlpackage"
        entry = convert_stage(spec, w.file(rel), precision, max_len, kv, outputs)
        stages[key] = {"package": rel, "graph": graph, **entry}

    for i, layer in enumerate(graphs.layers):
        say("coreml", i, n + 1)
        if layer.qkv is not None:
            add(f"qkv_{i:03d}", layer.qkv, f"layers/layer_{i:03d}_qkv.onnx")
        add(f"layer_{i:03d}", layer.graph, f"layers/layer_{i:03d}.onnx", attn_outputs if layer.qkv is not None else None)
    add("head", graphs.head, "head.onnx")
    say("coreml", n + 1, n + 1)
    return {"precision": PRECISIONS[precision], "minimum_deployment_target": DEPLOYMENT_TARGET,
            "converter": f"coremltools {ct.__version__}", "empty_pos": COREML_EMPTY_POS, "stages": stages}
