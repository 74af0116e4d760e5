"""Predict a call's peak memory (and, with a device profile, its latency) before running it.

Memory reuses the engines' own planners (:mod:`edge_sel.runtime.planning`): the reranker's window, chunk and
spill decision come from :class:`~edge_sel.runtime.planning.rerank.Planner` exactly as the engine would choose
them, and the generator's cache from :class:`~edge_sel.runtime.planning.kv.KVPlanner`. The predictions are split
by the same components a profile measures (:mod:`edge_sel.runtime.profiler`): weights (file-backed pages),
hidden states or KV cache (engine-known bytes) and the total share of the process above its idle RSS.
"""

from __future__ import annotations

import numpy as np

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.manifest import embed_files, thaw
from edge_sel.runtime.generate.prefill import PREFILL_SCORES_BYTES, chunk_size
from edge_sel.runtime.planning import KVPlanner, Planner
from edge_sel.runtime.planning.rerank import ChunkCount
from edge_sel.runtime.rerank.tokens import BYTES_PER_ITEM, BYTES_PER_TOKEN, BYTES_PER_TYPE
from edge_sel.runtime.policies import make_policy

# What a generate call holds besides weights and cache, measured on this repository's bundles: the prompt's
# hidden states (input, output and the q/k/v of one chunk) and a chunk's attention tensors.
GEN_ATTENTION_TENSORS = 4
# onnxruntime's own anonymous memory per open session (graph, kernels, arenas): ~30 MB over SmolLM2's 61 generate
# sessions in every weight format (onnxruntime 1.32, Linux)
SESSION_BYTES = 500_000
# Weights a format makes onnxruntime copy into anonymous memory at load, per byte of weight file: MatMulNBits
# prepacks its blocks (with per-block sums), fp16 matrices are cast to float32; float32 files stay file-backed
# pages. Measured on SmolLM2-135M generate bundles (opening the engine, anonymous RSS beyond the sessions' fixed
# part over the graphs' weight files plus a tied head's table): int4 1.30, int8 1.10, fp16 2.05.
LOADED_COPY = {"fp32": 0.0, "fp16": 2.05, "int8": 1.10, "int4": 1.30}


def depth_first(planner: Planner, plan, split: bool) -> bool:
    """Whether the engine runs this plan depth-first (every layer resident, nothing spilled, the embedding table's
    touched pages covered by the kept-states room), as :mod:`edge_sel.runtime.rerank.reranker` decides (no pruning)."""
    e = plan.estimate
    return (plan.window >= planner.n_layers and not plan.spill and not split
            and (plan.budget is None or e["embed"] <= e["hidden"]))


def rerank_memory(planner: Planner, estimate: dict, stats: dict | None = None, plan=None, split: bool = False,
                  probed_anon: int | None = None) -> dict | None:
    """The plan's components (bytes) as a profile measures them; None without a full estimate. Depth-first runs
    keep the embedding table mapped beside the layers and only one chunk's hidden states."""
    need = ("fixed", "layers", "hidden", "embed", "activations")
    if not all(k in estimate for k in need):
        return None
    e = estimate
    if plan is not None and depth_first(planner, plan, split):
        hidden = 2 * 4 * planner.H * plan.chunk_tokens
        # a probe measured what building the engine and a resident call add in anonymous memory here (sessions,
        # activations, onnxruntime's memory patterns): the static formula's fixed + activations undercount it
        extra = e.get("tokens", 0) + e.get("bookkeeping", 0)
        total = e["layers"] + e["embed"] + max(e["fixed"] + e["activations"] + hidden + extra, probed_anon or 0)
        return {"weights": int(e["layers"] + e["embed"]), "hidden": int(hidden), "total": int(total)}
    total = int(e["fixed"] + e["hidden"] + e.get("tokens", 0) + e.get("bookkeeping", 0)
                + max(e["embed"], e["layers"] + e["activations"]))
    return {"weights": int(e["layers"]), "hidden": int(e["hidden"]), "total": total}


