"""One decode step: the new token through every (non-skipped) layer over its bounded cache.

:func:`decode_step` passes each session its feeds as a dict and gets fresh output arrays back. :class:`BoundDecoder`
runs the same step over onnxruntime IO bindings made once per call: every layer's q/k/v outputs, the hidden state
(two buffers, each layer reading one and writing the other), the position and the attention statistics are
preallocated, and a cache the policy reads in place is bound once, so a step passes no feeds and onnxruntime
allocates no outputs (measured in ``benchmarks/decode_ab.py``). Same graphs, same numbers.
"""

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


def bindable(model: DecoderModel) -> bool:
    """Whether every layer graph is an onnxruntime session (IO binding); the Core ML backend's stages are not."""
    return all(hasattr(s, "io_binding") for pair in model.layers for s in pair)


class BoundDecoder:
    """:func:`decode_step` over IO bindings made once for one call (its caches never move: ``LayerCache`` buffers are
    allocated once). The arrays a step hands the policy (``q``, the attention statistics) are this object's buffers,
    valid until the next layer runs — policies read them at once, as they read the arrays :func:`decode_step` passes."""

    def __init__(self, model: DecoderModel, call: Call, hidden: int, heads: int, kv_heads: int, head_dim: int):
        self.model, self.call = model, call
        self.h = (np.zeros((1, 1, hidden), np.float32), np.zeros((1, 1, hidden), np.float32))
        self.pos = np.zeros((1, 1), np.int64)
        slots = max(c.capacity + c.fetch for c in call.caches)
        # one pair for all layers: a layer's statistics are read before the next layer runs (as transient as the arrays
        # onnxruntime allocated per run), so the budget's accounting of the call is unchanged
        self.stats = (np.zeros(kv_heads * slots, np.float32), np.zeros(kv_heads * slots, np.float32))
        self.kv_heads = kv_heads
        self.layers = []
        for qkv, attn in model.layers:
            q = np.zeros((1, heads, 1, head_dim), np.float32)
            k, v = (np.zeros((1, kv_heads, 1, head_dim), np.float32) for _ in range(2))
            pair = []
            for par in (0, 1):  # the layer reads h[par] and writes h[1 - par]
                bq, ba = qkv.io_binding(), attn.io_binding()
                bq.bind_cpu_input("hidden", self.h[par])
                bq.bind_cpu_input("position_ids", self.pos)
                for name, a in (("q", q), ("k", k), ("v", v)):
                    _bind_out(bq, name, a)
                ba.bind_cpu_input("hidden", self.h[par])
                ba.bind_cpu_input("q", q)
                ba.bind_cpu_input("position_ids", self.pos)
                _bind_out(ba, "hidden_out", self.h[1 - par])
                pair.append([bq, ba, None, -1])  # [qkv binding, attn binding, the bound cache's k array, bound slots]
            self.layers.append((q, k, v, pair))

    def step(self, tok: int, pos: int) -> np.ndarray:
        """:func:`decode_step` for token ``tok`` at position ``pos``: the next token's logits."""
        model, call = self.model, self.call
        policy = call.policy
        observe = policy.needs_decode_attention
        par = 0
        self.h[0][...] = model.embed(np.array([[tok]], dtype=np.int64))
        self.pos[0, 0] = pos
        p = self.pos[0]
        for L, (qkv, attn) in enumerate(model.layers):
            if policy.skip_layer(L):
                continue
            c = call.caches[L]
            q, k, v, pair = self.layers[L]
            bound = pair[par]
            qkv.run_with_iobinding(bound[0])
            if c.n + 1 > c.capacity:
                call.make_room(L, 1, "decode")
            s = c.append(k, v, p)
            policy.appended(L, c, s)
            slots = policy.attend(L, q, c)
            ba = bound[1]
            if slots is None:
                if bound[2] is not c.k:  # the cache read in place: bound once per call
                    kc, vc, kp = c.full()
                    self._bind_cache(bound, c.k, kc, vc, kp)
            else:
                kc, vc, kp = c.gather(slots)
                call.scratch_peak = max(call.scratch_peak, kc.nbytes + vc.nbytes + kp.nbytes)
                self._bind_cache(bound, None, kc, vc, kp)
            attn.run_with_iobinding(ba)
            if observe:
                m = self.kv_heads * bound[3]
                shape = (1, self.kv_heads, bound[3])
                policy.observe(L, c, self.stats[0][:m].reshape(shape), self.stats[1][:m].reshape(shape), slots, "decode")
            par = 1 - par
        return model.logits(self.h[par][:, -1])

    def _bind_cache(self, bound: list, key, kc: np.ndarray, vc: np.ndarray, kp: np.ndarray) -> None:
        ba = bound[1]
        ba.bind_cpu_input("k_cache", kc)
        ba.bind_cpu_input("v_cache", vc)
        ba.bind_cpu_input("key_pos", np.ascontiguousarray(kp))
        S = kc.shape[2]
        m = self.kv_heads * S
        if m > self.stats[0].size:  # a selection wider than every cache (padded): larger buffers, every binding rebinds
            self.stats = (np.zeros(m, np.float32), np.zeros(m, np.float32))
            for *_, pair in self.layers:
                for b in pair:
                    b[2], b[3] = None, -1
        if S != bound[3]:
            for name, buf in zip(("attn_sum", "attn_max"), self.stats):
                _bind_out(ba, name, buf[:m].reshape(1, self.kv_heads, S))
            bound[3] = S
        bound[2] = key


def _bind_out(binding, name: str, a: np.ndarray) -> None:
    binding.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
