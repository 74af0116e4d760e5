"""An int8 KV cache for decode attention, measured before it goes into the engine: the attention core over keys and
values stored as int8 with one scale per token (kv head), multiplied in integers by onnxruntime's ``MatMulInteger``.

    python -m benchmarks.kv_int8_ab layer BUNDLE --slots 2048 --threads 1     # one attn layer graph, float vs int8 cores
    python -m benchmarks.kv_int8_ab errors BUNDLE --prompt-tokens 2048        # which quantization costs what, real K/V/q
    python -m benchmarks.kv_int8_ab step BUNDLE --prompt-tokens 2048 --threads 2   # whole decode steps, float vs int8 cache
    python -m benchmarks.kv_int8_ab bundle BUNDLE OUT [--q-rows] [--p-two-level]   # a copy whose cores quantize in-graph
    python -m benchmarks.kv_int8_ab ppl BUNDLE [BUNDLE ...]                   # Generator.score on a Botchan window

The core (:func:`int8_kv_core`, a rewrite of the bundle's constant-shape float core):

* each cached token's key and value stored as the int8 code ``round(x / s)``, ``s = max|x| / 127`` over its
  ``head_dim`` values (symmetric per token: a new token never changes the stored ones; KIVI's per-token option,
  llama.cpp's q8_0 cache in one block per head — Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
  for KV Cache"), kept as uint8 ``code + 128`` (zero point 128): on AVX2 without VNNI onnxruntime's uint8 x int8
  kernel adds pairs of products in 16 bits with saturation (wrong sums whenever codes near both ends meet), its
  uint8 x uint8 kernel is exact and as fast, int8 x int8 10x slower;
* scores: the scaled queries on a uint8 grid (``DynamicQuantizeLinear``, one scale per call; or per row,
  ``q_rows``) times the keys stored transposed (``[B, kv, D, S]``: the product's second operand, packed per call),
  times the key scales;
* the softmax weights times the value scales on a uint8 grid per row (or two grids, ``p_two_level``: the remainder
  below one step on a second grid 255 times finer, rows ``[hi; lo]``) times the values, times the row scales.

``bundle`` writes a copy of a generate bundle whose cores take the float cache and quantize it per token inside the
graph: the same numbers as a stored int8 cache, run by the unchanged engine, so ``ppl`` measures the accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

SCALE_FLOOR = 1e-30  # an all-zero token: its scale stays positive, its codes 0


def quantize_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` ``[..., D]`` float -> (codes ``[..., D]`` uint8 = the int8 code + 128, float32 scales ``[...]``),
    ``x ≈ (codes - 128) * scale``; the same rounding (half to even) as the graph's float-input form."""
    s = np.maximum(np.abs(x).max(-1) / np.float32(127), np.float32(SCALE_FLOOR)).astype(np.float32)
    return (np.rint(x / s[..., None]) + 128).astype(np.uint8), s