def rerank_memory_of_call(rr, stats: dict) -> dict | None:
    """:func:`rerank_memory` for a finished call of reranker ``rr`` (its stats say the plan and the order it ran)."""
    e = stats.get("plan_estimate") or {}
    if not all(k in e for k in ("fixed", "layers", "hidden", "embed", "activations")):
        return None
    if stats.get("order") == "depth-first":
        hidden = 2 * 4 * rr.planner.H * stats["chunk_tokens"]
        return {"weights": int(e["layers"] + e["embed"]), "hidden": int(hidden),
                "total": int(e["fixed"] + e["layers"] + e["embed"] + e["activations"] + hidden
                             + e.get("tokens", 0) + e.get("bookkeeping", 0))}
    return rerank_memory(rr.planner, e)


def _interpolate(points: list | None, x: float) -> float | None:
    """Linear interpolation in probed ``[[length, bytes], ...]`` (extrapolated from the nearest two points)."""
    if not points or not isinstance(points, list):
        return None
    if len(points) == 1:
        return points[0][1]
    (x1, y1), (x2, y2) = points[0], points[-1]
    return max(0.0, y1 + (y2 - y1) * (x - x1) / (x2 - x1)) if x2 != x1 else y2


def unique_tokens(total: int, vocab: int) -> int:
    """Distinct token ids among ``total`` tokens of text (Heaps' law, fitted on English docstrings with WordPiece and
    byte-level BPE tokenizers: 1.1-2.4 x total^0.7); the upper end, capped by the vocabulary."""
    return int(min(vocab, 2.5 * total ** 0.7))


def rerank_plan(bundle: Bundle, n_docs: int, doc_tokens: int, query_tokens: int = 16, budget: int | None = None,
                allow_spill: bool = True, split_extra: int = 0):
    """The reranker's plan for ``n_docs`` candidates of ``doc_tokens`` tokens (raises BudgetError like the engine)."""
    planner = Planner(bundle)
    planner.layer_bytes += split_extra
    spec = bundle.spec
    per_item = min(bundle.max_length, doc_tokens + query_tokens + 4)  # pair / prompt around the document
    total, max_len = n_docs * per_item, per_item
    embed_bytes = _embed_touched(bundle, unique_tokens(total, spec.embed.shape[0]))
    n_items = n_docs + (spec.scoring == "bi_encoder")  # the engine encodes a bi-encoder's query as one more item
    token_ram = total * (BYTES_PER_TOKEN + (BYTES_PER_TYPE if spec.scoring == "cross_encoder" else 0)) + n_items * BYTES_PER_ITEM
    if budget is not None and allow_spill and token_ram > planner.token_ram_limit(budget):
        token_ram = 0  # the engine keeps token ids in a file beyond budget / 16
    plan = planner.plan(budget, total, max_len, embed_bytes, allow_spill, n_items=n_items, token_ram=token_ram,
                        count=ChunkCount(np.full(n_items, max_len)))
    return planner, plan, {"total_tokens": total, "max_len": max_len}


def _embed_touched(bundle: Bundle, unique: int) -> int:
    from edge_sel.runtime.embedding import Embedder

    return Embedder(bundle).touched_bytes(unique)


def weight_bytes(bundle: Bundle) -> int:
    return sum(bundle.layer_weight_bytes(i) for i in range(len(bundle.spec.layers)))


def generate_memory(bundle: Bundle, stats: dict) -> dict:
    """Components of a finished generate call's plan (from its stats: capacity, prompt length, scratch)."""
    return generate_prediction(bundle, int(stats.get("prompt_tokens", 0)), int(stats.get("kv_bytes_allocated", 0)),
                               int(stats.get("prefill_scratch_bytes", 0)))


def generate_prediction(bundle: Bundle, n_prompt: int, kv_bytes: int, scratch_bytes: int) -> dict:
    spec = bundle.spec
    d = spec.dims
    weights = sum(bundle.layer_weight_bytes(i) for i in range(len(spec.layers)))
    weights += sum(spec.files[g.weights].size for g in spec.extra_graphs.values() if g.weights)
    weights += spec.files[spec.head.weights].size if spec.head.weights else 0  # the LM head, mapped while decoding
    fmt = spec.weights.format if spec.weights is not None else "fp32"
    loaded = weights
    if spec.head.weights is None and fmt != "fp32":  # a head tied to the quantized table reads the table's files
        loaded += sum(spec.files[f].size for f in embed_files({"embed": thaw(spec.embed)}))
    # the weight files are read at load (counted as pages, conservatively), then what the kernels keep
    sessions = SESSION_BYTES * (len(spec.layers) + len(spec.extra_graphs) + 1) + LOADED_COPY[fmt] * loaded
    hidden = 4 * d.hidden * n_prompt * 3 + 4 * d.intermediate * min(n_prompt, 256) * 3
    chunk = chunk_size(256, d.heads, n_prompt)
    attention = GEN_ATTENTION_TENSORS * min(PREFILL_SCORES_BYTES, 4 * d.heads * chunk * n_prompt)
    return {"weights": int(weights), "sessions": int(sessions), "kv": int(kv_bytes + scratch_bytes),
            "hidden": int(4 * d.hidden * n_prompt),
            "total": int(weights + sessions + kv_bytes + scratch_bytes + hidden + attention)}


