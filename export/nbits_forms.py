"""Decode-speed forms of block-quantized matrices: the same weights and the same products, laid out for
onnxruntime's fast one-row ``MatMulNBits`` kernels.

* **Symmetric codes** (:func:`symmetric_offsets`). A GGUF Q4_1 block (``x = d * q + m``) is kept as zero point 0
  plus a block-minimum term (:mod:`edge_sel.export.gguf_blocks`). With the zero-point input removed the kernel reads
  the codes with its default zero point 8 (``d * (q - 8)``), and the term's minimums become ``m + 8 * d``, which
  the graph computes from the stored float16 minimums and the stored scales (constants, folded once when the session
  loads them). Same codes, scales and minimums on disk; ``d * (q - 8) + (m + 8d) = d * q + m``. onnxruntime's CPU
  kernels have a dedicated one-row path for symmetric blocks with int8 activations (faster, and closer to the float
  product than its zero-point path).
* **Float activations as two int8 rows** (:func:`split_float_activations`; no longer applied, and undone in older
  bundles by :func:`join_float_activations`). A product kept at float activations (``accuracy_level`` 0, the MLP's
  down projection) can instead run as one ``accuracy_level`` 4 product over two rows: each 32-value block of ``x``
  rounded to the kernel's int8 grid (``s = max|x| / 127``, ``x_q = round(x / s) * s``) and the remainder
  ``r = x - x_q``, ``W x = W x_q + W r`` (a residual two-term decomposition, cf. Dettmers et al., LLM.int8(), 2022).
  On AVX2 without VNNI that was faster than onnxruntime's float-activation kernel; on AVX-512 VNNI the float kernel
  on one row plus no helper nodes is faster at decode (0.93-0.95x the 30 attn graphs' time, SmolLM2 int4) and at
  prefill (one row per token instead of two), and it is the exact float product, so the one-row float form is kept.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32


def _attr(node, name: str):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _set_attr(node, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    from onnx import helper

    node.attribute.append(helper.make_attribute(name, value))


def _index(g):
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return {o: n for n in g.node for o in n.output}, consumers


def symmetric_offsets(model) -> int:
    """Rewrite every 4-bit ``MatMulNBits`` of ``model`` with all-zero zero points and a block-minimum term (``Add`` of
    ``MatMul(block sums, Cast(mins))``) into the symmetric form, in place. Returns how many were rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer, consumers = _index(g)
    nodes = list(g.node)
    count = 0
    for n in list(nodes):
        if (n.op_type != "MatMulNBits" or _attr(n, "bits") != 4 or len(n.input) != 4 or n.input[3] not in inits
                or n.input[2] not in inits):
            continue
        if numpy_helper.to_array(inits[n.input[3]]).any():
            continue
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        mm = producer.get(add.input[1] if add.input[0] == n.output[0] else add.input[0])
        cast = producer.get(mm.input[1]) if mm is not None and mm.op_type == "MatMul" else None
        if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits or _attr(cast, "to") != TensorProto.FLOAT:
            continue
        N, K = int(_attr(n, "N")), int(_attr(n, "K"))
        nb = -(-K // int(_attr(n, "block_size")))
        if tuple(inits[cast.input[0]].dims) != (nb, N) or len(consumers.get(cast.output[0], [])) != 1:
            continue
        base = cast.output[0]
        g.initializer.extend([numpy_helper.from_array(np.array([N, nb], np.int64), base + "_sym_shape"),
                              numpy_helper.from_array(np.array(8.0, np.float32), base + "_sym_eight")])
        extra = [helper.make_node("Reshape", [n.input[2], base + "_sym_shape"], [base + "_sym_d"], name=base + "_sym_d"),
                 helper.make_node("Transpose", [base + "_sym_d"], [base + "_sym_dt"], perm=[1, 0], name=base + "_sym_dt"),
                 helper.make_node("Mul", [base + "_sym_dt", base + "_sym_eight"], [base + "_sym_8d"], name=base + "_sym_8d"),
                 helper.make_node("Add", [base + "_sym_m", base + "_sym_8d"], [base], name=base + "_sym_add")]
        cast.output[0] = base + "_sym_m"
        nodes[nodes.index(cast) + 1:nodes.index(cast) + 1] = extra
        del n.input[3]
        count += 1
    if count:
        from .prefix_layers import prune_dead

        del g.node[:]
        g.node.extend(nodes)
        prune_dead(g, [o.name for o in g.output])  # the zero points are no longer read
    return count


# ops whose outputs have the rank of their (broadcast) inputs: enough to follow an activation through an MLP
_SAME_RANK = {"Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Relu", "Gelu", "FastGelu", "QuickGelu", "Erf", "Cast",
              "Split", "Neg", "Pow", "Sqrt", "Softmax", "MatMulNBits", "SimplifiedLayerNormalization",
              "SkipSimplifiedLayerNormalization", "LayerNormalization"}


def _ranks(model) -> dict[str, int]:
    """The rank of every value onnx's shape inference knows, followed through element-wise ops and ``MatMulNBits``
    (which onnx's inference does not know)."""
    import onnx

    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - from the graph inputs alone
        g = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info, *g.output]
             if v.type.tensor_type.HasField("shape")}
    for n in model.graph.node:
        if n.op_type in _SAME_RANK:
            known = [ranks[i] for i in (n.input[:1] if n.op_type == "MatMulNBits" else n.input) if i in ranks]
            if known:
                for o in n.output:
                    ranks.setdefault(o, max(known))
    return ranks