def int8_kv_core(model, heads: int, kv_heads: int, head_dim: int, float_inputs: bool = False,
                 q_rows: bool = True, p_two_level: bool = False) -> bool:
    """Replace the constant-shape float attention core (``gm_`` nodes, ``generate_attention_core`` in
    ``edge_sel.export.generate_layers``) of a generate attn graph by the int8 core, in place. The graph then reads
    ``k_cache`` ``[B,kv,D,S]`` and ``v_cache`` ``[B,kv,S,D]`` as uint8 codes (:func:`quantize_tokens`), ``k_scale``
    and ``v_scale`` ``[B,kv,S]``. ``float_inputs``: keep float
    ``k_cache``/``v_cache`` inputs and quantize them per token in the graph (the same numbers as a stored int8
    cache; for checking accuracy on an unchanged runtime). Returns False when the graph already has this core;
    ``ValueError`` when the float core is not found."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    if any(n.name == "q8_softmax" for n in g.node):
        return False
    if not any(n.name == "gm_softmax" for n in g.node):
        raise ValueError("attn graph: no constant-shape attention core to give int8 inputs")
    out_node = [n for n in g.node if n.op_type == "Reshape" and n.input[0] == "gm_o_t"]
    if len(out_node) != 1:
        raise ValueError("attn graph: the core's output reshape is missing")
    out = out_node[0].output[0]
    scale = numpy_helper.to_array(next(i for i in g.initializer if i.name == "gm_scale"))
    G, D = heads // kv_heads, head_dim
    keep = [n for n in g.node if not any(o.startswith("gm_") for o in n.output) and n.output[0] not in (out, "attn_sum", "attn_max")]
    inits = [i for i in g.initializer if not i.name.startswith("gm_")]
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name)  # noqa: E731
    f32 = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.float32), name)  # noqa: E731
    inits += [i64("q8_rows", [0, kv_heads, -1, D]), i64("q8_ax1", [1]), i64("q8_ax2", [2]), i64("q8_ax3", [3]),
              i64("q8_ax13", [1, 3]), i64("q8_last", [-1]), i64("q8_tile", [1, G]), i64("q8_heads", [0, heads, -1, D]),
              i64("q8_out", [0, 0, heads * D]), f32("q8_scale", np.asarray(scale, np.float32).reshape(D)),
              f32("q8_minf", np.finfo(np.float32).min), f32("q8_255", 255.0), f32("q8_inv255", 1.0 / 255.0),
              f32("q8_floor", SCALE_FLOOR), f32("q8_inv127", 1.0 / 127.0),
              f32("q8_128f", 128.0), numpy_helper.from_array(np.array(128, dtype=np.uint8), "q8_128")]
    mk = helper.make_node
    nodes = []
    k_in, v_in = "k_cache", "v_cache"
    if float_inputs:  # quantize each token's key and value here, as quantize_tokens does
        for x, t in (("k", True), ("v", False)):
            src = f"{x}_cache"
            nodes += [mk("Abs", [src], [f"q8_{x}abs"]),
                      mk("ReduceMax", [f"q8_{x}abs"], [f"q8_{x}max"], axes=[-1], keepdims=0),
                      mk("Mul", [f"q8_{x}max", "q8_inv127"], [f"q8_{x}s0"]),
                      mk("Max", [f"q8_{x}s0", "q8_floor"], [f"q8_{x}_scale"]),
                      mk("Unsqueeze", [f"q8_{x}_scale", "q8_last"], [f"q8_{x}s_u"]),
                      mk("Div", [src, f"q8_{x}s_u"], [f"q8_{x}n"]), mk("Round", [f"q8_{x}n"], [f"q8_{x}r"]),
                      mk("Add", [f"q8_{x}r", "q8_128f"], [f"q8_{x}r128"]),
                      mk("Cast", [f"q8_{x}r128"], [f"q8_{x}8"], to=TensorProto.UINT8)]
            if t:
                nodes.append(mk("Transpose", ["q8_k8"], ["q8_k8t"], perm=[0, 1, 3, 2]))
        k_in, v_in, ks, vs = "q8_k8t", "q8_v8", "q8_k_scale", "q8_v_scale"
    else:
        ks, vs = "k_scale", "v_scale"
    nodes += [
        mk("Reshape", ["q", "q8_rows"], ["q8_q"]),                                # [B,kv,G*T,D]: rows (g, t)
        mk("Mul", ["q8_q", "q8_scale"], ["q8_qs"]),
    ]
    if q_rows:  # each query row on its own symmetric grid: uint8 codes around 128 (onnxruntime has no fast int8 x int8)
        nodes += [mk("Abs", ["q8_qs"], ["q8_qabs"]), mk("ReduceMax", ["q8_qabs"], ["q8_qmax"], axes=[-1], keepdims=1),
                  mk("Mul", ["q8_qmax", "q8_inv127"], ["q8_qs0"]), mk("Max", ["q8_qs0", "q8_floor"], ["q8_qscale"]),
                  mk("Div", ["q8_qs", "q8_qscale"], ["q8_qn"]), mk("Round", ["q8_qn"], ["q8_qr"]),
                  mk("Add", ["q8_qr", "q8_128f"], ["q8_qr128"]), mk("Cast", ["q8_qr128"], ["q8_qu"], to=TensorProto.UINT8),
                  mk("MatMulInteger", ["q8_qu", k_in, "q8_128", "q8_128"], ["q8_si"])]
    else:
        nodes += [mk("DynamicQuantizeLinear", ["q8_qs"], ["q8_qu", "q8_qscale", "q8_qzero"]),
                  mk("MatMulInteger", ["q8_qu", k_in, "q8_qzero", "q8_128"], ["q8_si"])]    # [B,kv,GT,S] int32
    nodes += [
        mk("Cast", ["q8_si"], ["q8_sf"], to=TensorProto.FLOAT),
        mk("Unsqueeze", [ks, "q8_ax2"], ["q8_ks"]),                                # [B,kv,1,S]
        mk("Mul", ["q8_ks", "q8_qscale"], ["q8_ksq"]),                             # [B,kv,GT|1,S]
        mk("Mul", ["q8_sf", "q8_ksq"], ["q8_s"]),
        mk("Unsqueeze", ["key_pos", "q8_ax2"], ["q8_kpos"]),                       # [B,kv|1,1,S]
        mk("Tile", ["position_ids", "q8_tile"], ["q8_pos_rows"]),                  # [B,G*T]: row (g, t) -> position t
        mk("Unsqueeze", ["q8_pos_rows", "q8_ax13"], ["q8_qpos"]),                  # [B,1,GT,1]
        mk("LessOrEqual", ["q8_kpos", "q8_qpos"], ["q8_vis"]),
        mk("Where", ["q8_vis", "q8_s", "q8_minf"], ["q8_scores"]),
        mk("Softmax", ["q8_scores"], ["q8_p"], axis=-1, name="q8_softmax"),
        mk("ReduceSum", ["q8_p", "q8_ax2"], ["attn_sum"], keepdims=0),             # [B,kv,S]
        mk("ReduceMax", ["q8_p"], ["attn_max"], axes=[2], keepdims=0),  # (axes an attribute: opset 17)
        mk("Unsqueeze", [vs, "q8_ax2"], ["q8_vs"]),                                # [B,kv,1,S]
        mk("Mul", ["q8_p", "q8_vs"], ["q8_pv"]),
        mk("ReduceMax", ["q8_pv"], ["q8_pmax0"], axes=[-1], keepdims=1),         # [B,kv,GT,1]
        mk("Max", ["q8_pmax0", "q8_floor"], ["q8_pmax"]),
        mk("Div", ["q8_255", "q8_pmax"], ["q8_pinv"]),
        mk("Mul", ["q8_pv", "q8_pinv"], ["q8_pn"]),
        mk("Mul", ["q8_pmax", "q8_inv255"], ["q8_pstep"])]
    if p_two_level:  # the weights' remainder below one step on a second grid 255 times finer: rows [hi; lo]
        nodes += [mk("Floor", ["q8_pn"], ["q8_phi"]), mk("Sub", ["q8_pn", "q8_phi"], ["q8_prem"]),
                  mk("Mul", ["q8_prem", "q8_255"], ["q8_plo"]), mk("Round", ["q8_plo"], ["q8_plor"]),
                  mk("Concat", ["q8_phi", "q8_plor"], ["q8_p2"], axis=2),          # [B,kv,2*GT,S]
                  mk("Cast", ["q8_p2"], ["q8_pu"], to=TensorProto.UINT8),
                  mk("MatMulInteger", ["q8_pu", v_in, "", "q8_128"], ["q8_oi"]),   # [B,kv,2*GT,D]
                  mk("Cast", ["q8_oi"], ["q8_of2"], to=TensorProto.FLOAT),
                  mk("Split", ["q8_of2"], ["q8_ohi", "q8_olo"], axis=2),
                  mk("Mul", ["q8_ohi", "q8_255"], ["q8_ohi255"]), mk("Add", ["q8_ohi255", "q8_olo"], ["q8_of"]),
                  mk("Mul", ["q8_pstep", "q8_inv255"], ["q8_pstep2"]), mk("Mul", ["q8_of", "q8_pstep2"], ["q8_o"])]
    else:
        nodes += [mk("Round", ["q8_pn"], ["q8_pr"]),
                  mk("Cast", ["q8_pr"], ["q8_pu"], to=TensorProto.UINT8),
                  mk("MatMulInteger", ["q8_pu", v_in, "", "q8_128"], ["q8_oi"]),   # [B,kv,GT,D] int32
                  mk("Cast", ["q8_oi"], ["q8_of"], to=TensorProto.FLOAT),
                  mk("Mul", ["q8_of", "q8_pstep"], ["q8_o"])]
    nodes += [
        mk("Reshape", ["q8_o", "q8_heads"], ["q8_o_h"]),                           # [B,heads,T,D]
        mk("Transpose", ["q8_o_h"], ["q8_o_t"], perm=[0, 2, 1, 3]),
        mk("Reshape", ["q8_o_t", "q8_out"], [out])]                                # [B,T,heads*D]
    del g.node[:]
    g.node.extend(nodes + keep)
    del g.initializer[:]
    g.initializer.extend(inits)
    if not float_inputs:
        for inp in g.input:
            if inp.name in ("k_cache", "v_cache"):
                inp.type.tensor_type.elem_type = TensorProto.UINT8
                if inp.name == "k_cache":  # stored transposed: [B, kv, D, S]
                    dims = inp.type.tensor_type.shape.dim
                    d2, d3 = dims[2].SerializeToString(), dims[3].SerializeToString()
                    dims[2].ParseFromString(d3)
                    dims[3].ParseFromString(d2)
        for name in ("k_scale", "v_scale"):
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv_heads, "slots"]))
    _topological(g)
    return True


def _topological(g) -> None:
    """Order ``g``'s nodes so each comes after its inputs' producers."""
    from edge_sel.export.merge_nbits import topological_order

    ordered = topological_order(list(g.node), {i.name for i in g.input} | {i.name for i in g.initializer})
    del g.node[:]
    g.node.extend(ordered)


# ---- measurements -----------------------------------------------------------------------------------------
def _dims(bundle) -> tuple[int, int, int]:
    d = bundle.spec.dims
    return d.heads, d.kv_heads, d.head_dim


def layer_ab(path: str, slots: int, threads: int, layer: int, rounds: int) -> None:
    """One real attn graph (weights, MLP and all) at decode over ``slots`` cached tokens: the float core against the
    int8 variants, 30 distinct caches, variants interleaved round by round; median µs per run."""
    import onnx

    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.sessions import load_session

    b = Bundle.open(path)
    heads, kv, D = _dims(b)
    src = b.layer_path(layer)
    sess = {"fp32": load_session(src, threads)}
    for name, opts in (("int8 q-call p8", dict(q_rows=False)), ("int8 q-rows p8", dict(q_rows=True)),
                       ("int8 q-rows p16", dict(q_rows=True, p_two_level=True))):
        m = onnx.load(str(src), load_external_data=False)
        int8_kv_core(m, heads, kv, D, **opts)
        tmp = src.with_name(f".kv_int8_ab_{layer}.onnx")  # beside the original: its external weights resolve
        try:
            onnx.save_model(m, str(tmp))
            sess[name] = load_session(tmp, threads)
        finally:
            tmp.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    caches = []
    for _ in range(30):
        k, v = (rng.standard_normal((kv, slots, D)).astype(np.float32) for _ in range(2))
        (k8, ks), (v8, vs) = quantize_tokens(k), quantize_tokens(v)
        caches.append(({"k_cache": k[None], "v_cache": v[None]},
                       {"k_cache": np.ascontiguousarray(k8.transpose(0, 2, 1))[None], "k_scale": ks[None], "v_cache": v8[None], "v_scale": vs[None]}))
    H = b.spec.dims.hidden
    base = {"hidden": rng.standard_normal((1, 1, H)).astype(np.float32), "q": rng.standard_normal((1, heads, 1, D)).astype(np.float32),
            "key_pos": np.broadcast_to(np.arange(slots, dtype=np.int64), (1, kv, slots)).copy(), "position_ids": np.array([[slots]], np.int64)}
    ref = sess["fp32"].run(None, {**base, **caches[0][0]})[0]
    res = {k: [] for k in sess}
    for r in range(rounds):
        for k in (list(sess) if r % 2 == 0 else list(reversed(sess))):
            for i in range(30):
                f = {**base, **caches[i][0 if k == "fp32" else 1]}
                t = time.perf_counter()
                sess[k].run(None, f)
                res[k].append(time.perf_counter() - t)
    f0 = statistics.median(res["fp32"])
    for k, v in res.items():
        diff = 0.0 if k == "fp32" else float(np.abs(sess[k].run(None, {**base, **caches[0][1]})[0] - ref).max() / np.abs(ref).max())
        print(f"threads={threads} slots={slots} {k:16s} {1e6 * statistics.median(v):7.1f} µs  {statistics.median(v) / f0:.2f}x"
              f"  hidden max|diff|/max {diff:.4f}", flush=True)


def _botchan_ids(gen) -> list[int]:
    from tokenizers import Tokenizer

    from edge_sel.export.textdata import botchan

    t = Tokenizer.from_file(str(gen.bundle.path(gen.bundle.spec.tokenizer.file)))
    t.no_padding()
    t.no_truncation()
    return t.encode(botchan(), add_special_tokens=True).ids


def errors(path: str, prompt_tokens: int, threads: int) -> None:
    """Per layer, the relative error of one decode step's attention output (numpy, float64 reference on the real
    cache after a Botchan prompt) for each quantization alone and together."""
    from edge_sel.runtime.generate import Generator

    g = Generator(path, policy="full", threads=threads)
    ids = _botchan_ids(g)[:prompt_tokens]
    it = g.run(ids, 2, 0.0, 1.0, None, False, None, False)
    tok, logits, call = next(it)
    m = g.model
    _, kv, D = _dims(g.bundle)
    h, pos = m.embed(np.array([[int(np.argmax(logits))]], np.int64)), np.array([[len(ids)]], np.int64)

    def sym(x, axis=-1):
        s = np.maximum(np.abs(x).max(axis, keepdims=True) / 127, 1e-30)
        return np.rint(x / s) * s

    def u8_call(x):
        lo, hi = min(0.0, x.min()), max(0.0, x.max())
        s = (hi - lo) / 255
        z = np.rint(-lo / s)
        return (np.clip(np.rint(x / s) + z, 0, 255) - z) * s

    def p_rows(p):
        s = p.max(-1, keepdims=True) / 255
        return np.rint(p / s) * s

    def attend(q, K, V, qf=None, kf=None, vf=None, pf=None):
        q = q.reshape(kv, -1, D)
        q, K, V = (qf or (lambda x: x))(q), (kf or (lambda x: x))(K), (vf or (lambda x: x))(V)
        s = np.einsum("kgd,ksd->kgs", q, K)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.einsum("kgs,ksd->kgd", (pf or (lambda x: x))(p), V)

    variants = {"keys per token": dict(kf=sym), "values per token": dict(vf=sym), "queries per call (u8)": dict(qf=u8_call),
                "queries per row": dict(qf=sym), "weights per row (u8)": dict(pf=p_rows),
                "all (the fast core)": dict(kf=sym, vf=sym, qf=u8_call, pf=p_rows)}
    errs = {k: [] for k in variants}
    for L, (qkv, attn) in enumerate(m.layers):
        c = call.caches[L]
        q, k, v = qkv.run(None, {"hidden": h, "position_ids": pos})
        K, V = c.k[0, :, :c.n].astype(np.float64), c.v[0, :, :c.n].astype(np.float64)
        qs = q[0, :, 0].astype(np.float64) / np.sqrt(D)
        ref = attend(qs, K, V)
        for name, kw in variants.items():
            errs[name].append(np.linalg.norm(attend(qs, K, V, **kw) - ref) / np.linalg.norm(ref))
        kc, vc, kp = c.full()
        h = attn.run(None, {"hidden": h, "q": q, "k_cache": kc, "v_cache": vc, "key_pos": kp, "position_ids": pos})[0]
    it.close()
    for name, e in errs.items():
        e = np.array(e)
        print(f"{name:24s} relative error of the attention output: mean {e.mean():.4f}, max {e.max():.4f} (layer {e.argmax()})")


class _Int8Cache:
    """One layer's cache as the int8 core reads it, made from a filled float cache (codes + scales per token)."""

    def __init__(self, c):
        (k8, ks), (v8, vs) = quantize_tokens(c.k[0]), quantize_tokens(c.v[0])
        self.kt, self.ks = np.ascontiguousarray(k8.transpose(0, 2, 1))[None], ks[None].copy()
        self.v8, self.vs = v8[None].copy(), vs[None].copy()
        self.pos, self.n = c.pos.copy(), c.n

    def append(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        (k8, ks), (v8, vs) = quantize_tokens(k[0]), quantize_tokens(v[0])
        s = self.n
        self.kt[0, :, :, s], self.ks[0, :, s], self.v8[0, :, s], self.vs[0, :, s] = k8[:, 0], ks[:, 0], v8[:, 0], vs[:, 0]
        self.pos[:, s] = positions[0]
        self.n += 1

    def feeds(self) -> dict:
        return {"k_cache": self.kt, "k_scale": self.ks, "v_cache": self.v8, "v_scale": self.vs, "key_pos": self.pos[None]}


def step_ab(path: str, prompt_tokens: int, threads: int, q_rows: bool, rounds: int = 6, steps: int = 8) -> None:
    """Whole decode steps in one process: the engine's step over its float cache against a step over an int8 cache
    (the float caches of the same prefilled call quantized per token; int8-core attn graphs over the same weights;
    the full-cache step, so no policy calls), interleaved in rounds of ``steps``; median ms per step."""
    import onnx

    from edge_sel.runtime.generate import Generator
    from edge_sel.runtime.generate.decode import decode_step
    from edge_sel.runtime.sessions import load_session

    g = Generator(path, policy="full", threads=threads)
    ids = _botchan_ids(g)[:prompt_tokens]
    it = g.run(ids, rounds * steps + 2, 0.0, 1.0, None, False, None, False)
    tok, logits, call = next(it)
    m, heads, kv, D = g.model, *_dims(g.bundle)
    attn8 = []
    for i in range(len(m.layers)):
        src = g.bundle.layer_path(i)
        model = onnx.load(str(src), load_external_data=False)
        int8_kv_core(model, heads, kv, D, q_rows=q_rows)
        tmp = src.with_name(f".kv_int8_ab_step_{i}.onnx")
        try:
            onnx.save_model(model, str(tmp))
            attn8.append(load_session(tmp, threads, mem_pattern=False))
        finally:
            tmp.unlink(missing_ok=True)
    caches = [_Int8Cache(c) for c in call.caches]

    def step8(t: int, at: int) -> np.ndarray:
        h, p = m.embed(np.array([[t]], dtype=np.int64)), np.array([[at]], dtype=np.int64)
        for L, (qkv, _) in enumerate(m.layers):
            q, k, v = qkv.run(None, {"hidden": h, "position_ids": p})
            caches[L].append(k, v, p[0])
            h = attn8[L].run(None, {"hidden": h, "q": q, **caches[L].feeds(), "position_ids": p})[0]
        return m.logits(h[:, -1])

    first, pos = int(np.argmax(logits)), len(ids)
    state = {"float": (first, pos), "int8": (first, pos)}
    times = {"float": [], "int8": []}
    run = {"float": lambda t, at: decode_step(m, call, t, at), "int8": step8}
    for r in range(rounds):
        for k in (("float", "int8") if r % 2 == 0 else ("int8", "float")):
            t, at = state[k]
            for _ in range(steps):
                a = time.perf_counter()
                lg = run[k](t, at)
                times[k].append(time.perf_counter() - a)
                t, at = int(np.argmax(lg)), at + 1
            state[k] = (t, at)
    it.close()
    f, q = statistics.median(times["float"]), statistics.median(times["int8"])
    print(f"prompt {prompt_tokens}, threads {threads}, queries {'per row' if q_rows else 'per call'}: float step "
          f"{1e3 * f:.2f} ms, int8-cache step {1e3 * q:.2f} ms ({q / f:.2f}x); shared pool {m.shared_pool}", flush=True)


def write_bundle(src: str, dst: str, q_rows: bool, p_two_level: bool) -> None:
    import onnx

    from edge_sel.export.staging import link_files
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.bundle_writer import BundleWriter

    b = Bundle.open(src)
    spec = b.spec
    layer_files = {layer.file for layer in spec.layers}
    with BundleWriter(dst, overwrite=True) as w:
        link_files(b, w, [f for f in spec.files if f not in layer_files])
        for layer in spec.layers:
            m = onnx.load(str(b.path(layer.file)), load_external_data=False)
            int8_kv_core(m, *_dims(b), float_inputs=True, q_rows=q_rows, p_two_level=p_two_level)
            onnx.save_model(m, str(w.file(layer.file)))
        w.commit(spec)
    print("wrote", dst)


def ppl(paths: list[str], prefix: int, cont: int, start: int, threads: int) -> None:
    from edge_sel.runtime.generate import Generator

    for path in paths:
        g = Generator(path, policy="full", threads=threads)
        ids = _botchan_ids(g)[start:start + prefix + cont]
        r = g.score(ids[:prefix], ids[prefix:], compress_continuation=False)
        print(f"{path}: perplexity {r['ppl']:.3f} ({cont} Botchan tokens after {prefix}, from token {start})", flush=True)
        g.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("layer")
    a.add_argument("bundle")
    a.add_argument("--slots", type=int, default=2048)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--layer", type=int, default=5)
    a.add_argument("--rounds", type=int, default=6)
    e = sub.add_parser("errors")
    e.add_argument("bundle")
    e.add_argument("--prompt-tokens", type=int, default=2048)
    e.add_argument("--threads", type=int, default=2)
    st = sub.add_parser("step")
    st.add_argument("bundle")
    st.add_argument("--prompt-tokens", type=int, default=2048)
    st.add_argument("--threads", type=int, default=2)
    st.add_argument("--queries", choices=("row", "call"), default="row")
    w = sub.add_parser("bundle")
    w.add_argument("bundle")
    w.add_argument("out")
    w.add_argument("--q-rows", action="store_true")
    w.add_argument("--p-two-level", action="store_true")
    p = sub.add_parser("ppl")
    p.add_argument("bundles", nargs="+")
    p.add_argument("--prefix", type=int, default=1792)
    p.add_argument("--cont", type=int, default=256)
    p.add_argument("--start", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cmd == "layer":
        layer_ab(args.bundle, args.slots, args.threads, args.layer, args.rounds)
    elif args.cmd == "errors":
        errors(args.bundle, args.prompt_tokens, args.threads)
    elif args.cmd == "step":
        step_ab(args.bundle, args.prompt_tokens, args.threads, args.queries == "row")
    elif args.cmd == "bundle":
        write_bundle(args.bundle, args.out, args.q_rows, args.p_two_level)
    else:
        ppl(args.bundles, args.prefix, args.cont, args.start, args.threads)
    return 0


if __name__ == "__main__":
    from edge_sel.runtime.sessions import own_process

    own_process()  # measured as the edge-sel command runs: the thread-pool rule applies
    sys.exit(main())
