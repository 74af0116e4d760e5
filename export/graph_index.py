"""Who makes and who reads each tensor of an ONNX graph: the index the graph rewrites of :mod:`edge_sel.export` walk."""

from __future__ import annotations


def graph_index(graph) -> tuple[dict, dict, dict]:
    """``(producer, consumers, constants)`` of a graph: the node making each tensor, the nodes reading it, and the
    value of each inline initializer or Constant node."""
    from onnx import TensorProto, numpy_helper

    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.data_location != TensorProto.EXTERNAL}
    for n in graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return producer, consumers, consts