def kv_plan(bundle: Bundle, n_prompt: int, max_new: int, kv_budget, policy: str = "full"):
    """The generator's KV plan and the bytes its caches and the policy's own RAM take (raises BudgetError like the engine)."""
    spec = bundle.spec
    d = spec.dims
    pol = make_policy(policy)
    # the query heads size a policy's per-layer query statistics (GQA models have more of them than KV heads)
    kp = KVPlanner(len(spec.layers), d.kv_heads, d.head_dim, bundle.max_length, kv_budget, heads=d.heads)
    max_new = kp.clamp_new(n_prompt, max_new)
    plan = kp.plan(pol, n_prompt, max_new)
    fixed = kp.fixed_bytes(pol, n_prompt + max_new) if kp.budget is not None else 0
    kv = (plan.resident + plan.fetch) * kp.slot_bytes(pol) * len(spec.layers) + fixed
    scratch = kp.scratch_bytes(plan.scratch_tokens) if plan.scratch else 0
    return plan, int(kv), int(scratch)


# ---- device plans ---------------------------------------------------------------------------------------------
APP_MARGIN = 0.75        # of a device's per-app limit: the app's own memory and the OS's slack come first
NO_LIMIT_SHARE = 0.5     # of RAM, on devices that set no per-app limit


def device_budget(device: dict) -> int:
    limit = device.get("app_memory_limit_bytes")
    return int(APP_MARGIN * limit) if limit else int(NO_LIMIT_SHARE * device["ram_bytes"])


def local_costs(bundle: Bundle, device: dict) -> tuple[dict | None, float]:
    """Probed costs of ``bundle`` and the factor that scales them to ``device``: the device's own probe (factor 1),
    else this machine's probed profile scaled by GFLOPS; (None, 1) when nothing was probed."""
    from .probe import bundle_key
    from .profiles import load, names

    key = bundle_key(bundle)
    own = (device.get("measured") or {}).get("bundles", {}).get(key)
    if own is not None:
        return own, 1.0
    for name in names():
        other = load(name)
        costs = (other.get("measured") or {}).get("bundles", {}).get(key)
        if costs is not None:
            return costs, other["sustained_gflops"] / device["sustained_gflops"]
    return None, 1.0


# Decoders' MLPs are gated (gate, up, down: three hidden x intermediate matrices); BERT's has two (up, down).
GATED_MLP_SCORINGS = ("yes_no", "lm")


def _layer_flops_per_token(bundle: Bundle, length: int) -> float:
    """One layer's FLOPs for one token attending over ``length`` positions: 2 per weight of the q/k/v/o projections
    and the MLP, counted from the manifest's dims, plus 4 per position and attention channel (QK^T and AV).
    The weight files' bytes would count an fp16 / int8 / int4 bundle's weights 2-8x short and leave out a split
    layer's qkv graph, so a quantized bundle's analytical latency came out several times too low."""
    d = bundle.spec.dims
    attn, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    inter = d.intermediate or 4 * d.hidden  # manifests without the field: the usual transformer ratio
    mlp = (3 if bundle.spec.scoring in GATED_MLP_SCORINGS else 2) * d.hidden * inter
    params = 2 * d.hidden * attn + 2 * d.hidden * kv + mlp
    return 2 * params + 4 * length * attn


