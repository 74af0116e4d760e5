"""Composing one ONNX graph out of a bundle's own graphs: a node/initializer accumulator and graph inlining.

A bundle graph (a layer, a qkv graph, the head) is copied in node for node: its nodes and intermediate tensors are
renamed under a *scope* (one per use), its initializers under the graph's file, so a graph used twice — a decoder
layer on the shared prompt prefix and on the documents, the head on an intermediate layer and at the end — shares
its weights. An external initializer keeps pointing at the bundle's own weights file (its ``location`` rewritten
relative to the fused graph, which lives in the bundle's root), so no weight is copied: onnxruntime maps them from
the same files the per-layer runtime reads. Raw arrays (the embedding table, BERT's embedding parts, the probe)
become external initializers over their ``.bin`` files in the same way, since a raw array is exactly ONNX's external
data layout (little-endian, C order, no header).
"""

from __future__ import annotations

import posixpath
from typing import Sequence

import numpy as np

from edge_sel.runtime.errors import InputError

OPSET = 17             # the bundle graphs' default-domain opset
IR_VERSION = 8

_ONNX_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7, "float16": 10,
               "float64": 11, "uint32": 12, "uint64": 13, "bool": 9}


def onnx_type(dtype: str) -> int:
    """The ``TensorProto`` element type of a numpy dtype name."""
    return _ONNX_TYPES[str(np.dtype(dtype))]


class Net:
    """An ONNX graph under construction: ``op`` adds a node and returns its output name(s); ``const`` adds a small
    constant (deduplicated); ``external`` an initializer whose data stays in a bundle file."""

    def __init__(self):
        from onnx import helper

        self.helper = helper
        self.nodes: list = []
        self.inits: dict[str, object] = {}
        self.opsets: dict[str, int] = {"": OPSET}
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self.reads: set[str] = set()   # bundle files the graph reads as external data

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", hint: str | None = None, **attrs):
        outs = [self.fresh(hint or op_type) for _ in range(outputs)]
        kw = {"domain": domain} if domain else {}
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=self.fresh("node_" + op_type), **kw, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype: str = "int64") -> str:
        from onnx import numpy_helper

        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.inits[name] = numpy_helper.from_array(arr, name)
            self._consts[key] = name
        return self._consts[key]

    def external(self, name: str, dtype: str, shape: Sequence[int], location: str, offset: int = 0,
                 length: int | None = None) -> str:
        """An initializer ``name`` read from the bundle file ``location`` (bundle-relative)."""
        from onnx import TensorProto

        if name in self.inits:
            return name
        t = TensorProto()
        t.name = name
        t.data_type = onnx_type(dtype)
        t.dims.extend(int(d) for d in shape)
        t.data_location = TensorProto.EXTERNAL
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize if length is None else int(length)
        for k, v in (("location", location), ("offset", str(int(offset))), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits[name] = t
        self.reads.add(location)
        return name

    def use_opsets(self, opset_import) -> None:
        for o in opset_import:
            domain = "" if o.domain in ("", "ai.onnx") else o.domain
            if domain == "" and o.version > OPSET:
                raise InputError(f"a bundle graph uses default-domain opset {o.version}; fused graphs are built at opset {OPSET}")
            self.opsets[domain] = max(self.opsets.get(domain, 0), o.version)

    def model(self, inputs: list, outputs: list, name: str = "edge_sel_fused", doc: str = ""):
        """The finished ``ModelProto`` (``inputs``/``outputs``: ``ValueInfoProto`` from :func:`value_info`)."""
        h = self.helper
        graph = h.make_graph(self.nodes, name, inputs, outputs, initializer=list(self.inits.values()))
        opsets = [h.make_opsetid(d, v) for d, v in sorted(self.opsets.items())]
        m = h.make_model(graph, opset_imports=opsets, producer_name="edge_sel", doc_string=doc)
        m.ir_version = IR_VERSION
        return m


def value_info(name: str, dtype: str, shape: Sequence[str | int]):
    from onnx import helper

    return helper.make_tensor_value_info(name, onnx_type(dtype), list(shape))


class Inliner:
    """Copies bundle graphs into a :class:`Net`; each graph file is parsed once (without its weights)."""

    def __init__(self, bundle, net: Net):
        self.bundle = bundle
        self.net = net
        self._models: dict[str, object] = {}

    def _load(self, rel: str):
        import onnx

        if rel not in self._models:
            m = onnx.load(str(self.bundle.path(rel)), load_external_data=False)
            self.net.use_opsets(m.opset_import)
            self._models[rel] = m
        return self._models[rel]

    def __call__(self, rel: str, scope: str, feeds: dict[str, str]) -> dict[str, str]:
        """Add the graph at bundle path ``rel`` with its inputs bound to ``feeds``; returns its outputs' names."""
        from onnx import AttributeProto, NodeProto, TensorProto

        g = self._load(rel).graph
        wscope = rel.rsplit(".", 1)[0]  # weights are named after their graph file: shared by every use of it
        base = posixpath.dirname(rel)
        names: dict[str, str] = {}
        for init in g.initializer:
            new = f"{wscope}/{init.name}"
            names[init.name] = new
            if new in self.net.inits:
                continue
            t = TensorProto()
            t.CopyFrom(init)
            t.name = new
            for e in t.external_data:
                if e.key == "location":
                    e.value = posixpath.normpath(posixpath.join(base, e.value))
                    self.net.reads.add(e.value)
            self.net.inits[new] = t
        for inp in g.input:
            if inp.name in names:
                continue
            if inp.name not in feeds:
                raise InputError(f"{self.bundle.root}: graph {rel} needs an input {inp.name!r} the fused graph does not provide")
            names[inp.name] = feeds[inp.name]
        for k, node in enumerate(g.node):
            if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
                raise InputError(f"{self.bundle.root}: graph {rel} has control flow ({node.op_type}); it cannot be fused")
            n = NodeProto()
            n.CopyFrom(node)
            n.name = f"{scope}/{node.name or node.op_type + str(k)}"
            for i, x in enumerate(n.input):
                if x:
                    n.input[i] = names[x]
            for i, x in enumerate(n.output):
                if x:
                    names[x] = n.output[i] = f"{scope}/{x}"
            self.net.nodes.append(n)
        return {o.name: names[o.name] for o in g.output}
