"""The rerank form of split decoder layers: ONNX rewrites of the ``qkv`` + ``attn`` graphs for prefix reuse.

A yes/no rerank bundle exported with ``prefix_reuse`` (the default for decoders) stores each layer as the
generation bundles' two graphs — ``qkv`` (norm, projections, rotary) and ``attn`` (attention over explicit K/V
inputs + MLP), built by :mod:`edge_sel.export.adapters.decoder_graphs` — so the runtime (:mod:`edge_sel.runtime.rerank.prefix`)
computes the instruction + query prefix once per query and lets every candidate attend to its K/V. The two graphs
hold disjoint weights: the bundle is no larger.

Both graphs are then rewritten into the rerank form (:data:`RERANK_FORM`; same inputs and outputs but the attn
graphs' policy outputs): the attn graphs keep only ``hidden_out`` and run their attention core as one
MultiHeadAttention node (:func:`fuse_rerank_attention`), the qkv graphs rotate q and k with RotaryEmbedding nodes
(:func:`fuse_rerank_qkv`). Every rewritten graph is checked against the exported one on sample inputs. The exporter
applies :class:`RerankForm` to each layer as it is written; bundles exported before are upgraded by
:func:`edge_sel.export.passes.upgrade.fuse_bundle_attention`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .graph_index import graph_index

log = logging.getLogger("edge_sel")


class RerankForm:
    """Rewrites each written layer into the rerank form; after the first graph whose pattern is not recognised, the
    remaining graphs of that kind stay as exported (correct, only slower) and ``layer_io`` says so."""

    def __init__(self, dims: dict):
        self.dims = dims
        self.fused = self.rotary = True

    def rewrite(self, attn_path: Path, qkv_path: Path | None) -> None:
        if self.fused:
            self.fused = fuse_attn_file(attn_path, self.dims)
        if self.rotary:
            self.rotary = fuse_qkv_file(qkv_path, self.dims)

    def layer_io(self, io: dict) -> dict:
        io = {**io}
        if self.fused:
            io["attn"] = {**io["attn"], "outputs": list(RERANK_ATTN_OUTPUTS)}
            io["attn_core"] = "MultiHeadAttention"
        if self.rotary:
            io["qkv_rotary"] = "RotaryEmbedding"
        if self.fused and self.rotary:
            io["rerank_form"] = RERANK_FORM
        return io


# The generation graphs' attention is written out op by op (MatMul, Where over [B,kv,G,T,S], Softmax, MatMul) and
# also returns attn_sum / attn_max for the KV policies. A reranker reads only hidden_out, and onnxruntime runs every
# node of a graph whatever outputs are requested; its Where over the full score tensor is single-threaded.
# ``fuse_rerank_attention`` rewrites an exported attn graph in place: the two policy outputs (and the reductions that
# feed them) go, and the attention core becomes one com.microsoft MultiHeadAttention node (multi-threaded, fused
# QK^T + bias + softmax + V) fed with an additive bias built from the same visibility rule (grouped-query attention:
# the node runs over the KV heads with each group's query heads stacked as rows, so K/V are not copied per query head;
# ``grouped=False`` builds the older core over copied K/V, kept for the upgrade tests).
# ``fuse_rerank_qkv`` replaces the qkv graphs' op-by-op rotary embedding (Slice/Neg/Concat/Mul/Add over q and k) by
# com.microsoft RotaryEmbedding nodes (rotate-half form, ``interleaved=0``, as Llama's rotate_half).
# Inputs and outputs are unchanged, so the runtime is the same for old and new bundles.
RERANK_ATTN_OUTPUTS = ["hidden_out"]
MS_DOMAIN = "com.microsoft"
RERANK_FORM = 4  # 1: attn core as MultiHeadAttention over K/V copied per query head; 2: core over the KV heads (grouped)
# + qkv RotaryEmbedding; 3: form 1's core + qkv RotaryEmbedding; 4: form 2's grouped core again (K/V read as stored)


def prune_dead(graph, keep: list[str]) -> None:
    """Drop the nodes (and the inline/external initializer entries) nothing in ``keep`` depends on."""
    need, nodes = set(keep), []
    for n in reversed(graph.node):
        if any(o in need for o in n.output):
            nodes.append(n)
            need.update(i for i in n.input if i)
    nodes.reverse()
    del graph.node[:]
    graph.node.extend(nodes)
    outs = [o for o in graph.output if o.name in keep]
    del graph.output[:]
    graph.output.extend(outs)
    inits = [i for i in graph.initializer if i.name in need]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _ms_opset(model) -> None:
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _attention_core(out: str, heads: int, kv_heads: int, head_dim: int, scale: float, grouped: bool = False):
    """Nodes + initializers computing the attention core of an attn graph from its inputs into ``out`` ([B,T,heads*D]).
    ``grouped=True`` (what the exporter writes, forms 2 and 4): the node over the KV heads, each group's G query heads
    stacked as G*T rows, K/V read as stored. ``grouped=False`` (forms 1 and 3): K/V copied per query head, the node
    over all heads; kept to build older graphs for the upgrade tests."""
    import numpy as np
    from onnx import helper, numpy_helper

    G, D = heads // kv_heads, head_dim
    mk = helper.make_node
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr), name)  # noqa: E731
    if not grouped and G > 1:
        inits = [c("rr_shape_q", np.array([0, 0, heads * D], np.int64)), c("rr_ax2", np.array([2], np.int64)),
                 c("rr_ax13", np.array([1, 3], np.int64)), c("rr_shape_kv", np.array([0, heads, -1, D], np.int64)),
                 c("rr_zero", np.array(0.0, np.float32)), c("rr_minf", np.array(np.finfo(np.float32).min, np.float32))]
        nodes = [mk("Transpose", ["q"], ["rr_q_t"], perm=[0, 2, 1, 3]), mk("Reshape", ["rr_q_t", "rr_shape_q"], ["rr_q"])]
        for name in ("k_cache", "v_cache"):  # [B,kv,S,D] -> [B,heads,S,D], query head h reads kv head h // G
            nodes += [mk("Unsqueeze", [name, "rr_ax2"], [f"rr_{name}_u"]),
                      mk("Concat", [f"rr_{name}_u"] * G, [f"rr_{name}_g"], axis=2),
                      mk("Reshape", [f"rr_{name}_g", "rr_shape_kv"], [f"rr_{name}_h"])]
        nodes += [mk("Unsqueeze", ["key_pos", "rr_ax2"], ["rr_kpos"]), mk("Unsqueeze", ["position_ids", "rr_ax13"], ["rr_qpos"]),
                  mk("LessOrEqual", ["rr_kpos", "rr_qpos"], ["rr_visible"]), mk("Where", ["rr_visible", "rr_zero", "rr_minf"], ["rr_bias"]),
                  mk("MultiHeadAttention", ["rr_q", "rr_k_cache_h", "rr_v_cache_h", "", "", "rr_bias"], [out],
                     domain=MS_DOMAIN, num_heads=heads, scale=scale)]
        return nodes, inits
    inits = [c("rg_qshape", np.array([0, kv_heads, -1, D], np.int64)), c("rg_qflat", np.array([0, 0, kv_heads * D], np.int64)),
             c("rg_ax2", np.array([2], np.int64)), c("rg_ax13", np.array([1, 3], np.int64)),
             c("rg_zero", np.array(0.0, np.float32)), c("rg_minf", np.array(np.finfo(np.float32).min, np.float32))]
    nodes = [mk("Reshape", ["q", "rg_qshape"], ["rg_q4"]),                      # [B,kv,G*T,D]: query head h = kv*G + g
             mk("Transpose", ["rg_q4"], ["rg_qt"], perm=[0, 2, 1, 3]),          # [B,G*T,kv,D]
             mk("Reshape", ["rg_qt", "rg_qflat"], ["rg_q"]),                    # [B,G*T,kv*D]
             mk("Unsqueeze", ["key_pos", "rg_ax2"], ["rg_kpos"])]               # [B,1,1,S]
    qpos = "position_ids"
    if G > 1:  # query row g*T + t has position t
        inits.append(c("rg_tile", np.array([1, G], np.int64)))
        nodes.append(mk("Tile", ["position_ids", "rg_tile"], ["rg_qpos_g"]))
        qpos = "rg_qpos_g"
    nodes += [mk("Unsqueeze", [qpos, "rg_ax13"], ["rg_qpos"]),                  # [B,1,G*T,1]
              mk("LessOrEqual", ["rg_kpos", "rg_qpos"], ["rg_visible"]),       # key j visible to row i: key_pos <= pos
              mk("Where", ["rg_visible", "rg_zero", "rg_minf"], ["rg_bias"]),
              mk("MultiHeadAttention", ["rg_q", "k_cache", "v_cache", "", "", "rg_bias"], ["rg_o" if G > 1 else out],
                 domain=MS_DOMAIN, num_heads=kv_heads, scale=scale)]
    if G > 1:  # [B,G*T,kv*D] -> [B,T,heads*D]
        inits += [c("rg_oshape", np.array([0, G, -1, kv_heads, D], np.int64)), c("rg_oflat", np.array([0, 0, heads * D], np.int64))]
        nodes += [mk("Reshape", ["rg_o", "rg_oshape"], ["rg_o5"]),              # [B,G,T,kv,D]
                  mk("Transpose", ["rg_o5"], ["rg_ot"], perm=[0, 2, 3, 1, 4]),  # [B,T,kv,G,D]
                  mk("Reshape", ["rg_ot", "rg_oflat"], [out])]
    return nodes, inits


def insert_nodes(graph, pos: int, nodes, inits) -> None:
    for k, n in enumerate(nodes):
        graph.node.insert(pos + k, n)
    graph.initializer.extend(inits)


def fuse_rerank_attention(model, heads: int, kv_heads: int, head_dim: int, grouped: bool = False) -> bool:
    """Rewrite an attn graph (``edge_sel.export.adapters.decoder_graphs.split_layer_graphs``, or an older rerank form) into the current
    rerank form, in place. Returns True when the graph changed (False: already in that form).
    Raises ``ValueError`` when the graph does not have the expected attention pattern
    (then the caller keeps the graph as it is: correct, only slower)."""
    g = model.graph
    mha = [n for n in g.node if n.domain == MS_DOMAIN and n.op_type == "MultiHeadAttention"]
    if mha:  # fused before: over K/V copied per query head (num_heads = heads) or over the KV heads (grouped)
        n = mha[0]
        nh = next(a.i for a in n.attribute if a.name == "num_heads")
        if len(mha) != 1 or nh not in (heads, kv_heads):
            raise ValueError("attn graph: unexpected MultiHeadAttention node(s)")
        if heads == kv_heads or nh == (kv_heads if grouped else heads):
            prune_dead(g, RERANK_ATTN_OUTPUTS)
            return False
        scale = next(a.f for a in n.attribute if a.name == "scale")
        pos = list(g.node).index(n)
        g.node.remove(n)
        out = n.output[0]
        if nh == kv_heads:  # the grouped core ends in Reshape/Transpose/Reshape back to [B,T,heads*D]: replace those too
            last = next((x for x in g.node if x.op_type == "Reshape" and x.input[0] == "rg_ot"), None)
            if last is None:
                raise ValueError("attn graph: the grouped attention core's output reshape is missing")
            out = last.output[0]
            g.node.remove(last)
        insert_nodes(g, pos, *_attention_core(out, heads, kv_heads, head_dim, scale, grouped))
        prune_dead(g, RERANK_ATTN_OUTPUTS)
        return True
    producer, consumers, consts = graph_index(g)

    def only(xs, what):
        if len(xs) != 1:
            raise ValueError(f"attn graph: expected one {what}, found {len(xs)}")
        return xs[0]

    # P·V: the MatMul whose second input is v_cache (grouped rows) or Unsqueeze(v_cache) (broadcast over the group)
    pv = only([n for n in g.node if n.op_type == "MatMul" and (n.input[1] == "v_cache" or (
               n.input[1] in producer and producer[n.input[1]].op_type == "Unsqueeze"
               and producer[n.input[1]].input[0] == "v_cache"))], "P·V MatMul")
    # follow the (Reshape, Transpose, Reshape) chain to the tensor o_proj multiplies: [B, T, heads*D]
    t, chain = pv.output[0], []
    while True:
        nxt = only(consumers.get(t, []), f"consumer of {t}")
        if nxt.op_type not in ("Reshape", "Transpose"):
            break
        chain.append(nxt)
        t = nxt.output[0]
    if nxt.op_type != "MatMul" or [c.op_type for c in chain] != ["Reshape", "Transpose", "Reshape"]:
        raise ValueError("attn graph: P·V is not followed by Reshape/Transpose/Reshape into o_proj")
    attn_flat = t
    softmax = only([n for n in g.node if n.op_type == "Softmax"], "Softmax")
    # the score scaling: Mul(QK^T, constant) upstream of the softmax
    scale = None
    x = softmax.input[0]
    for _ in range(4):
        n = producer[x]
        if n.op_type == "Mul" and any(i in consts and consts[i].size == 1 for i in n.input):
            scale = float(next(consts[i] for i in n.input if i in consts and consts[i].size == 1).reshape(()))
            break
        x = n.input[1] if n.op_type == "Where" else n.input[0]
    if scale is None:
        raise ValueError("attn graph: no score scaling found")
    for n in g.node:  # o_proj now reads the fused output
        for j, i in enumerate(n.input):
            if i == attn_flat:
                n.input[j] = attn_flat + "_mha"
    # insert before o_proj's MatMul (topological order: every input of the new nodes is a graph input)
    insert_nodes(g, list(g.node).index(nxt), *_attention_core(attn_flat + "_mha", heads, kv_heads, head_dim, scale, grouped))
    prune_dead(g, RERANK_ATTN_OUTPUTS)
    _ms_opset(model)
    return True


def fuse_rerank_qkv(model, head_dim: int) -> bool:
    """Replace the rotary embedding of a qkv graph (``edge_sel.export.adapters.decoder_graphs.split_layer_graphs``: transformers'
    ``q*cos + rotate_half(q)*sin``, the same for k) by com.microsoft RotaryEmbedding nodes, in place.

    The cos/sin tables stay the graph's own (transformers' values for the given ``position_ids``, scaling included),
    computed for half the head dimension and handed to the node as a per-token cache ``[B*T, D/2]`` indexed by the
    token's flat index. Returns True when the graph changed (False: already rewritten); ``ValueError`` when the
    pattern is not found (the caller keeps the graph: correct, only slower)."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    if any(n.domain == MS_DOMAIN and n.op_type == "RotaryEmbedding" for n in g.node):
        return False
    producer = {o: n for n in g.node for o in n.output}
    D = int(head_dim)

    def prod(name, op):
        n = producer.get(name)
        if n is None or n.op_type != op:
            raise ValueError(f"qkv graph: {name} is not produced by {op}")
        return n

    def rope_parts(out):
        """``out = x*cosU + Concat(Neg(Slice(x)), Slice(x))*sinU`` -> (the Add node, x, cos [B,T,D], sin [B,T,D])."""
        add = prod(out, "Add")
        muls = [prod(i, "Mul") for i in add.input]
        rot = [m for m in muls if any(producer.get(i) is not None and producer[i].op_type == "Concat" for i in m.input)]
        if len(rot) != 1:
            raise ValueError(f"qkv graph: no rotate_half term in {out}")
        m_sin = rot[0]
        m_cos = muls[1] if muls[0] is m_sin else muls[0]
        cat_in = next(i for i in m_sin.input if producer.get(i) is not None and producer[i].op_type == "Concat")
        sin_u = next(i for i in m_sin.input if i != cat_in)
        cat = producer[cat_in]
        neg = prod(cat.input[0], "Neg")
        s1, s2 = prod(neg.input[0], "Slice"), prod(cat.input[1], "Slice")
        x = s1.input[0]
        if s2.input[0] != x or x not in m_cos.input or len(cat.input) != 2:
            raise ValueError(f"qkv graph: {out} is not x*cos + rotate_half(x)*sin")
        cos_u = next(i for i in m_cos.input if i != x)
        return add, x, prod(cos_u, "Unsqueeze").input[0], prod(sin_u, "Unsqueeze").input[0]

    parts = [rope_parts(o) for o in ("q", "k")]
    cos_t, sin_t = parts[0][2], parts[0][3]
    if (parts[1][2], parts[1][3]) != (cos_t, sin_t):
        raise ValueError("qkv graph: q and k use different rotary tables")

    def halve(t, op):
        """Make the table ``t`` [B,T,D] hold only its first half: transformers builds it as op(cat(f, f)) (then scaling and
        casts), so op is pointed at f; otherwise a Slice."""
        n = producer.get(t)
        for _ in range(6):
            if n is None:
                break
            if n.op_type == op:
                src = producer.get(n.input[0])
                if src is not None and src.op_type == "Concat" and len(src.input) == 2 and src.input[0] == src.input[1]:
                    n.input[0] = src.input[0]
                    return t, []
                break
            if n.op_type not in ("Cast", "Mul"):
                break
            n = producer.get(n.input[0])
        return t + "_half", [helper.make_node("Slice", [t, "rq_zero1", "rq_half1", "rq_last1"], [t + "_half"])]

    mk = helper.make_node
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr), name)  # noqa: E731
    inits = [c("rq_cache_shape", np.array([-1, D // 2], np.int64)), c("rq_zero1", np.array([0], np.int64)),
             c("rq_half1", np.array([D // 2], np.int64)), c("rq_last1", np.array([-1], np.int64)),
             c("rq_i0", np.array(0, np.int64)), c("rq_i1", np.array(1, np.int64))]
    cos_h, cos_nodes = halve(cos_t, "Cos")
    sin_h, sin_nodes = halve(sin_t, "Sin")
    nodes = cos_nodes + sin_nodes + [
        mk("Reshape", [cos_h, "rq_cache_shape"], ["rq_cos_cache"]),      # [B*T, D/2]: row b*T + t
        mk("Reshape", [sin_h, "rq_cache_shape"], ["rq_sin_cache"]),
        mk("Shape", ["position_ids"], ["rq_pshape"]),
        mk("ReduceProd", ["rq_pshape"], ["rq_ntok"], keepdims=0),
        mk("Range", ["rq_i0", "rq_ntok", "rq_i1"], ["rq_flat"]),
        mk("Reshape", ["rq_flat", "rq_pshape"], ["rq_tokpos"]),           # token (b, t) reads cache row b*T + t
    ]
    first = min(list(g.node).index(p[0]) for p in parts)
    for add, x, _, _ in parts:  # the Add that produced q / k becomes the rotary node (same output name)
        add.op_type, add.domain = "RotaryEmbedding", MS_DOMAIN
        del add.input[:]
        add.input.extend([x, "rq_tokpos", "rq_cos_cache", "rq_sin_cache"])
        add.attribute.extend([helper.make_attribute("interleaved", 0)])
    insert_nodes(g, first, nodes, inits)
    prune_dead(g, [o.name for o in g.output])
    _ms_opset(model)
    return True


def check_same(old: Path, new: Path, feeds: dict) -> float:
    """Max |difference| of the outputs of two graphs (onnxruntime, as the runtime loads them) on ``feeds``, relative
    to the outputs' magnitude."""
    import numpy as np

    from edge_sel.runtime.sessions import load_session

    a = load_session(old).run(None, feeds)
    b = load_session(new).run(None, feeds)
    return max(float(np.max(np.abs(x - y))) / max(1.0, float(np.max(np.abs(x)))) for x, y in zip(a, b))


def sample_feeds(kind: str, dims: dict) -> dict:
    import numpy as np

    from edge_sel.runtime.manifest import EMPTY_POS

    H, heads = int(dims["hidden"]), int(dims["heads"])
    kv, D = int(dims.get("kv_heads") or heads), int(dims.get("head_dim") or H // heads)
    r = np.random.default_rng(0)
    B, T, P = 2, 5, 4
    pos = np.stack([np.arange(P, P + T), np.arange(T) + 1]).astype(np.int64)
    if kind == "qkv":
        return {"hidden": r.standard_normal((B, T, H)).astype(np.float32), "position_ids": pos}
    key_pos = np.concatenate([np.broadcast_to(np.arange(P), (B, P)), pos], 1).copy()
    key_pos[1, -1] = EMPTY_POS
    return {"hidden": r.standard_normal((B, T, H)).astype(np.float32), "q": r.standard_normal((B, heads, T, D)).astype(np.float32),
            "k_cache": r.standard_normal((B, kv, P + T, D)).astype(np.float32),
            "v_cache": r.standard_normal((B, kv, P + T, D)).astype(np.float32),
            "key_pos": key_pos[:, None, :], "position_ids": pos}


CHECK_TOL = 1e-4


def rewrite_file(path: Path, kind: str, rewrite, dims: dict) -> bool:
    """Apply ``rewrite(model) -> changed`` to one graph file in place (its external weight file untouched) after checking
    that the new graph computes the same outputs on sample inputs. False if the pattern was not found or the check
    failed (the file is then left as it was); True when the file is in the new form."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    try:
        if not rewrite(model):
            return True
    except ValueError as e:
        log.warning("%s: keeping the %s graph as it is (%s)", path, kind, e)
        return False
    tmp = path.with_name(path.name + ".tmp")  # beside the original: the external weights resolve the same
    try:
        onnx.save_model(model, str(tmp))
        diff = check_same(path, tmp, sample_feeds(kind, dims))
        if not diff <= CHECK_TOL:
            log.warning("%s: the rewritten %s graph differs by %.2e; keeping the graph as it is", path, kind, diff)
            return False
        os.replace(tmp, path)  # a new inode: hard-linked copies of the bundle keep the old graph
    finally:
        if tmp.exists():
            tmp.unlink()
    return True


def heads_of(dims: dict) -> tuple[int, int, int]:
    heads = int(dims["heads"])
    return heads, int(dims.get("kv_heads") or heads), int(dims.get("head_dim") or dims["hidden"] // heads)


def fuse_attn_file(path: Path, dims: dict) -> bool:
    """Rewrite one attn graph file into the rerank form in place. False if the pattern was not found."""
    return rewrite_file(path, "attn", lambda m: fuse_rerank_attention(m, *heads_of(dims), grouped=True), dims)


def fuse_qkv_file(path: Path, dims: dict) -> bool:
    """Rewrite one qkv graph file's rotary embedding in place. False if the pattern was not found."""
    return rewrite_file(path, "qkv", lambda m: fuse_rerank_qkv(m, heads_of(dims)[2]), dims)
