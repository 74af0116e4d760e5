"""Chunked prefill, layer by layer: each layer runs the prompt in chunks, so no full-length attention
matrix and no over-budget cache ever exist.

"layer" mode (look-once, the default when evicting): the layer's whole prompt K/V is built in one
scratch buffer shared by all layers, so the prefill is exact; then the policy compresses it once into
the layer's budgeted cache, scored by the observation window's attention over every prompt key (SnapKV
/ MPCache). "rolling" mode: the layer's own cache is the only buffer and the policy evicts as chunks
arrive (strict bound, no scratch; the window sees only what survived).

A policy may ask for context-reconstruction passes (KVzip, :mod:`.reconstruct`): in "layer" mode they run at each
layer after its context, over the scratch, before it is compressed.

A protected suffix (the last prompt tokens, e.g. a question after a long context) is run per layer
after its context was compressed (the policy never sees it while compressing) over the compressed
cache, and its keys/values are appended uncompressed — kvpress's "context compressed, question not".
"""

from __future__ import annotations

import numpy as np

from .. import trace
from ..memory import trim_heap
from .call import Call
from .model import DecoderModel
from .reconstruct import run_passes

# Prompts longer than this trim the heap after every layer's pass: each pass frees its activations, and without
# a trim the allocator keeps them (measured: ~150 MiB of freed heap left in RSS after a 1k-token prompt at 4 bits).
TRIM_HEAP_TOKENS = 128

# A prefill chunk's attention materialises a few [heads, chunk, keys] f32 tensors (scores, masked scores,
# probabilities, the policy's statistics), so its transient memory grows with the prompt: long prompts get
# shorter chunks, keeping one such tensor under this many bytes (2 MiB: a 1k-token prompt's peak RSS at 4 bits is
# ~18 MiB lower than at 4 MiB and ~60 MiB lower than at 12 MiB; the extra session runs of the shorter chunks cost
# a few hundred microseconds per chunk, little beside the chunk's own compute).
PREFILL_SCORES_BYTES = 2 << 20


