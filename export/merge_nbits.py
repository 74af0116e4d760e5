"""Merge the block-quantized matrices that read the same activation into one product (q/k/v; the MLP's gate/up).

A decode step multiplies one row by each matrix; for such a product onnxruntime's ``MatMulNBits`` costs a fixed
dispatch on top of its weight bytes, and a GGUF Q4_1 matrix adds a block-minimum term (``MatMul`` + ``Add``, see
:mod:`edge_sel.export.gguf_blocks`). Matrices with the same input, ``K``, bit width, block size and accuracy level
become one ``MatMulNBits`` over their concatenated columns (codes, scales, zero points and minimums are per column,
so concatenating them is exact: the same blocks, the same numbers) followed by a ``Split`` back to each output.
"""

from __future__ import annotations

import numpy as np


def _attr(node, name: str):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def merge_shared_input(model) -> int:
    """Rewrite ``model`` in place; returns how many ``MatMulNBits`` nodes were merged away."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}

    def min_term(n):
        """The Q4_1 block-minimum term added to ``n``'s output: (Add, MatMul(sums, Cast(mins16)), Cast) or None."""
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            return None
        add = users[0]
        other = producer.get(add.input[1] if add.input[0] == n.output[0] else add.input[0])
        if other is None or other.op_type != "MatMul":
            return None
        cast = producer.get(other.input[1])
        if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits:
            return None
        if len(consumers.get(cast.output[0], [])) != 1 or len(consumers.get(other.output[0], [])) != 1:
            return None
        return add, other, cast

    groups: dict[tuple, list] = {}
    for n in g.node:
        if n.op_type != "MatMulNBits" or any(i not in inits for i in n.input[1:] if i) or len(n.input) > 4:
            continue
        if len(n.input) == 4 and not n.input[3]:
            continue
        term = min_term(n)
        key = (n.input[0], _attr(n, "K"), _attr(n, "bits"), _attr(n, "block_size"), _attr(n, "accuracy_level"),
               len(n.input), term is not None, term[1].input[0] if term else None)
        groups.setdefault(key, []).append((n, term))
    merged = 0
    for key, members in groups.items():
        if len(members) < 2:
            continue
        first = members[0][0]
        name = first.name + "_merged"
        arr = lambda i, n: numpy_helper.to_array(inits[n.input[i]])  # noqa: E731
        cols = [_attr(n, "N") for n, _ in members]
        new_inits = [numpy_helper.from_array(np.concatenate([arr(1, n) for n, _ in members], 0), name + "_Q"),
                     numpy_helper.from_array(np.concatenate([arr(2, n) for n, _ in members], 0), name + "_scales")]
        ins = [first.input[0], name + "_Q", name + "_scales"]
        if len(first.input) == 4:
            new_inits.append(numpy_helper.from_array(np.concatenate([arr(3, n) for n, _ in members], 0), name + "_zp"))
            ins.append(name + "_zp")
        new_inits.append(numpy_helper.from_array(np.array(cols, dtype=np.int64), name + "_split"))
        y = name + "_y"
        level = {} if key[4] is None else {"accuracy_level": key[4]}
        nodes = [helper.make_node("MatMulNBits", ins, [y + ("_nbits" if key[6] else "")], name=name, domain="com.microsoft",
                                  K=key[1], N=int(sum(cols)), bits=key[2], block_size=key[3], **level)]
        outs = [n.output[0] for n, _ in members]
        if key[6]:  # one block-minimum term over the concatenated minimums [K/block, N]
            casts = [t[2] for _, t in members]
            mins = np.concatenate([numpy_helper.to_array(inits[c.input[0]]) for c in casts], axis=1)
            new_inits.append(numpy_helper.from_array(mins, name + "_mins16"))
            nodes += [helper.make_node("Cast", [name + "_mins16"], [name + "_mins"], to=_attr(casts[0], "to"),
                                       name=name + "_mins_cast"),
                      helper.make_node("MatMul", [key[7], name + "_mins"], [y + "_min"], name=name + "_min"),
                      helper.make_node("Add", [y + "_nbits", y + "_min"], [y], name=name + "_add_min")]
            outs = [t[0].output[0] for _, t in members]
        nodes.append(helper.make_node("Split", [y, name + "_split"], outs, axis=-1, name=name + "_split"))
        dead = {id(n) for n, _ in members} | {id(x) for _, t in members if t for x in t}
        keep = [n for n in g.node if id(n) not in dead]
        del g.node[:]
        g.node.extend(topological_order(keep + nodes, {i.name for i in g.input} | set(inits) | set(new_i.name for new_i in new_inits)))
        g.initializer.extend(new_inits)
        inits.update({t.name: t for t in new_inits})
        merged += len(members) - 1
    if merged:
        used = {i for n in g.node for i in n.input}
        keep_inits = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep_inits)
    return merged


def topological_order(nodes: list, available: set[str]) -> list:
    """``nodes`` in an order where every input is produced before it is read (stable: the given order otherwise)."""
    done, out, pending = set(available) | {""}, [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in done for i in n.input):
                out.append(n)
                done.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("graph has a cycle or an input nothing produces")
        pending = rest
    return out
