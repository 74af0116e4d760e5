"""The generate form of split decoder layers: ONNX rewrites of the ``qkv`` + ``attn`` graphs a generate bundle runs.

The exporter writes the attn graphs in the grouped form (a kv head's G query heads are the G*T rows of one product
with its cached keys and values, so a decode step reads the cache once); :class:`GenerateForm` then replaces their
attention core by one built from constant shapes (:func:`generate_attention_core`) and rotates q and k in the qkv
graphs with com.microsoft RotaryEmbedding nodes (:func:`edge_sel.export.prefix_layers.fuse_rerank_qkv`) fed by
rotary tables and reshapes built from constant shapes (:func:`compact_generate_qkv`): a decode step runs every layer's
two graphs once per token, so each node dropped is dropped 60 times per token. Inputs, outputs
and weights are those of :mod:`edge_sel.export.adapters.decoder_graphs`, so the runtime is the same for every form.
Bundles exported before (the broadcast attention form, the op-by-op rotary) are brought to this form by
:func:`edge_sel.export.passes.upgrade.upgrade_generate_bundle`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import prefix_layers as pl
from .graph_index import graph_index

log = logging.getLogger("edge_sel")


class GenerateForm:
    """Rewrites each written layer's qkv graph; after the first graph whose pattern is not recognised, the remaining
    ones stay as exported (correct, only slower) and ``layer_io`` does not claim the RotaryEmbedding form."""

    def __init__(self, dims: dict):
        self.dims = dims
        self.rotary = self.core = self.compact = True

    def rewrite(self, attn_path: Path, qkv_path: Path | None) -> None:
        if self.core:  # False after a graph whose pattern is not recognised: the rest stay as exported
            self.core = pl.rewrite_file(attn_path, "attn", lambda m: generate_attention_core(m, *pl.heads_of(self.dims)),
                                        self.dims)
        if self.rotary and qkv_path is not None:
            self.rotary = pl.fuse_qkv_file(qkv_path, self.dims)
        if self.rotary and self.compact and qkv_path is not None:
            self.compact = pl.rewrite_file(qkv_path, "qkv", compact_generate_qkv, self.dims)

    def layer_io(self, io: dict) -> dict:
        return {**io, "qkv_rotary": "RotaryEmbedding"} if self.rotary else io


def group_generate_attention(model, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Rewrite a generate attn graph exported in the broadcast form into the grouped form, in place. The broadcast
    form multiplies queries ``[B,kv,G,T,D]`` by ``Unsqueeze(k_cache)`` / ``Unsqueeze(v_cache)`` broadcast over the G
    query heads of a kv head, so onnxruntime reads every cached key and value G times per call; the grouped form
    multiplies a kv head's G*T query rows by its keys and values in one product each. Both products keep their
    output shapes (``[B,kv,G,T,S]`` and ``[B,kv,G,T,D]``), so the mask, softmax, policy outputs and o_proj are
    untouched. Returns True when the graph changed (False: already grouped, or no grouping: ``heads == kv_heads``)."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    if any(n.name == "gm_softmax" for n in g.node):  # the constant-shape core: broadcast on purpose (one-row products)
        return False
    G, D = heads // kv_heads, head_dim
    producer = {o: n for n in g.node for o in n.output}

    def broadcast_of(name: str, cache: str) -> bool:
        """``name`` is ``Unsqueeze(cache)`` or ``Transpose(Unsqueeze(cache))``."""
        n = producer.get(name)
        if n is not None and n.op_type == "Transpose":
            n = producer.get(n.input[0])
        return n is not None and n.op_type == "Unsqueeze" and n.input[0] == cache

    qk = [n for n in g.node if n.op_type == "MatMul" and broadcast_of(n.input[1], "k_cache")]
    pv = [n for n in g.node if n.op_type == "MatMul" and broadcast_of(n.input[1], "v_cache")]
    if not qk:  # keys already grouped (the values may be a broadcast view: the current core's P·V)
        return False
    if len(qk) != 1 or len(pv) != 1:
        raise ValueError("attn graph: expected one broadcast Q·K and one broadcast P·V MatMul")
    qk, pv = qk[0], pv[0]
    q_in = producer.get(qk.input[0])
    if q_in is None or q_in.op_type != "Reshape" or q_in.input[0] != "q":
        raise ValueError("attn graph: the broadcast Q·K does not read Reshape(q)")
    mk = helper.make_node
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr, dtype=np.int64), name)  # noqa: E731
    inits = [c("gg_q4", [0, kv_heads, -1, D]), c("gg_s5", [0, kv_heads, G, -1]), c("gg_p4", [0, kv_heads, -1]),
             c("gg_o5", [0, kv_heads, G, -1, D]), c("gg_two", [2]), c("gg_three", [3])]
    core = [mk("Shape", ["k_cache"], ["gg_kshape"]),
            mk("Slice", ["gg_kshape", "gg_two", "gg_three"], ["gg_S"]),                   # [S]
            mk("Concat", ["gg_s5", "gg_S"], ["gg_s5_shape"], axis=0),                     # [B,kv,G,T,S]
            mk("Concat", ["gg_p4", "gg_S"], ["gg_p4_shape"], axis=0),                     # [B,kv,G*T,S]
            mk("Reshape", ["q", "gg_q4"], ["gg_q"]),                                      # [B,kv,G*T,D]: head h = kv*G + g
            mk("Transpose", ["k_cache"], ["gg_kt"], perm=[0, 1, 3, 2]),
            mk("MatMul", ["gg_q", "gg_kt"], ["gg_scores"]),
            mk("Reshape", ["gg_scores", "gg_s5_shape"], [qk.output[0]])]
    pv_nodes = [mk("Reshape", [pv.input[0], "gg_p4_shape"], ["gg_p"]),
                mk("MatMul", ["gg_p", "v_cache"], ["gg_o"]),
                mk("Reshape", ["gg_o", "gg_o5"], [pv.output[0]])]
    i = list(g.node).index(qk)
    g.node.remove(qk)
    pl.insert_nodes(g, i, core, inits)
    j = list(g.node).index(pv)
    g.node.remove(pv)
    pl.insert_nodes(g, j, pv_nodes, [])
    pl.prune_dead(g, [o.name for o in g.output])
    return True


def _changed_attn_file(path: Path, dims: dict, rewrite) -> bool:
    """Apply ``rewrite(model, heads, kv_heads, head_dim) -> changed`` to one attn graph file in place (checked,
    :func:`edge_sel.export.prefix_layers.rewrite_file`). True when the file changed."""
    changed = []

    def apply(m):
        changed.append(rewrite(m, *pl.heads_of(dims)))
        return changed[-1]
    return pl.rewrite_file(path, "attn", apply, dims) and bool(changed and changed[-1])


def group_attn_file(path: Path, dims: dict) -> bool:
    """Rewrite one generate attn graph from the broadcast form into the grouped form in place. True when it changed."""
    return _changed_attn_file(path, dims, group_generate_attention)


def merge_graph_file(src: Path, src_data: Path | None, dst: Path, kind: str, dims: dict) -> bool:
    """Write the ``kind`` (``qkv`` / ``attn``) graph ``src`` to ``dst`` (weights beside it under ``src_data``'s name) with its block-quantized matrices that read
    the same activation merged (:func:`edge_sel.export.merge_nbits.merge_shared_input`), checked against ``src`` on
    sample inputs. False (nothing written) when there is nothing to merge or the check fails."""
    import os
    import tempfile

    import onnx

    from .merge_nbits import merge_shared_input
    from .passes.weights import load_graph

    if b"MatMulNBits" not in src.read_bytes():
        return False
    with tempfile.TemporaryDirectory(prefix=".edge_sel_merge_", dir=dst.parent) as tmp:  # renamed into place: same fs
        model = load_graph(src, src_data, Path(tmp))
        if not merge_shared_input(model):
            return False
        out = Path(tmp) / "out"
        out.mkdir()
        data = src_data.name if src_data is not None else None
        if data:
            onnx.save_model(model, str(out / src.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data, size_threshold=1024, convert_attribute=False)
        else:
            onnx.save_model(model, str(out / src.name))
        diff = pl.check_same(src, out / src.name, pl.sample_feeds(kind, dims))
        if not diff <= pl.CHECK_TOL:
            return False
        os.replace(out / src.name, dst)  # new inodes: hard-linked copies keep the old files
        if data:
            os.replace(out / data, dst.with_name(data))
    return True


def forms_graph_file(path: Path, data: Path | None, kind: str, dims: dict) -> bool:
    """Rewrite the ``kind`` graph ``path`` (weights in ``data``) in place into the one-row ``MatMulNBits`` forms
    (:func:`edge_sel.export.nbits_forms.decode_forms`), checked against the old graph on sample inputs with every
    product at float activations (the rewrite is exact there; at int8 activations both round differently). False
    (nothing written) when there is nothing to rewrite or the check fails."""
    import copy
    import os
    import tempfile

    import onnx

    from .nbits_forms import decode_forms, with_float_activations
    from .passes.weights import load_graph

    if b"MatMulNBits" not in path.read_bytes():
        return False
    with tempfile.TemporaryDirectory(prefix=".edge_sel_forms_", dir=path.parent) as tmp:  # renamed into place: same fs
        old = load_graph(path, data, Path(tmp))
        model = copy.deepcopy(old)
        if not decode_forms(model):
            return False
        saved = {}
        for name, m in (("out", model), ("old_float", with_float_activations(old)), ("new_float", with_float_activations(model))):
            d = Path(tmp) / name
            d.mkdir()
            if data is not None:
                onnx.save_model(m, str(d / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data.name, size_threshold=1024, convert_attribute=False)
            else:
                onnx.save_model(m, str(d / path.name))
            saved[name] = d / path.name
        diff = pl.check_same(saved["old_float"], saved["new_float"], pl.sample_feeds(kind, dims))
        if not diff <= pl.CHECK_TOL:
            log.warning("%s: the one-row forms differ by %.2e at float activations; keeping the graph as it is", path, diff)
            return False
        os.replace(saved["out"], path)  # new inodes: hard-linked copies keep the old files
        if data is not None:
            os.replace(saved["out"].with_name(data.name), data)
    return True


def generate_attention_core(model, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Replace the exported attention core of a generate attn graph (either form) by one built from constant shapes,
    in place: each query head's T rows (scaled) times its kv head's keys broadcast over the group, and the softmax times
    the kv head's values likewise — at decode one row per product, which onnxruntime multiplies row by row over the
    cache without first packing the keys or values into a panel (the cache is read from memory once per kv head, the
    group's other rows find it in cache) — the visibility rule ``key_pos <= position`` broadcast over the scores,
    softmax, the policy outputs reduced over the group and the rows, and the output laid back as ``[B,T,heads*D]`` for
    o_proj. The exported core reads every reshape target from the tensors' shapes at run time (~30 small nodes per
    layer per decoded token); this one has none of them. Inputs, outputs and numbers are the same. Returns False when
    the core is already this one; ``ValueError`` when the pattern is not found (the caller keeps the graph: correct, only slower)."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    if any(n.name == "gm_softmax" for n in g.node):  # this core; earlier ones ("ga_", "gb_" names) are rewritten like the exported
        return False
    producer, consumers, consts = graph_index(g)

    def reads(name: str, cache: str) -> bool:
        n = producer.get(name)
        return name == cache or (n is not None and n.op_type == "Unsqueeze" and n.input[0] == cache)

    pv = [n for n in g.node if n.op_type == "MatMul" and reads(n.input[1], "v_cache")]
    qk = [n for n in g.node if n.op_type == "MatMul" and producer.get(n.input[1]) is not None
          and producer[n.input[1]].op_type == "Transpose" and reads(producer[n.input[1]].input[0], "k_cache")]
    if len(pv) != 1 or len(qk) != 1:
        raise ValueError("attn graph: expected one Q·K and one P·V MatMul over the cache")
    t, chain = pv[0].output[0], []
    while len(consumers.get(t, [])) == 1 and consumers[t][0].op_type in ("Reshape", "Transpose"):
        chain.append(consumers[t][0])
        t = chain[-1].output[0]
    ops = [c.op_type for c in chain]
    if ops.count("Transpose") != 1 or ops[-1] != "Reshape":  # exported: Reshape/Transpose/Reshape into o_proj
        raise ValueError("attn graph: P·V is not followed by the heads' Reshape/Transpose/Reshape into o_proj")
    attn_flat = t
    scale, x = None, qk[0].output[0]
    for _ in range(3):  # the scaling Mul, after the reshape back to [B,kv,G,T,S] in a regrouped graph
        users = consumers.get(x, [])
        mul = [n for n in users if n.op_type == "Mul" and any(i in consts and consts[i].size == 1 for i in n.input)]
        if mul:
            scale = float(next(consts[i] for i in mul[0].input if i in consts and consts[i].size == 1).reshape(()))
            break
        if len(users) != 1 or users[0].op_type != "Reshape":
            break
        x = users[0].output[0]
    if scale is None:
        raise ValueError("attn graph: no score scaling after Q·K")
    G, D = heads // kv_heads, head_dim
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name)  # noqa: E731
    # the scaling as a [D] vector on q, not a scalar: onnxruntime would fold a scalar into the product's alpha, and
    # its one-row kernels (no packing of the keys) need alpha 1
    inits = [i64("gm_q5", [0, kv_heads, G, -1, D]), i64("gm_k_ax", [2, 3]), i64("gm_q_ax", [1, 2, 4]), i64("gm_ax2", [2]),
             i64("gm_rows", [2, 3]), i64("gm_heads", [0, heads, -1, D]), i64("gm_out", [0, 0, heads * D]),
             numpy_helper.from_array(np.full([D], scale, np.float32), "gm_scale"),
             numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "gm_minf")]
    mk = helper.make_node
    new = [mk("Reshape", ["q", "gm_q5"], ["gm_q"]),                                  # [B,kv,G,T,D]: head h = kv*G + g
           mk("Mul", ["gm_q", "gm_scale"], ["gm_qs"]),
           mk("Unsqueeze", ["k_cache", "gm_ax2"], ["gm_k"]),                         # [B,kv,1,S,D]
           mk("Transpose", ["gm_k"], ["gm_kt"], perm=[0, 1, 2, 4, 3]),
           mk("MatMul", ["gm_qs", "gm_kt"], ["gm_s"]),                               # [B,kv,G,T,S]
           mk("Unsqueeze", ["key_pos", "gm_k_ax"], ["gm_kpos"]),                     # [B,kv|1,1,1,S]
           mk("Unsqueeze", ["position_ids", "gm_q_ax"], ["gm_qpos"]),                # [B,1,1,T,1]
           mk("LessOrEqual", ["gm_kpos", "gm_qpos"], ["gm_vis"]),                    # [B,kv|1,1,T,S]
           mk("Where", ["gm_vis", "gm_s", "gm_minf"], ["gm_scores"]),
           mk("Softmax", ["gm_scores"], ["gm_p"], axis=-1, name="gm_softmax"),
           mk("ReduceSum", ["gm_p", "gm_rows"], ["attn_sum"], keepdims=0),           # [B,kv,S]
           mk("ReduceMax", ["gm_p"], ["attn_max"], axes=[2, 3], keepdims=0),            # (axes an attribute: opset 17)
           mk("Unsqueeze", ["v_cache", "gm_ax2"], ["gm_v"]),                         # [B,kv,1,S,D]
           mk("MatMul", ["gm_p", "gm_v"], ["gm_o"]),                                 # [B,kv,G,T,D]
           mk("Reshape", ["gm_o", "gm_heads"], ["gm_o_h"]),                          # [B,heads,T,D]
           mk("Transpose", ["gm_o_h"], ["gm_o_t"], perm=[0, 2, 1, 3]),
           mk("Reshape", ["gm_o_t", "gm_out"], [attn_flat + "_gm"])]                 # [B,T,heads*D]
    for n in g.node:
        for j, o in enumerate(n.output):
            if o in ("attn_sum", "attn_max"):
                n.output[j] = o + "_exported"
        for j, i in enumerate(n.input):
            if i == attn_flat:
                n.input[j] = attn_flat + "_gm"
    pl.insert_nodes(g, 0, new, inits)  # every input is a graph input or an initializer
    pl.prune_dead(g, [o.name for o in g.output])
    return True


def core_attn_file(path: Path, dims: dict) -> bool:
    """Give one generate attn graph file the constant-shape attention core in place. True when it changed."""
    return _changed_attn_file(path, dims, generate_attention_core)


def compact_generate_qkv(model) -> bool:
    """Give a qkv graph in the RotaryEmbedding form constant shapes, in place: the rotary tables, which the exported graph
    builds from ``position_ids`` through transformers' ~25-node expansion (shapes, ``Expand``, a one-column ``MatMul``,
    ``Transpose``), become ``cos/sin(position * inv_freq) * scaling`` for the call's tokens (the same float32 products,
    so the same values), and the q/k/v reshapes read constant targets (``[0, 0, heads, D]``) instead of the hidden
    state's shape at run time. A decode step runs every layer's qkv graph once per token, and these small nodes cost
    more than the projection itself there. Returns False when the graph already has this form; ``ValueError`` when the
    pattern is not found (the caller keeps the graph: correct, only slower)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    if any(n.name == "cq_angles" for n in g.node):
        return False
    producer, consumers, consts = graph_index(g)
    rot = [n for n in g.node if n.op_type == "RotaryEmbedding"]
    if not rot or any(list(n.input[1:]) != ["rq_tokpos", "rq_cos_cache", "rq_sin_cache"] for n in rot):
        raise ValueError("qkv graph: no RotaryEmbedding over the per-token tables")

    def table(name: str, op: str):
        """``name`` = Reshape(op(freqs) [* scalar constants, Casts]) -> (freqs, scaling)."""
        n, scale = producer.get(producer[name].input[0]), 1.0
        for _ in range(8):
            if n is None:
                break
            if n.op_type == op:
                return n.input[0], scale
            if n.op_type == "Mul":
                c = [consts[i] for i in n.input if i in consts and consts[i].size == 1]
                if len(c) != 1:
                    break
                scale *= float(c[0].reshape(()))
                n = producer.get(next(i for i in n.input if i not in consts))
            elif n.op_type == "Cast":
                n = producer.get(n.input[0])
            else:
                break
        raise ValueError(f"qkv graph: {name} is not {op}(freqs) times constants")

    (freqs, cos_scale), (freqs_s, sin_scale) = table("rq_cos_cache", "Cos"), table("rq_sin_cache", "Sin")
    if freqs != freqs_s:
        raise ValueError("qkv graph: cos and sin read different angles")

    def source(name: str):
        """Follow Cast/Expand/Unsqueeze/Transpose back from ``name``: a constant's value, or a graph input's name."""
        for _ in range(8):
            if name in consts:
                return consts[name]
            n = producer.get(name)
            if n is None:
                return name
            if n.op_type not in ("Cast", "Expand", "Unsqueeze", "Transpose"):
                return None
            name = n.input[0]
        return None

    t = producer.get(freqs)
    mm = producer.get(t.input[0]) if t is not None and t.op_type == "Transpose" else None
    if mm is None or mm.op_type != "MatMul" or list(t.attribute[0].ints) != [0, 2, 1]:
        raise ValueError("qkv graph: the rotary angles are not Transpose(MatMul(inv_freq, positions))")
    inv = source(mm.input[0])
    if not isinstance(inv, np.ndarray) or source(mm.input[1]) != "position_ids":
        raise ValueError("qkv graph: the rotary angles are not inv_freq times position_ids")
    inv = inv.astype(np.float32).reshape(1, -1)                                  # [1, D/2]
    mk = helper.make_node
    inits = [numpy_helper.from_array(inv, "cq_inv_freq"), numpy_helper.from_array(np.array([-1, 1], np.int64), "cq_col")]
    nodes = [mk("Cast", ["position_ids"], ["cq_pos"], to=TensorProto.FLOAT),      # [B,T]
             mk("Reshape", ["cq_pos", "cq_col"], ["cq_pos_col"]),                # [B*T,1]: row b*T + t, as rq_tokpos
             mk("Mul", ["cq_pos_col", "cq_inv_freq"], ["cq_angles"], name="cq_angles")]
    for fn, scale, old in (("Cos", cos_scale, "rq_cos_cache"), ("Sin", sin_scale, "rq_sin_cache")):
        out = "cq_" + fn.lower()
        nodes.append(mk(fn, ["cq_angles"], [out if scale == 1.0 else out + "0"]))
        if scale != 1.0:
            inits.append(numpy_helper.from_array(np.array(scale, np.float32), out + "_scale"))
            nodes.append(mk("Mul", [out + "0", out + "_scale"], [out]))
        for n in rot:
            n.input[list(n.input).index(old)] = out

    def dim_of_hidden(name: str):
        """``name`` = Unsqueeze(Gather(Shape(hidden), i)) -> i."""
        u = producer.get(name)
        ga = producer.get(u.input[0]) if u is not None and u.op_type == "Unsqueeze" else None
        sh = producer.get(ga.input[0]) if ga is not None and ga.op_type == "Gather" else None
        if sh is None or sh.op_type != "Shape" or sh.input[0] != "hidden" or ga.input[1] not in consts:
            return None
        return int(consts[ga.input[1]].reshape(()))

    for n in g.node:  # [B,T,heads*D] -> [B,T,heads,D] with B and T read from the hidden state at run time
        cat = producer.get(n.input[1]) if n.op_type == "Reshape" else None
        if cat is None or cat.op_type != "Concat" or len(cat.input) != 4:
            continue
        if [dim_of_hidden(i) for i in cat.input[:2]] != [0, 1] or any(i not in consts for i in cat.input[2:]):
            continue
        target = [0, 0] + [int(consts[i].reshape(())) for i in cat.input[2:]]
        name = f"cq_shape_{len(inits)}"
        inits.append(numpy_helper.from_array(np.array(target, np.int64), name))
        n.input[1] = name
    pl.insert_nodes(g, 0, nodes, inits)  # every input is a graph input or an initializer
    pl.prune_dead(g, [o.name for o in g.output])
    return True


def compact_qkv_file(path: Path, dims: dict) -> bool:
    """Give one generate qkv graph file (RotaryEmbedding form) constant shapes in place, checked. True when it changed."""
    changed = []

    def apply(m):
        changed.append(compact_generate_qkv(m))
        return changed[-1]
    return pl.rewrite_file(path, "qkv", apply, dims) and bool(changed and changed[-1])
