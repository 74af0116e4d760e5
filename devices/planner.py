"""Predict a call's peak memory (and, with a device profile, its latency) before running it.

Memory reuses the engines' own planners (:mod:`edge_sel.runtime.planning`): the reranker's window, chunk and
spill decision come from :class:`~edge_sel.runtime.planning.rerank.Planner` exactly as the engine would choose
them, and the generator's cache from :class:`~edge_sel.runtime.planning.kv.KVPlanner`. The predictions are split
by the same components a profile measures (:mod:`edge_sel.runtime.profiler`): weights (file-backed pages),
hidden states or KV cache (engine-known bytes) and the total share of the process above its idle RSS.
"""

from __future__ import annotations

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.generate.prefill import PREFILL_SCORES_BYTES, chunk_size
from edge_sel.runtime.kvcache import LayerCache
from edge_sel.runtime.planning import KVPlanner, Planner
from edge_sel.runtime.policies import make_policy

# What a generate call holds besides weights and cache, measured on this repository's bundles: the prompt's
# hidden states (input, output and the q/k/v of one chunk) and a chunk's attention tensors.
GEN_ATTENTION_TENSORS = 4


def rerank_memory(planner: Planner, estimate: dict, stats: dict | None = None) -> dict | None:
    """The plan's components (bytes) as a profile measures them; None without a full estimate."""
    need = ("fixed", "layers", "hidden", "embed", "activations")
    if not all(k in estimate for k in need):
        return None
    total = int(estimate["fixed"] + estimate["hidden"] + max(estimate["embed"], estimate["layers"] + estimate["activations"]))
    return {"weights": int(estimate["layers"]), "hidden": int(estimate["hidden"]), "total": total}


def rerank_plan(bundle: Bundle, n_docs: int, doc_tokens: int, query_tokens: int = 16, budget: int | None = None,
                allow_spill: bool = True, split_extra: int = 0):
    """The reranker's plan for ``n_docs`` candidates of ``doc_tokens`` tokens (raises BudgetError like the engine)."""
    planner = Planner(bundle)
    planner.layer_bytes += split_extra
    spec = bundle.spec
    per_item = min(bundle.max_length, doc_tokens + query_tokens + 4)  # pair / prompt around the document
    total, max_len = n_docs * per_item, per_item
    embed_bytes = _embed_touched(bundle, min(spec.embed.shape[0], total))
    plan = planner.plan(budget, total, max_len, embed_bytes, allow_spill)
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
    hidden = 4 * d.hidden * n_prompt * 3 + 4 * d.intermediate * min(n_prompt, 256) * 3
    chunk = chunk_size(256, d.heads, n_prompt)
    attention = GEN_ATTENTION_TENSORS * min(PREFILL_SCORES_BYTES, 4 * d.heads * chunk * n_prompt)
    return {"weights": int(weights), "kv": int(kv_bytes + scratch_bytes), "hidden": int(4 * d.hidden * n_prompt),
            "total": int(weights + kv_bytes + scratch_bytes + hidden + attention)}


def kv_plan(bundle: Bundle, n_prompt: int, max_new: int, kv_budget, policy: str = "full"):
    """The generator's KV plan and the bytes its caches allocate (raises BudgetError like the engine)."""
    spec = bundle.spec
    d = spec.dims
    pol = make_policy(policy)
    kp = KVPlanner(len(spec.layers), d.kv_heads, d.head_dim, bundle.max_length, kv_budget)
    max_new = kp.clamp_new(n_prompt, max_new)
    plan = kp.plan(pol, n_prompt, max_new)
    kv = (plan.resident + plan.fetch) * kp.slot_bytes(pol) * len(spec.layers)
    scratch = n_prompt * LayerCache.bytes_per_slot(d.kv_heads, d.head_dim) if plan.scratch else 0
    return plan, int(kv), int(scratch)
