"""One decode step: the new token through every (non-skipped) layer over its bounded cache."""

from __future__ import annotations

import numpy as np

from .call import Call
from .model import DecoderModel


def decode_step(model: DecoderModel, call: Call, tok: int, pos: int) -> np.ndarray:
    """Append token ``tok`` at position ``pos`` to every layer's cache (evicting a block when full) and
    return the next token's logits. The policy chooses what each attention reads (``attend``)."""
    policy = call.policy
    h = model.embed(np.array([[tok]], dtype=np.int64))
    p = np.array([[pos]], dtype=np.int64)
    observe = policy.needs_decode_attention
    for L, (qkv, attn) in enumerate(model.layers):
        if policy.skip_layer(L):
            continue
        c = call.caches[L]
        q, k, v = qkv.run(None, {"hidden": h, "position_ids": p})
        if c.n + 1 > c.capacity:
            call.make_room(L, 1, "decode")
        s = c.append(k, v, p[0])
        policy.appended(L, c, s)
        slots = policy.attend(L, q, c)
        if slots is None:
            kc, vc, kp = c.full()
        else:
            kc, vc, kp = c.gather(slots)
            call.scratch_peak = max(call.scratch_peak, kc.nbytes + vc.nbytes + kp.nbytes)
        h, asum, amax = attn.run(None, {"hidden": h, "q": q, "k_cache": kc, "v_cache": vc, "key_pos": kp, "position_ids": p})
        if observe:
            policy.observe(L, c, asum, amax, slots, "decode")
    return model.logits(h[:, -1])
