"""Split layer graphs for decoder rerank bundles (shared-prefix reuse, issue 3 item 3).

A yes/no rerank bundle exported with ``prefix_reuse`` (the default for decoders) stores each layer as
the generation bundles' two graphs — ``qkv`` (norm, projections, rotary) and ``attn`` (attention over
explicit K/V inputs + MLP) — built by :func:`edge_sel.export.generate.build_graphs`, so the runtime
(:mod:`edge_sel.runtime.prefix`) computes the instruction + query prefix once per query and lets every
candidate attend to its K/V. The two graphs hold disjoint weights: the bundle is no larger.

The attn graphs are then rewritten into a rerank form (:func:`fuse_rerank_attention`: same inputs, only
``hidden_out``, the attention core as one fused MultiHeadAttention node); bundles exported before that are
upgraded in place by :func:`fuse_bundle_attention` (the benchmark does this for its cached bundles).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .graphs import export_graph

log = logging.getLogger("edge_sel")


def write_split_layers(w, torch_model, say, fuse: bool = True) -> tuple[list[dict], dict, dict]:
    """Export every layer as ``qkv`` + ``attn`` graphs into the staging bundle ``w``; ``fuse``: rewrite the attn
    graphs into the rerank form (:func:`fuse_rerank_attention`).

    Returns ``(layer entries, extra_graphs, layer_io)`` for the manifest (same layout as generate bundles).
    """
    from .generate import EMPTY_POS, build_graphs

    pairs, _, dims = build_graphs(torch_model)
    layers, extra = [], {}
    n = len(pairs)
    fused = fuse
    for i, (qkv, attn) in enumerate(pairs):
        say("layers", i, n)
        rel = f"layers/layer_{i:03d}.onnx"
        data = export_graph(attn, w.file(rel))
        if fused:
            fused = _fuse_file(w.file(rel), dims)
        qrel = f"layers/layer_{i:03d}_qkv.onnx"
        qdata = export_graph(qkv, w.file(qrel))
        extra[f"qkv_{i:03d}"] = {"file": qrel, "weights": f"layers/{qdata}" if qdata else None}
        layers.append({"index": i, "source_index": i, "file": rel, "weights": f"layers/{data}" if data else None,
                       "qkv": f"qkv_{i:03d}"})
    say("layers", n, n)
    layer_io = {"qkv": {"inputs": pairs[0][0].input_names, "outputs": pairs[0][0].output_names},
                "attn": {"inputs": pairs[0][1].input_names,
                         "outputs": RERANK_ATTN_OUTPUTS if fused else pairs[0][1].output_names},
                "empty_pos": EMPTY_POS, "prefix_reuse": True}
    if fused:
        layer_io["attn_core"] = "MultiHeadAttention"
    return layers, extra, layer_io


# ---- rerank-only attn graphs ---------------------------------------------------------------------------
# The generation graphs' attention is written out op by op (MatMul, Where over [B,kv,G,T,S], Softmax, MatMul) and
# also returns attn_sum / attn_max for the KV policies. A reranker reads only hidden_out, and onnxruntime runs every
# node of a graph whatever outputs are requested; its Where over the full score tensor is single-threaded.
# ``fuse_rerank_attention`` rewrites an exported attn graph in place: the two policy outputs (and the reductions that
# feed them) go, and the attention core becomes one com.microsoft MultiHeadAttention node (multi-threaded, fused
# QK^T + bias + softmax + V) fed with an additive bias built from the same visibility rule on a [B,1,T,S] tensor.
# Inputs and hidden_out are unchanged, so the runtime is the same for old and new bundles.
RERANK_ATTN_OUTPUTS = ["hidden_out"]
MS_DOMAIN = "com.microsoft"


def _prune_dead(graph, keep: list[str]) -> None:
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


def fuse_rerank_attention(model, heads: int, kv_heads: int, head_dim: int):
    """Rewrite an attn graph (``edge_sel.export.generate.build_graphs``) into the rerank form, in place.

    Returns the model. Raises ``ValueError`` when the graph does not have the expected attention pattern
    (then the caller keeps the graph as exported: correct, only slower)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    if any(n.domain == MS_DOMAIN and n.op_type == "MultiHeadAttention" for n in g.node):
        _prune_dead(g, RERANK_ATTN_OUTPUTS)
        return model  # already fused
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer if i.data_location != TensorProto.EXTERNAL}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def only(xs, what):
        if len(xs) != 1:
            raise ValueError(f"attn graph: expected one {what}, found {len(xs)}")
        return xs[0]

    # P·V: the MatMul whose second input is Unsqueeze(v_cache)
    pv = only([n for n in g.node if n.op_type == "MatMul" and n.input[1] in producer
               and producer[n.input[1]].op_type == "Unsqueeze" and producer[n.input[1]].input[0] == "v_cache"], "P·V MatMul")
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

    G = heads // kv_heads
    mk = helper.make_node
    c = lambda name, arr: numpy_helper.from_array(np.asarray(arr), name)  # noqa: E731
    inits = [c("rr_perm_q", np.array([0, 2, 1, 3], np.int64)), c("rr_shape_q", np.array([0, 0, heads * head_dim], np.int64)),
             c("rr_ax2", np.array([2], np.int64)), c("rr_ax13", np.array([1, 3], np.int64)),
             c("rr_shape_kv", np.array([0, heads, -1, head_dim], np.int64)),
             c("rr_zero", np.array(0.0, np.float32)), c("rr_minf", np.array(np.finfo(np.float32).min, np.float32))]
    nodes = [
        mk("Transpose", ["q"], ["rr_q_t"], perm=[0, 2, 1, 3]),
        mk("Reshape", ["rr_q_t", "rr_shape_q"], ["rr_q"]),
    ]
    for name in ("k_cache", "v_cache"):  # [B,kv,S,D] -> [B,heads,S,D], query head h reads kv head h // G
        nodes += [mk("Unsqueeze", [name, "rr_ax2"], [f"rr_{name}_u"]),
                  mk("Concat", [f"rr_{name}_u"] * G, [f"rr_{name}_g"], axis=2),
                  mk("Reshape", [f"rr_{name}_g", "rr_shape_kv"], [f"rr_{name}_h"])]
    nodes += [
        mk("Unsqueeze", ["key_pos", "rr_ax2"], ["rr_kpos"]),           # [B,1,1,S]
        mk("Unsqueeze", ["position_ids", "rr_ax13"], ["rr_qpos"]),     # [B,1,T,1]
        mk("LessOrEqual", ["rr_kpos", "rr_qpos"], ["rr_visible"]),    # [B,1,T,S]
        mk("Where", ["rr_visible", "rr_zero", "rr_minf"], ["rr_bias"]),
        mk("MultiHeadAttention", ["rr_q", "rr_k_cache_h", "rr_v_cache_h", "", "", "rr_bias"], [attn_flat + "_mha"],
           domain=MS_DOMAIN, num_heads=heads, scale=scale),
    ]
    for n in g.node:  # o_proj now reads the fused output
        for j, i in enumerate(n.input):
            if i == attn_flat:
                n.input[j] = attn_flat + "_mha"
    # insert before o_proj's MatMul (topological order: every input of the new nodes is a graph input)
    pos = list(g.node).index(nxt)
    for k, n in enumerate(nodes):
        g.node.insert(pos + k, n)
    g.initializer.extend(inits)
    _prune_dead(g, RERANK_ATTN_OUTPUTS)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def _fuse_file(path: Path, dims: dict) -> bool:
    """Fuse one attn graph file in place (its external weight file is untouched). False if the pattern was not found."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    try:
        fuse_rerank_attention(model, int(dims["heads"]), int(dims.get("kv_heads") or dims["heads"]),
                              int(dims.get("head_dim") or dims["hidden"] // dims["heads"]))
    except ValueError as e:
        log.warning("%s: keeping the generation form of the attn graph (%s)", path, e)
        return False
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)  # a new inode: hard-linked copies of the bundle keep the old graph
    return True


def fuse_bundle_attention(path: str | os.PathLike) -> bool:
    """Upgrade a rerank bundle with split layers, exported before :func:`fuse_rerank_attention`, in place: rewrite its
    attn graphs (weights unchanged, scores equal within float rounding) and their manifest entries.
    Returns True when the bundle changed (False: nothing to do)."""
    from edge_sel.bundle import MANIFEST, Bundle, sha256_file

    b = Bundle.open(path)
    io = b.manifest.get("layer_io", {})
    if not io.get("prefix_reuse") or io.get("attn_core") == "MultiHeadAttention":
        return False
    manifest = json.loads(json.dumps(b.manifest))
    for entry in manifest["layers"]:
        f = b.path(entry["file"])
        if not _fuse_file(f, manifest["dims"]):
            raise ValueError(f"{f}: the attn graph does not have the expected pattern; re-export the bundle instead")
        manifest["files"][entry["file"]] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    manifest["layer_io"]["attn"]["outputs"] = list(RERANK_ATTN_OUTPUTS)
    manifest["layer_io"]["attn_core"] = "MultiHeadAttention"
    tmp = b.root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, b.root / MANIFEST)
    Bundle.open(path)
    return True
