"""A survey of the prompt's context before the cache is planned: one plain layer-by-layer pass that only records.

A look-once prefill compresses layer ``L`` before layer ``L + 1`` has run, so a split of the KV budget across layers
measured on the prompt itself (KVzip's and Ada-KV's top-k over every layer's scores at once) cannot be taken during
it. A policy that wants one names a recorder (:meth:`Policy.surveyor`); the engine runs the context through every
layer once with that recorder (one scratch of the context's K/V, nothing cached, the hidden states moving on), hands
the recording back (:meth:`Policy.surveyed`) and only then plans the caches (``layer_shares`` may now use it). A
recorder that asks for context-reconstruction passes (its ``reconstruction``: KVzip's score, :mod:`.reconstruct`)
gets them in the survey (the policy's ``survey_tokens`` has the planner size the scratch for them). The survey costs
one more prefill of the context (on a 1792-token context the prefill took ~1.5x as long, ~2.4x with the passes); its
scratch is no larger than the look-once prefill's (planned with the passes), which the budget already pays for, and
the caches do not exist yet while it runs.
"""

from __future__ import annotations

import numpy as np

from ..kvcache import LayerCache
from ..policies import Context, Policy
from .model import DecoderModel
from .prefill import chunk_size, plan_chunks
from .reconstruct import run_passes


def survey(model: DecoderModel, ids: list[int], recorder: Policy, ctx: Context, chunk_tokens: int,
           release: bool = False, passes: list | None = None) -> Policy:
    """Run ``ids`` through every layer of ``model`` in chunks, ``recorder`` seeing each chunk's queries and attention
    (phase ``"prefill"``), then the context-reconstruction ``passes`` (phase ``"reconstruct"``, :mod:`.reconstruct`);
    ``release``: each layer's weights leave RSS after its pass, as in the prefill. Returns the recorder."""
    n = len(ids)
    passes = passes or []
    recorder.begin(ctx)
    hidden = model.embed(np.asarray(ids, dtype=np.int64)[None])
    for rp in passes:
        rp.hidden = model.embed(rp.ids[None])
    positions = np.arange(n, dtype=np.int64)
    scratch = LayerCache(ctx.kv_heads, n + max((len(rp.ids) for rp in passes), default=0), ctx.head_dim)
    chunk = chunk_size(chunk_tokens, ctx.heads, n)
    try:
        for L, (qkv, attn) in enumerate(model.layers):
            scratch.reset()
            out = np.empty_like(hidden)
            for a, b, phase in plan_chunks(n, chunk, 0):
                p = positions[None, a:b]
                q, k, v = qkv.run(None, {"hidden": hidden[:, a:b], "position_ids": p})
                recorder.queries(L, q, p[0], phase)
                scratch.append(k, v, p[0])
                kc, vc, kp = scratch.prefix()
                ho, asum, amax = attn.run(None, {"hidden": hidden[:, a:b], "q": q, "k_cache": kc, "v_cache": vc,
                                                 "key_pos": kp, "position_ids": p})
                recorder.observe(L, scratch, asum, amax, None, phase)
                out[:, a:b] = ho
            if passes:
                run_passes(qkv, attn, passes, scratch, chunk_size(chunk_tokens, ctx.heads, scratch.capacity),
                           lambda asum, amax, L=L: recorder.observe(L, scratch, asum, amax, None, "reconstruct"))
            hidden = out
            if release:
                model.release_layer(L)
    finally:
        recorder.end()
    return recorder
