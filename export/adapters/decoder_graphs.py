"""Torch modules for decoder layers and heads, with the bundle's fixed I/O names (any Llama-shaped decoder).

Family differences enter through three hooks of the decoder adapter (:class:`edge_sel.export.adapters.llama.LlamaAdapter`):
``qkv_parts(attn)`` / ``project_qkv(m, x, q_shape, kv_shape)`` (separate or fused q/k/v projections) and ``apply_rotary(q, k, cos, sin)``.
Norms and MLPs are the model's own modules, so RMSNorm variants and gated MLPs need no hook.

Rerank, whole layer (``layer_graphs``): ``hidden [B,T,H], mask [B,T], position_ids [B,T] -> hidden_out``; rotary
embeddings are computed inside the graph from ``position_ids``, the causal + padding mask from positions and ``mask``.

Split layers (``split_layer_graphs``; generate bundles and prefix-reuse rerank bundles), so that the runtime owns the
K/V between the two graphs (query-aware KV selection, MPCache / Quest; a shared prompt prefix computed once):

* ``qkv`` (``layers/layer_NNN_qkv.onnx``): ``hidden [B,T,H], position_ids [B,T]`` ->
  ``q [B,heads,T,D], k [B,kv,T,D], v [B,kv,T,D]`` (input norm, projections, q/k norms where the family has them,
  rotary embedding; keys leave the graph already rotated, so evicting tokens keeps positions right);
* ``attn`` (``layers/layer_NNN.onnx``): ``hidden [B,T,H], q, k_cache [B,kv,S,D], v_cache [B,kv,S,D],
  key_pos [B,1|kv,S], position_ids [B,T]`` -> ``hidden_out [B,T,H], attn_sum [B,kv,S], attn_max [B,kv,S]``.
  Key j is visible to query i iff ``key_pos[j] <= position_ids[i]``: the causal mask, padding and empty cache slots
  (position :data:`EMPTY_POS`) all come from that one rule, built in-graph. ``attn_sum`` / ``attn_max`` are the
  attention probabilities summed / maxed over the query group and the T queries (what H2O, SnapKV and MPCache's
  static eviction score keys with), one reduction over probabilities the graph computes anyway.

Heads: yes/no (``pooled [B,H] -> score [B]``: final norm, the two lm_head rows, ``logit(yes) - logit(no)``) and the
full-vocabulary LM head (``hidden [B,H] -> logits [B,V]``).
"""

from __future__ import annotations

from edge_sel.runtime.manifest import EMPTY_POS

from .base import GraphSpec

# The attention core as exporters before the grouped form wrote it (queries [B,kv,G,T,D] against the cache broadcast
# over the group: every cached key and value read G times). Only tests set it, to build bundles for the upgrade pass.
BROADCAST_ATTENTION = False