def split_float_activations(model) -> int:
    """Rewrite every symmetric 4-bit ``MatMulNBits`` of ``model`` at ``accuracy_level`` 0 (blocks of 32, input of known
    rank >= 2) as one ``accuracy_level`` 4 product over the rows ``[x_q; x - x_q]``, in place. Returns how many."""
    from onnx import helper, numpy_helper

    g = model.graph
    ranks = _ranks(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    nodes = list(g.node)
    count = 0
    mk = helper.make_node
    for n in list(nodes):
        if (n.op_type != "MatMulNBits" or _attr(n, "bits") != 4 or (_attr(n, "accuracy_level") or 0) != 0
                or _attr(n, "block_size") != BLOCK or (len(n.input) > 3 and n.input[3])):
            continue
        K, x, y = int(_attr(n, "K")), n.input[0], n.output[0]
        rank = ranks.get(x)
        if not rank or rank < 2 or K % BLOCK:
            continue
        p = f"{n.name or y}_rows_"
        lead = [0] * (rank - 1)
        consts = {"blocked": np.array(lead + [K // BLOCK, BLOCK], np.int64), "flat": np.array(lead + [K], np.int64),
                  "inv127": np.array(1 / 127, np.float32), "tiny": np.array(1e-30, np.float32)}
        g.initializer.extend(numpy_helper.from_array(v, p + k) for k, v in consts.items())
        row_axis = rank - 2
        split = (mk("Split", [p + "y2"], [p + "yq", p + "yr"], axis=row_axis, num_outputs=2) if opset >= 18
                 else mk("Split", [p + "y2"], [p + "yq", p + "yr"], axis=row_axis))
        before = [mk("Reshape", [x, p + "blocked"], [p + "xb"]), mk("Abs", [p + "xb"], [p + "abs"]),
                  mk("ReduceMax", [p + "abs"], [p + "amax"], axes=[-1], keepdims=1) if opset < 18 else
                  mk("ReduceMax", [p + "abs", p + "last"], [p + "amax"], keepdims=1),
                  mk("Mul", [p + "amax", p + "inv127"], [p + "s0"]), mk("Max", [p + "s0", p + "tiny"], [p + "s"]),
                  mk("Div", [p + "xb", p + "s"], [p + "xs"]), mk("Round", [p + "xs"], [p + "xr"]),
                  mk("Mul", [p + "xr", p + "s"], [p + "xqb"]), mk("Sub", [p + "xb", p + "xqb"], [p + "rb"]),
                  mk("Concat", [p + "xqb", p + "rb"], [p + "rows_b"], axis=row_axis),
                  mk("Reshape", [p + "rows_b", p + "flat"], [p + "rows"])]
        if opset >= 18:
            g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), p + "last"))
        for i, b in enumerate(before):
            b.name = p + str(i)
        n.input[0], n.output[0] = p + "rows", p + "y2"
        _set_attr(n, "accuracy_level", 4)
        after = [split, mk("Add", [p + "yq", p + "yr"], [y], name=p + "sum")]
        split.name = p + "split"
        i = nodes.index(n)
        nodes[i:i + 1] = before + [n] + after
        count += 1
    if count:
        del g.node[:]
        g.node.extend(nodes)
    return count


def with_float_activations(model):
    """A copy of ``model`` with every ``MatMulNBits`` at ``accuracy_level`` 0: the exact float product of its stored
    weights, to check a rewrite's arithmetic without the int8 rounding of the activations."""
    import copy

    m = copy.deepcopy(model)
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            _set_attr(n, "accuracy_level", 0)
    return m


def join_float_activations(model) -> int:
    """Undo :func:`split_float_activations` in place: every ``MatMulNBits`` over the rows ``[x_q; x - x_q]`` followed by
    ``Split`` + ``Add`` becomes one ``accuracy_level`` 0 product over ``x`` (the exact float product the split
    approximated). Returns how many were joined."""
    g = model.graph
    producer, consumers = _index(g)
    count = 0
    for n in list(g.node):
        if n.op_type != "MatMulNBits" or (_attr(n, "accuracy_level") or 0) != 4:
            continue
        flat = producer.get(n.input[0])
        cat = producer.get(flat.input[0]) if flat is not None and flat.op_type == "Reshape" else None
        if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
            continue
        sub = producer.get(cat.input[1])  # r = x_blocks - x_q
        if sub is None or sub.op_type != "Sub" or sub.input[1] != cat.input[0]:
            continue
        blocked = producer.get(sub.input[0])  # x_blocks = Reshape(x)
        if blocked is None or blocked.op_type != "Reshape":
            continue
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Split" or len(users[0].output) != 2:
            continue
        split = users[0]
        adds = consumers.get(split.output[0], [])
        if len(adds) != 1 or adds[0].op_type != "Add" or sorted(adds[0].input) != sorted(split.output):
            continue
        add = adds[0]
        n.input[0], n.output[0] = blocked.input[0], add.output[0]
        _set_attr(n, "accuracy_level", 0)
        g.node.remove(split)
        g.node.remove(add)
        count += 1
    if count:
        from .prefix_layers import prune_dead

        prune_dead(g, [o.name for o in g.output])  # the rows' helper nodes and constants are no longer read
    return count


def decode_forms(model) -> int:
    """The current one-row forms: the symmetric form of kept Q4_1 matrices, and products at float activations as one
    float row (an older bundle's two int8 rows joined back). Returns how many matrices changed form."""
    return symmetric_offsets(model) + join_float_activations(model)
