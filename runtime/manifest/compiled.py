"""Compiled forms of a bundle's graphs: ORT-format graphs, CoreML packages and the fused rerank graph."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from .node import Node, json_field as _json


GRAPH_FORMATS = ("onnx", "ort")  # ort: onnxruntime's flatbuffer format (mobile and minimal builds), weights inside
COREML_PRECISIONS = ("float16", "float32")


@dataclass(frozen=True, kw_only=True)
class CoreMLStage(Node):
    """One CoreML ML Program package (a directory) standing for the ONNX graph ``graph``, with that graph's I/O names."""

    package: str = _json("path")
    graph: str = _json("path")
    inputs: tuple[str, ...] = _json("list", of="str", nonempty=True)
    outputs: tuple[str, ...] = _json("list", of="str", nonempty=True)
    weight_bytes: int | None = _json("int", None, lo=0)


@dataclass(frozen=True, kw_only=True)
class CoreMLPackages(Node):
    """``edge-sel export --format coreml``: a CoreML package per streamed stage (key: ``layer_NNN``, ``qkv_NNN``, ``head``)."""

    stages: Mapping[str, CoreMLStage]
    precision: str = _json("str", choices=COREML_PRECISIONS)
    minimum_deployment_target: str = _json("str")
    converter: str | None = _json("str", None)
    empty_pos: int = _json("int", 2**31 - 1, lo=1)

    @classmethod
    def _read_first(cls, r, d, p):
        raw = r.obj(d.get("stages"), f"{p}.stages")
        if not raw:
            r.fail(f"{p}.stages", "expected at least one stage")
        return {"stages": MappingProxyType({r.str(k, f"{p}.stages key"): CoreMLStage.read(r, v, f"{p}.stages.{k}")
                                            for k, v in raw.items()})}


@dataclass(frozen=True, kw_only=True)
class OrtInfo(Node):
    """ORT-format graphs: the operator configuration a reduced onnxruntime build takes (``--include_ops_by_config``),
    how the graphs were optimized before saving, and the operator set (``{"domain;opset": [ops]}``, informational)."""

    required_operators: str = _json("path")
    optimization_level: str | None = _json("str", None)
    optimization_style: str | None = _json("str", None)
    onnxruntime: str | None = _json("str", None)
    operators: Mapping[str, Any] | None = _json("free", None)
    seconds: float | None = _json("float", None)


@dataclass(frozen=True, kw_only=True)
class FusedGraph(Node):
    """A fused rerank graph (``edge-sel fuse``): the whole early-ranking call in one ONNX file, composed from the
    bundle's graphs, reading its weights as external data from the bundle files ``reads``; ``schedule`` is the
    schedule compiled into it (null: no pruning) and ``top_k`` the K it protects."""

    file: str = _json("path")
    inputs: tuple[str, ...] = _json("list", of="str", nonempty=True)
    outputs: tuple[str, ...] = _json("list", of="str", nonempty=True)
    reads: tuple[str, ...] = _json("list", (), of="path")
    top_k: int | None = _json("int", None, lo=1)
    schedule: Mapping[str, Any] | None = _json("free", None)
    groups: int | None = _json("int", None, lo=1)
    onnxruntime: str | None = _json("str", None)
    seconds: float | None = _json("float", None)