def dims(config, n_layers: int) -> dict[str, int]:
    H = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or H // heads
    return {"num_layers": n_layers, "hidden": H, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", heads) or heads, "head_dim": head_dim,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size}


def layer_graphs(model) -> list[GraphSpec]:
    """Whole-layer rerank graphs (the decoder layer's own forward)."""
    import torch

    inner = model.model
    rotary = inner.rotary_emb
    H = model.config.hidden_size
    minf = torch.finfo(torch.float32).min

    class LayerGraph(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer
            self.rotary = rotary

        def forward(self, hidden, mask, position_ids):
            # key j visible to query i iff pos_j <= pos_i and j is not padding
            allowed = (position_ids[:, None, None, :] <= position_ids[:, None, :, None]) & (mask[:, None, None, :] > 0.5)
            bias = torch.where(allowed, torch.zeros((), dtype=hidden.dtype), torch.full((), minf, dtype=hidden.dtype))
            cos, sin = self.rotary(hidden, position_ids)
            out = self.layer(hidden, attention_mask=bias, position_ids=position_ids, position_embeddings=(cos, sin))
            return out[0] if isinstance(out, tuple) else out

    sample = (torch.randn(2, 7, H), torch.ones(2, 7), torch.arange(7)[None].repeat(2, 1))
    sample[1][1, 5:] = 0
    axes = {"hidden": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"},
            "position_ids": {0: "batch", 1: "seq"}, "hidden_out": {0: "batch", 1: "seq"}}
    return [GraphSpec(LayerGraph(layer).eval(), sample, ["hidden", "mask", "position_ids"], ["hidden_out"], axes)
            for layer in inner.layers]


def split_layer_graphs(model, family) -> list[tuple[GraphSpec, GraphSpec]]:
    """Every layer's ``(qkv, attn)`` graphs; ``family``: the decoder adapter (projection and rotary hooks)."""
    import torch

    inner = model.model
    d = dims(model.config, len(inner.layers))
    H, heads, kvh, D = d["hidden"], d["heads"], d["kv_heads"], d["head_dim"]
    G = heads // kvh
    rotary = inner.rotary_emb
    minf = torch.finfo(torch.float32).min

    class QKV(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.norm = layer.input_layernorm
            a = layer.self_attn
            for name, part in family.qkv_parts(a).items():
                setattr(self, name, part)
            self.q_norm = getattr(a, "q_norm", None)
            self.k_norm = getattr(a, "k_norm", None)
            self.rotary = rotary

        def forward(self, hidden, position_ids):
            B, T = hidden.shape[0], hidden.shape[1]
            x = self.norm(hidden)
            q, k, v = family.project_qkv(self, x, (B, T, heads, D), (B, T, kvh, D))
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            cos, sin = self.rotary(hidden, position_ids)
            q, k = family.apply_rotary(q, k, cos, sin)
            return q, k, v

    class Attn(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            a = layer.self_attn
            self.o_proj = a.o_proj
            self.scaling = float(a.scaling)
            self.post_norm = layer.post_attention_layernorm
            self.mlp = layer.mlp

        def forward(self, hidden, q, k_cache, v_cache, key_pos, position_ids):
            B, T = hidden.shape[0], hidden.shape[1]
            S = k_cache.shape[2]
            # a kv head's G query heads as G*T rows of one product: each cached key and value is read once per
            # kv head (a [B,kv,G,T,D] x [B,kv,1,D,S] broadcast reads the whole cache G times, most of a long decode step)
            if BROADCAST_ATTENTION:  # the form exporters wrote before; kept to build old bundles for the upgrade tests
                scores = torch.matmul(q.reshape(B, kvh, G, T, D), k_cache[:, :, None].transpose(-1, -2)) * self.scaling
            else:
                qg = q.reshape(B, kvh, G * T, D)                  # query heads grouped by their kv head
                scores = (torch.matmul(qg, k_cache.transpose(-1, -2)) * self.scaling).reshape(B, kvh, G, T, S)
            allowed = key_pos[:, :, None, None, :] <= position_ids[:, None, None, :, None]
            scores = torch.where(allowed, scores, torch.full((), minf, dtype=scores.dtype))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            if BROADCAST_ATTENTION:
                out = torch.matmul(probs, v_cache[:, :, None])    # [B,kv,G,T,D]
            else:
                out = torch.matmul(probs.reshape(B, kvh, G * T, S), v_cache)   # [B,kv,G*T,D]
            out = out.reshape(B, heads, T, D).transpose(1, 2).reshape(B, T, heads * D)
            h = hidden + self.o_proj(out)
            h = h + self.mlp(self.post_norm(h))
            return h, probs.sum(dim=(2, 3)), probs.amax(dim=(2, 3))

    B, T, S = 1, 5, 9
    qkv_sample = (torch.randn(B, T, H), torch.arange(4, 4 + T)[None])
    attn_sample = (torch.randn(B, T, H), torch.randn(B, heads, T, D), torch.randn(B, kvh, S, D), torch.randn(B, kvh, S, D),
                   torch.cat([torch.arange(S - 1), torch.tensor([EMPTY_POS])])[None, None].repeat(1, kvh, 1),
                   torch.arange(4, 4 + T)[None])
    bt = {0: "batch", 1: "seq"}
    qkv_axes = {"hidden": bt, "position_ids": bt, "q": {0: "batch", 2: "seq"}, "k": {0: "batch", 2: "seq"},
                "v": {0: "batch", 2: "seq"}}
    attn_axes = {"hidden": bt, "q": {0: "batch", 2: "seq"}, "k_cache": {0: "batch", 2: "slots"},
                 "v_cache": {0: "batch", 2: "slots"}, "key_pos": {0: "batch", 1: "pos_heads", 2: "slots"},
                 "position_ids": bt, "hidden_out": bt, "attn_sum": {0: "batch", 2: "slots"},
                 "attn_max": {0: "batch", 2: "slots"}}
    return [(GraphSpec(QKV(layer).eval(), qkv_sample, ["hidden", "position_ids"], ["q", "k", "v"], qkv_axes),
             GraphSpec(Attn(layer).eval(), attn_sample, ["hidden", "q", "k_cache", "v_cache", "key_pos", "position_ids"],
                       ["hidden_out", "attn_sum", "attn_max"], attn_axes))
            for layer in inner.layers]


def split_layer_io(pairs: list[tuple[GraphSpec, GraphSpec]]) -> dict:
    """``layer_io`` of split layers: both graphs' I/O names and the empty-slot position."""
    qkv, attn = pairs[0]
    return {"qkv": {"inputs": qkv.input_names, "outputs": qkv.output_names},
            "attn": {"inputs": attn.input_names, "outputs": attn.output_names}, "empty_pos": EMPTY_POS}


def yes_no_head(model, yes: int, no: int) -> GraphSpec:
    """Final norm and the two lm_head rows: ``score = logit(yes) - logit(no)`` (2 x hidden instead of vocab x hidden)."""
    import torch

    H = model.config.hidden_size
    w = model.lm_head.weight.detach()
    rows = torch.stack([w[yes], w[no]])
    bias = None
    if getattr(model.lm_head, "bias", None) is not None:
        bias = model.lm_head.bias.detach()[[yes, no]]
    norm = model.model.norm

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = norm
            self.proj = torch.nn.Linear(H, 2, bias=bias is not None)
            self.proj.weight.data.copy_(rows)
            if bias is not None:
                self.proj.bias.data.copy_(bias)

        def forward(self, pooled):
            logits = self.proj(self.norm(pooled))
            return logits[:, 0] - logits[:, 1]

    return GraphSpec(Head().eval(), (torch.randn(2, H),), ["pooled"], ["score"], {"pooled": {0: "batch"}, "score": {0: "batch"}})


def lm_head(model) -> GraphSpec:
    import torch

    norm, head = model.model.norm, model.lm_head

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lm_head = norm, head

        def forward(self, hidden):
            return self.lm_head(self.norm(hidden))

    H = model.config.hidden_size
    return GraphSpec(Head().eval(), (torch.randn(2, H),), ["hidden"], ["logits"], {"hidden": {0: "batch"}, "logits": {0: "batch"}})
