"""Decode attention side by side in one process: the bundle's own attention core against onnxruntime's fused kernels.

    python -m benchmarks.attention_ab BUNDLE --slots 2080 --threads 1,2 --rounds 40

One decode step's attention for one layer (one query token over ``--slots`` cached slots, all but the last 16 filled),
each variant run over 30 distinct caches (one per layer, so the cache is read from memory as in a real step), the
variants interleaved round by round; the median µs per layer is reported with each variant's largest difference from
the bundle's core on the same cache:

* ``core``: the bundle's attention core, cut out of its layer-0 attn graph (float32 cache, the visibility mask from
  the key positions, softmax, attention sums/maxima for the policies, P·V).
* ``core_fp16_cache``: the same core fed a float16 cache through Cast nodes (float16 storage, float32 products).
* ``gqa`` / ``gqa_fp16``: ``com.microsoft.GroupQueryAttention`` over the cache as its past key/value, present bound
  to the same buffers (onnxruntime then writes only the new token), ``seqlens_k`` = filled slots - 1; keys are stored
  rotated, so no rotary inside. It reads the filled prefix only (no per-slot positions, no attention weights out).
* ``attention24`` / ``attention24_probs`` / ``attention24_fp16``: the ONNX ``Attention`` op (opset 24) with
  ``kv_num_heads`` < ``q_num_heads``, the cache as K/V and the boolean visibility mask; ``_probs`` also returns the
  softmax (``qk_matmul_output_mode=3``) reduced to the policies' sums and maxima.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

EMPTY = 1 << 40
LAYERS = 30


def _core_model(bundle: str):
    """The attention core of the bundle's layer-0 attn graph as its own model: q, caches, positions -> the attention
    output laid out for o_proj, attn_sum, attn_max."""
    import onnx
    from onnx import TensorProto, helper

    from edge_sel.runtime.bundle import Bundle

    b = Bundle.open(bundle)
    m = onnx.load(str(b.layer_path(0)), load_external_data=False)  # the core's constants are inline; the weights not needed
    out = [n.output[0] for n in m.graph.node if n.op_type == "Reshape" and n.input[0] in ("gb_o_t", "gm_o_t")]
    if len(out) != 1:
        raise SystemExit("the bundle's attn graphs do not have the constant-shape attention core (upgrade the bundle)")
    inputs = ["q", "k_cache", "v_cache", "key_pos", "position_ids"]
    producer = {o: n for n in m.graph.node for o in n.output}
    need, todo, nodes = set(), [out[0], "attn_sum", "attn_max"], []
    while todo:  # the nodes the core's outputs depend on, back to the graph inputs
        t = todo.pop()
        if t in need or t in inputs or t not in producer:
            continue
        need.add(t)
        n = producer[t]
        if n not in nodes:
            nodes.append(n)
            todo.extend(n.input)
    order = [n for n in m.graph.node if n in nodes]
    used = {i for n in order for i in n.input}
    inits = [x for x in m.graph.initializer if x.name in used]
    g = helper.make_graph(order, "core", [i for i in m.graph.input if i.name in inputs],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in (out[0], "attn_sum", "attn_max")],
                          initializer=inits)
    core = helper.make_model(g, opset_imports=m.opset_import)
    core.ir_version = m.ir_version
    return core, b.spec.dims


def _fp16_cache(core):
    """``core`` with float16 cache inputs cast up to float32 in the graph."""
    import copy

    from onnx import TensorProto, helper

    m = copy.deepcopy(core)
    for name in ("k_cache", "v_cache"):
        for n in m.graph.node:
            for i, x in enumerate(n.input):
                if x == name:
                    n.input[i] = name + "_f32"
        m.graph.node.insert(0, helper.make_node("Cast", [name], [name + "_f32"], to=TensorProto.FLOAT))
        vi = next(i for i in m.graph.input if i.name == name)
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return m


def _gqa(H: int, KV: int, D: int, S: int, fp16: bool):
    from onnx import TensorProto as TP, helper

    dt = TP.FLOAT16 if fp16 else TP.FLOAT
    n = helper.make_node("GroupQueryAttention", ["query", "key", "value", "past_key", "past_value", "seqlens_k",
                         "total_sequence_length"], ["out", "present_key", "present_value"], domain="com.microsoft",
                         num_heads=H, kv_num_heads=KV)
    ins = [("query", [1, 1, H * D], dt), ("key", [1, 1, KV * D], dt), ("value", [1, 1, KV * D], dt),
           ("past_key", [1, KV, S, D], dt), ("past_value", [1, KV, S, D], dt), ("seqlens_k", [1], TP.INT32),
           ("total_sequence_length", [], TP.INT32)]
    g = helper.make_graph([n], "gqa", [helper.make_tensor_value_info(a, t, s) for a, s, t in ins],
                          [helper.make_tensor_value_info(o, dt, None) for o in ("out", "present_key", "present_value")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _attention24(H: int, KV: int, D: int, S: int, fp16: bool, probs: bool):
    from onnx import TensorProto as TP, helper, numpy_helper

    G = H // KV
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits = [i64("k_ax", [2, 3]), i64("q_ax", [1, 2, 4]), i64("m5", [1, KV, G, 1, S]),
             i64("m4", [1, H, 1, S]), i64("o3", [0, -1, H * D]), i64("ax2", [2])]
    mk = helper.make_node
    nodes = [mk("Unsqueeze", ["key_pos", "k_ax"], ["kpos"]), mk("Unsqueeze", ["position_ids", "q_ax"], ["qpos"]),
             mk("LessOrEqual", ["kpos", "qpos"], ["vis5"]), mk("Expand", ["vis5", "m5"], ["vis5e"]),
             mk("Reshape", ["vis5e", "m4"], ["mask"])]
    q, y = "q", "y"
    if fp16:
        nodes.append(mk("Cast", ["q"], ["q16"], to=TP.FLOAT16))
        q = "q16"
    nodes.append(mk("Attention", [q, "k_cache", "v_cache", "mask"], ["y", "", ""] + (["p"] if probs else []),
                    **({"qk_matmul_output_mode": 3} if probs else {})))
    if fp16:
        nodes.append(mk("Cast", ["y"], ["y32"], to=TP.FLOAT))
        y = "y32"
    nodes += [mk("Transpose", [y], ["yt"], perm=[0, 2, 1, 3]), mk("Reshape", ["yt", "o3"], ["out"])]
    outs = ["out"]
    if probs:
        nodes += [mk("Reshape", ["p", "m5"], ["p5"]), mk("ReduceSum", ["p5", "ax2"], ["attn_sum"], keepdims=0),
                  mk("ReduceMax", ["p5", "ax2"], ["attn_max"], keepdims=0)]
        outs += ["attn_sum", "attn_max"]
    dt = TP.FLOAT16 if fp16 else TP.FLOAT
    ins = [("q", [1, H, 1, D], TP.FLOAT), ("k_cache", [1, KV, S, D], dt), ("v_cache", [1, KV, S, D], dt),
           ("key_pos", [1, KV, S], TP.INT64), ("position_ids", [1, 1], TP.INT64)]
    g = helper.make_graph(nodes, "attention24", [helper.make_tensor_value_info(a, t, s) for a, s, t in ins],
                          [helper.make_tensor_value_info(o, TP.FLOAT, None) for o in outs], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)])


def measure(bundle: str, slots: int, threads: int, rounds: int) -> dict:
    import onnxruntime as ort

    from edge_sel.runtime.sessions import session_options

    core, dims = _core_model(bundle)
    H, KV, D = dims.heads, dims.kv_heads, dims.head_dim
    S, n = slots, slots - 16

    def session(model):
        return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    k32 = [rng.standard_normal((1, KV, S, D), dtype=np.float32) for _ in range(LAYERS)]
    v32 = [rng.standard_normal((1, KV, S, D), dtype=np.float32) for _ in range(LAYERS)]
    k16, v16 = [k.astype(np.float16) for k in k32], [v.astype(np.float16) for v in v32]
    pos = np.full((1, KV, S), EMPTY, np.int64)
    pos[:, :, :n] = np.arange(n)
    q = rng.standard_normal((1, H, 1, D), dtype=np.float32)  # the qkv graph's [B, heads, T, D]
    p = np.array([[n - 1]], np.int64)

    def feeds_runner(sess, ks, vs):
        feeds = [{"q": q, "k_cache": ks[i], "v_cache": vs[i], "key_pos": pos, "position_ids": p} for i in range(LAYERS)]
        outs = []

        def run():
            outs[:] = [sess.run(None, f)[0] for f in feeds]
        return run, outs

    def gqa_runner(sess, ks, vs, dt):
        bindings, outs = [], []
        for i in range(LAYERS):
            b = sess.io_binding()
            out = np.empty((1, 1, H * D), dt)
            b.bind_cpu_input("query", q.astype(dt).reshape(1, 1, H * D))  # the new token's key/value: slot n-1's, so the write changes nothing
            b.bind_cpu_input("key", np.ascontiguousarray(ks[i][:, :, n - 1]).reshape(1, 1, KV * D))
            b.bind_cpu_input("value", np.ascontiguousarray(vs[i][:, :, n - 1]).reshape(1, 1, KV * D))
            for name, arr in (("past_key", ks[i]), ("past_value", vs[i]), ("present_key", ks[i]), ("present_value", vs[i])):
                bind = b.bind_input if name.startswith("past") else b.bind_output
                bind(name, "cpu", 0, dt, list(arr.shape), arr.ctypes.data)
            b.bind_cpu_input("seqlens_k", np.array([n - 1], np.int32))
            b.bind_cpu_input("total_sequence_length", np.array(n, np.int32))
            b.bind_output("out", "cpu", 0, dt, list(out.shape), out.ctypes.data)
            bindings.append(b)
            outs.append(out)

        def run():
            for b in bindings:
                sess.run_with_iobinding(b)
        return run, outs

    variants = {
        "core": feeds_runner(session(core), k32, v32),
        "core_fp16_cache": feeds_runner(session(_fp16_cache(core)), k16, v16),
        "gqa": gqa_runner(session(_gqa(H, KV, D, S, False)), k32, v32, np.float32),
        "gqa_fp16": gqa_runner(session(_gqa(H, KV, D, S, True)), k16, v16, np.float16),
        "attention24": feeds_runner(session(_attention24(H, KV, D, S, False, False)), k32, v32),
        "attention24_probs": feeds_runner(session(_attention24(H, KV, D, S, False, True)), k32, v32),
        "attention24_fp16": feeds_runner(session(_attention24(H, KV, D, S, True, False)), k16, v16),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for k in order:
            t = time.perf_counter()
            variants[k][0]()
            times[k].append((time.perf_counter() - t) / LAYERS * 1e6)
    ref = variants["core"][1]
    diff = {k: float(max(np.abs(np.asarray(o, np.float32) - r).max() for o, r in zip(outs, ref)))
            for k, (_, outs) in variants.items()}
    return {"slots": S, "threads": threads, "us_per_layer": {k: round(statistics.median(v), 1) for k, v in times.items()},
            "max_abs_diff_vs_core": {k: float(f"{v:.2e}") for k, v in diff.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="a generate bundle (its layer-0 attention core and dims are used)")
    ap.add_argument("--slots", default="2080", help="comma-separated cache sizes")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=40)
    a = ap.parse_args(argv)
    for s in (int(x) for x in a.slots.split(",")):
        for t in (int(x) for x in a.threads.split(",")):
            print(json.dumps(measure(a.bundle, s, t, a.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