def chunk_size(chunk_tokens: int, heads: int, n_keys: int) -> int:
    """Prefill chunk for a prompt of ``n_keys`` tokens: ``chunk_tokens``, or fewer (a multiple of 32, at
    least 32) when one ``[heads, chunk, n_keys]`` f32 tensor would exceed :data:`PREFILL_SCORES_BYTES`."""
    fit = PREFILL_SCORES_BYTES // (4 * heads * max(1, int(n_keys)))
    return min(chunk_tokens, max(32, fit // 32 * 32))


def plan_chunks(n: int, chunk: int, obs: int) -> list[tuple[int, int, str]]:
    """Chunks of at most ``chunk`` tokens; the last ``obs`` tokens (the observation window) get their own."""
    obs = min(obs, n)
    end = n - obs
    out = [(a, min(end, a + chunk), "prefill") for a in range(0, end, chunk)]
    out += [(a, min(n, a + chunk), "window") for a in range(end, n, chunk)]
    return out


def final_target(cap: int, n_sfx: int, max_new: int, align: int) -> int:
    """What a look-once compression keeps: room for a decode block, or with a protected suffix room for it
    and, when that leaves at least half the room, every new token (then decoding never evicts)."""
    block = -(-min(32, max(1, cap // 8), max_new) // align) * align
    target = max(0, (cap - block) // align * align)
    if n_sfx:
        room = cap - n_sfx
        target = room - max_new if room - max_new >= room // 2 else max(1, room - block)
    return target


def prefill(model: DecoderModel, call: Call, chunk_tokens: int, heads: int) -> np.ndarray:
    """Run the prompt through every layer, filling (and compressing) the caches; the last token's logits."""
    policy = call.policy
    cap = min(c.capacity for c in call.caches)  # the smallest layer decides whether the prompt must be evicted
    ids = np.asarray(call.prompt_ids, dtype=np.int64)[None]
    N, max_new = ids.shape[1], call.max_new
    release_weights = model.releases_weights(N)  # the engine already dropped the last call's mappings
    tk = trace.begin("embed", tokens=N)
    hidden = model.embed(ids)
    trace.end(tk)
    positions = np.arange(ids.shape[1], dtype=np.int64)
    sfx_from = N - call.suffix  # positions >= sfx_from: the protected suffix
    evicting = N + max_new > cap
    scratch = call.scratch
    rolling = evicting and scratch is None
    chunk = chunk_size(chunk_tokens, heads, N) if not rolling else max(1, min(chunk_tokens, cap // 4))
    obs = policy.observation_window(sfx_from)
    if rolling:
        obs = min(obs, max(1, cap // 2))
    passes = call.passes if scratch is not None else []
    for p in passes:
        p.hidden = model.embed(p.ids[None])
    pass_chunk = chunk_size(chunk_tokens, heads, scratch.capacity) if passes else 0
    for L, (qkv, attn) in enumerate(model.layers):
        tk = trace.begin("prefill.layer", layer=L)
        c = call.caches[L]
        work = c if scratch is None else scratch
        work.reset()
        out = np.empty_like(hidden)
        q = None
        n_sfx = int((positions >= sfx_from).sum()) if call.suffix else 0
        n_ctx = hidden.shape[1] - n_sfx
        for a, b, phase in plan_chunks(n_ctx, chunk, obs):
            h = hidden[:, a:b]
            p = positions[None, a:b]
            q, k, v = qkv.run(None, {"hidden": h, "position_ids": p})
            policy.queries(L, q, p[0], phase)
            if work.n + (b - a) > work.capacity:
                call.make_room(L, b - a, phase)
            s = work.append(k, v, p[0])
            if scratch is None:
                policy.appended(L, c, s)
            kc, vc, kp = work.prefix()
            ho, asum, amax = attn.run(None, {"hidden": h, "q": q, "k_cache": kc, "v_cache": vc, "key_pos": kp,
                                             "position_ids": p})
            policy.observe(L, work, asum, amax, None, phase)
            out[:, a:b] = ho
        if passes:  # KVzip's scoring: the context rebuilt over this layer's K/V, its keys then dropped
            run_passes(qkv, attn, passes, scratch, pass_chunk,
                       lambda asum, amax, L=L: policy.observe(L, scratch, asum, amax, None, "reconstruct"))
        if scratch is not None:
            target = None
            if scratch.n + n_sfx + max_new > c.capacity:
                target = final_target(c.capacity, n_sfx, max_new, policy.align)
                call.evictions += 1
                trace.instant("evict", layer=L, phase="final", tokens=int(scratch.n), kept=int(target))
            policy.compress(L, scratch, target, "final", into=c)
        if n_sfx:
            q = prefill_suffix(model, call, L, hidden, positions, out, n_ctx, chunk_tokens, q)
            work = c
        keep = policy.after_layer(L, hidden, out, q[0, :, -1], work, positions)
        hidden = out
        if N > TRIM_HEAP_TOKENS:
            trim_heap()  # the layer's freed attention temporaries leave RSS before the next layer runs
        if release_weights:
            model.release_layer(L)  # ... and its weights: activations and the whole model's weights never peak together
        if keep is not None:
            hidden = np.ascontiguousarray(hidden[:, keep])
            positions = positions[keep]
        trace.end(tk, tokens=int(hidden.shape[1]), kv_tokens=int(c.n))
        trace.counter("engine", lambda: {"hidden_bytes": hidden.nbytes})
    if release_weights:  # decoding runs every layer per token: map the weights back now, inside the prefill's
        model.map_layers()  # time, so the first decode step is not charged the page faults
    if call.keep_suffix_hidden:
        n_sfx = int((positions >= sfx_from).sum())
        call.suffix_hidden = hidden[:, hidden.shape[1] - n_sfx - 1:]
    return model.logits(hidden[:, -1])


def prefill_suffix(model: DecoderModel, call: Call, L: int, hidden, positions, out, n_ctx: int, chunk_tokens: int,
                   q_ctx=None):
    """The protected suffix of layer ``L``: attends to the compressed context and to itself; its
    keys/values are appended uncompressed (in "rolling" mode the context makes room for them first).
    The policy may fill the cache's fetch area before each chunk (``before_suffix_chunk``)."""
    policy, c = call.policy, call.caches[L]
    qkv, attn = model.layers[L]
    T = hidden.shape[1]
    if c.n + (T - n_ctx) > c.capacity:
        room = c.capacity - (T - n_ctx)
        reserve = call.max_new if room - call.max_new >= room // 2 else 0
        call.make_room(L, T - n_ctx + reserve, "window")
    step = policy.suffix_step(chunk_tokens, c)
    chunks = [(a, min(T, a + step)) for a in range(n_ctx, T, step)]
    # the layer's suffix queries, all known before any of its attention runs
    qkvs = [qkv.run(None, {"hidden": hidden[:, a:b], "position_ids": positions[None, a:b]}) for a, b in chunks]
    queries = [x[0] for x in qkvs]
    q = None
    for i, (a, b) in enumerate(chunks):
        h = hidden[:, a:b]
        p = positions[None, a:b]
        q, k, v = qkvs[i]
        policy.before_suffix_chunk(L, c, i, queries, q_ctx)
        s = c.append(k, v, p[0])
        policy.appended(L, c, s)
        kc, vc, kp = c.prefix()
        ho, asum, amax = attn.run(None, {"hidden": h, "q": q, "k_cache": kc, "v_cache": vc, "key_pos": kp,
                                         "position_ids": p})
        if policy.needs_decode_attention:  # read like decode steps (H2O / MPCache keep accumulating)
            policy.observe(L, c, asum, amax, c.read_slots(), "decode")
        out[:, a:b] = ho
    return q