def rerank_latency(bundle: Bundle, device: dict, tokens: int, max_len: int) -> tuple[float, str]:
    n = len(bundle.spec.layers)
    costs, scale = local_costs(bundle, device)
    if costs is None or costs.get("task") != "rerank":
        secs = tokens * n * _layer_flops_per_token(bundle, max_len) / (device["sustained_gflops"] * 1e9)
        return secs, "analytical (FLOPs / the device's sustained GFLOPS; probe the bundle for a measured figure)"
    per = costs["layer_s_per_token"] + costs["layer_s_per_token_per_len"] * max_len
    secs = tokens * (n * per + costs["other_s_per_token"]) + n * costs["layer_load_s"]
    return secs * scale, "probed layer costs" + ("" if scale == 1.0 else f" scaled by GFLOPS (x{scale:.2f})")


def generate_latency(bundle: Bundle, device: dict, n_prompt: int, new: int, capacity: int) -> tuple[float, str]:
    n = len(bundle.spec.layers)
    costs, scale = local_costs(bundle, device)
    if costs is None or costs.get("task") != "generate":
        flops = n * (n_prompt + new) * _layer_flops_per_token(bundle, min(capacity, n_prompt))
        return flops / (device["sustained_gflops"] * 1e9), "analytical (FLOPs / the device's sustained GFLOPS)"
    prefill = n * n_prompt * (costs["prefill_s_per_token_layer"] + costs["prefill_s_per_token_layer_per_len"] * n_prompt)
    ctx = min(capacity, n_prompt + new / 2)
    decode = max(0, new - 1) * n * (costs["decode_s_per_layer"] + costs["decode_s_per_layer_per_context"] * ctx)
    return (prefill + decode) * scale, "probed layer costs" + ("" if scale == 1.0 else f" scaled by GFLOPS (x{scale:.2f})")


def plan_rerank(bundle: Bundle, device: dict, n_docs: int, doc_tokens: int, query_tokens: int = 16,
                budget: int | None = None) -> dict:
    budget = device_budget(device) if budget is None else budget
    split_extra = 0
    if bundle.spec.layer_io.split:
        from edge_sel.runtime.rerank.prefix import qkv_weight_bytes

        split_extra = max(qkv_weight_bytes(bundle, i) for i in range(len(bundle.spec.layers)))
    planner, plan, size = rerank_plan(bundle, n_docs, doc_tokens, query_tokens, budget, split_extra=split_extra)
    costs, _ = local_costs(bundle, device)
    mem = rerank_memory(planner, plan.estimate, plan=plan, split=bool(split_extra),
                        probed_anon=_interpolate((costs or {}).get("resident_anon_bytes"), size["max_len"]))
    secs, how = rerank_latency(bundle, device, size["total_tokens"], size["max_len"])
    return {"task": "rerank", "device": device["name"], "budget_bytes": budget, "window_layers": plan.window,
            "layers": planner.n_layers, "chunk_tokens": plan.chunk_tokens, "spill": plan.spill,
            "peak_bytes": mem["total"], "components": mem, "latency_s": secs, "latency_basis": how, **size}


def plan_generate(bundle: Bundle, device: dict, n_prompt: int, new_tokens: int, kv_budget=None, policy: str = "full",
                  budget: int | None = None) -> dict:
    budget = device_budget(device) if budget is None else budget
    plan, kv, scratch = kv_plan(bundle, n_prompt, new_tokens, kv_budget, policy)
    mem = generate_prediction(bundle, n_prompt, kv, scratch)
    secs, how = generate_latency(bundle, device, n_prompt, new_tokens, plan.resident + plan.fetch)
    out = {"task": "generate", "device": device["name"], "budget_bytes": budget, "kv_resident_tokens": plan.resident,
           "kv_fetch_tokens": plan.fetch, "prefill_scratch": plan.scratch, "peak_bytes": mem["total"], "components": mem,
           "latency_s": secs, "latency_basis": how}
    if mem["total"] > budget:
        from edge_sel.runtime.errors import BudgetError

        raise BudgetError(f"generation needs about {mem['total'] / 2**20:.0f} MiB (weights {mem['weights'] / 2**20:.0f} MiB "
                          f"+ sessions {mem['sessions'] / 2**20:.0f} MiB + KV {mem['kv'] / 2**20:.0f} MiB + activations), "
                          f"above the {budget / 2**20:.0f} MiB budget",
                          minimum_bytes=mem["total"])
    return out
