"""Context reconstruction inside the look-once, layer-by-layer prefill (KVzip's scoring pass).

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (2025): after the context is
prefilled, the model is fed an instruction to repeat it followed by the context again; a context key is scored by
the largest attention any of these repeating queries pays it. A key the model needs to rebuild the context is one
any later question may need, so the score does not depend on the question (and, unlike the prompt's own attention,
not on how many later prompt queries a key happens to have).

A layer-by-layer prefill runs the passes inside the same layer loop: each pass's hidden states are carried from
layer to layer beside the context's; at layer ``L``, after the context's chunks, the pass's tokens (positions right
after the context) run in chunks over the scratch — the whole context plus the pass's own earlier tokens, as in the
model's causal forward pass — and their attention over the context's keys is handed to the policy (phase
``"reconstruct"``); then the pass's keys leave the scratch, before the layer is compressed. A context longer than
one pass is rebuilt chunk by chunk (one pass each). The passes cost about one more prefill of the context, with
longer attention: the prefill took ~1.5x as long on a 1792-token context. The scratch holds the context and one pass
(:meth:`Policy.reconstruction`, counted by the planner).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the instruction before the repeated context (KVzip's wording; a plain newline where a chat template would end)
INSTRUCTION = "\n\nRepeat the previous context exactly.\n"
# the shortest context piece worth a pass
MIN_PIECE = 32


@dataclass
class RepeatPass:
    ids: np.ndarray        # [T] the instruction and a piece of the context
    positions: np.ndarray  # [T] right after the context
    hidden: np.ndarray | None = None  # [1, T, hidden] entering the current layer


def repeat_passes(instruction: list[int], context: list[int], length: int, first: int) -> list[RepeatPass]:
    """Passes of at most ``length`` tokens: ``instruction`` + consecutive pieces of ``context`` (from ``first``: a
    leading special token is not repeated), each placed right after the context; none when no piece fits."""
    n_ctx = len(context)
    piece = length - len(instruction)
    if piece < MIN_PIECE or n_ctx - first < 1:
        return []
    out = []
    for a in range(first, n_ctx, piece):
        ids = np.asarray(list(instruction) + list(context[a:a + piece]), dtype=np.int64)
        out.append(RepeatPass(ids, np.arange(n_ctx, n_ctx + len(ids), dtype=np.int64)))
    return out


def run_passes(qkv, attn, passes: list[RepeatPass], scratch, chunk: int, observe) -> None:
    """One layer of every pass over ``scratch`` (which holds the layer's context K/V): ``observe(asum, amax)`` gets each
    chunk's attention over the context's keys; each pass's hidden states move on to the next layer; the scratch is
    left holding the context only."""
    n_ctx = scratch.n
    for p in passes:
        out = np.empty_like(p.hidden)
        try:
            for a in range(0, len(p.ids), chunk):
                b = min(len(p.ids), a + chunk)
                h = p.hidden[:, a:b]
                pos = p.positions[None, a:b]
                q, k, v = qkv.run(None, {"hidden": h, "position_ids": pos})
                scratch.append(k, v, pos[0])
                kc, vc, kp = scratch.prefix()
                ho, asum, amax = attn.run(None, {"hidden": h, "q": q, "k_cache": kc, "v_cache": vc, "key_pos": kp,
                                                 "position_ids": pos})
                observe(asum[..., :n_ctx], amax[..., :n_ctx])
                out[:, a:b] = ho
        finally:
            scratch.truncate(n_ctx)
        p.hidden = out
