"""``export(..., task="generate")``: Llama-family decoders (Llama, SmolLM2, Qwen2, Qwen3, Mistral) as
generation bundles whose KV cache the runtime owns.

Each decoder layer is split in two ONNX graphs so that a policy can look at the *current* query
before choosing which cached keys the attention reads (query-aware selection, MPCache / Quest):

* ``qkv``  (``layers/layer_NNN_qkv.onnx``): ``hidden [B,T,H], position_ids [B,T]`` ->
  ``q [B,heads,T,D], k [B,kv,T,D], v [B,kv,T,D]`` (input RMSNorm, projections, Qwen3's q/k norms,
  rotary embedding; keys leave the graph already rotated, so evicting tokens keeps positions right);
* ``attn`` (``layers/layer_NNN.onnx``): ``hidden [B,T,H], q, k_cache [B,kv,S,D], v_cache [B,kv,S,D],
  key_pos [B,1|kv,S], position_ids [B,T]`` -> ``hidden_out [B,T,H], attn_sum [B,kv,S], attn_max [B,kv,S]``.
  Key j is visible to query i iff ``key_pos[j] <= position_ids[i]`` — the causal mask, padding and
  empty cache slots (position 2**40) all come from that one rule, built in-graph; ``attn_sum`` /
  ``attn_max`` are the attention probabilities summed / maxed over the query group and the T queries
  (what H2O, SnapKV and MPCache's static eviction score keys with), one reduction over probabilities
  the graph computes anyway.

Final RMSNorm + full-vocabulary LM head is ``head.onnx`` (``hidden [B,H] -> logits [B,V]``). The
embedding table is the raw memory-mapped array, as in rerank bundles. The chat template is stored
both as the original Jinja string and rendered around a marker (``chat.before`` + user text +
``chat.after``), so the runtime applies it without transformers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_sel.runtime.bundle import Bundle, BundleWriter

from .adapters.base import GraphSpec
from .graphs import export_graph

EMPTY_POS = 2**40  # key position of an empty cache slot: never <= any query position
MARK = "\u2063EDGESELMARK\u2063"


def _dims(config, n_layers: int) -> dict[str, int]:
    H = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or H // heads
    return {"num_layers": n_layers, "hidden": H, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", heads) or heads, "head_dim": head_dim,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size}


def build_graphs(model) -> tuple[list[tuple[GraphSpec, GraphSpec]], GraphSpec, dict[str, int]]:
    """Torch modules (with sample inputs / names / dynamic axes) for every layer's qkv + attn graphs and the head."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    config = model.config
    dims = _dims(config, len(inner.layers))
    H, heads, kvh, D = dims["hidden"], dims["heads"], dims["kv_heads"], dims["head_dim"]
    G = heads // kvh
    rotary = inner.rotary_emb
    minf = torch.finfo(torch.float32).min

    class QKV(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.norm = layer.input_layernorm
            a = layer.self_attn
            self.q_proj, self.k_proj, self.v_proj = a.q_proj, a.k_proj, a.v_proj
            self.q_norm = getattr(a, "q_norm", None)
            self.k_norm = getattr(a, "k_norm", None)
            self.rotary = rotary

        def forward(self, hidden, position_ids):
            B, T = hidden.shape[0], hidden.shape[1]
            x = self.norm(hidden)
            q = self.q_proj(x).view(B, T, heads, D)
            k = self.k_proj(x).view(B, T, kvh, D)
            v = self.v_proj(x).view(B, T, kvh, D)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            cos, sin = self.rotary(hidden, position_ids)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
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
            qg = q.reshape(B, kvh, G, T, D)                       # query heads grouped by their kv head
            scores = torch.matmul(qg, k_cache[:, :, None].transpose(-1, -2)) * self.scaling   # [B,kv,G,T,S]
            allowed = key_pos[:, :, None, None, :] <= position_ids[:, None, None, :, None]
            scores = torch.where(allowed, scores, torch.full((), minf, dtype=scores.dtype))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = torch.matmul(probs, v_cache[:, :, None])        # [B,kv,G,T,D]
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
    layers = []
    for layer in inner.layers:
        layers.append((
            GraphSpec(QKV(layer).eval(), qkv_sample, ["hidden", "position_ids"], ["q", "k", "v"], qkv_axes),
            GraphSpec(Attn(layer).eval(), attn_sample, ["hidden", "q", "k_cache", "v_cache", "key_pos", "position_ids"],
                      ["hidden_out", "attn_sum", "attn_max"], attn_axes),
        ))

    norm, lm_head = inner.norm, model.lm_head

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lm_head = norm, lm_head

        def forward(self, hidden):
            return self.lm_head(self.norm(hidden))

    head = GraphSpec(Head().eval(), (torch.randn(2, H),), ["hidden"], ["logits"], {"hidden": {0: "batch"}, "logits": {0: "batch"}})
    return layers, head, dims


def chat_spec(tokenizer) -> dict[str, Any] | None:
    """Render the tokenizer's chat template around a marker: the runtime then needs no Jinja."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False, add_generation_prompt=True)
        with_sys = tokenizer.apply_chat_template([{"role": "system", "content": MARK + "S"}, {"role": "user", "content": MARK}],
                                                 tokenize=False, add_generation_prompt=True)
    except Exception:
        return None
    if text.count(MARK) != 1:
        return None
    before, after = text.split(MARK)
    spec: dict[str, Any] = {"template": template, "before": before, "after": after}
    if with_sys.count(MARK) == 2:
        sys_before, rest = with_sys.split(MARK + "S", 1)
        between = rest.split(MARK)[0]
        spec.update({"system_before": sys_before, "system_between": between})
    return spec


def stop_ids(tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id:
            ids.add(int(i))
    return sorted(ids)


def export_generate(resolved, adapter, model_type: str, out, max_length: int | None = None, verify: bool = False,
                    overwrite: bool = False, seed: int = 0, say: Callable[[str, int, int], None] | None = None,
                    verify_tolerance: float = 1e-3) -> Path:
    say = say or (lambda stage, i, n: None)
    t0 = time.perf_counter()
    say("load", 0, 1)
    model, tokenizer = adapter.load(resolved, "yes_no", seed)
    say("load", 1, 1)
    layers, head, dims = build_graphs(model)
    config = model.config
    limit = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    context = min(int(max_length or limit), limit)

    with BundleWriter(out, overwrite=overwrite) as w:
        tokenizer.backend_tokenizer.save(str(w.file("tokenizer.json")))
        embed = w.write_array("embed/tokens.bin", model.model.embed_tokens.weight.detach().float().numpy())
        entries, extra_graphs = [], {}
        n = len(layers)
        for i, (qkv, attn) in enumerate(layers):
            say("layers", i, n)
            rel = f"layers/layer_{i:03d}.onnx"
            data = export_graph(attn, w.file(rel))
            qrel = f"layers/layer_{i:03d}_qkv.onnx"
            qdata = export_graph(qkv, w.file(qrel))
            extra_graphs[f"qkv_{i:03d}"] = {"file": qrel, "weights": f"layers/{qdata}"}
            entries.append({"index": i, "source_index": i, "file": rel, "weights": f"layers/{data}", "qkv": f"qkv_{i:03d}"})
        say("layers", n, n)
        hdata = export_graph(head, w.file("head.onnx"))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        manifest: dict[str, Any] = {
            "created_by": "edge_sel 0.1.0",
            "model": {"name": resolved.name, "source": str(resolved.spec), "family": "llama", "model_type": model_type,
                      "scoring": "lm", "task": "generate"},
            "dims": dims,
            "dtype": "float32",
            "max_length": context,
            "embed": embed,
            "arrays": {},
            "layers": entries,
            "extra_graphs": extra_graphs,
            "layer_io": {"qkv": {"inputs": layers[0][0].input_names, "outputs": layers[0][0].output_names},
                         "attn": {"inputs": layers[0][1].input_names, "outputs": layers[0][1].output_names},
                         "empty_pos": EMPTY_POS},
            "head": {"file": "head.onnx", "weights": hdata, "inputs": head.input_names, "outputs": head.output_names},
            "tokenizer": {"file": "tokenizer.json"},
            "embedding": {"rule": "gather"},
            "chat": chat_spec(tokenizer),
            "stop_ids": stop_ids(tokenizer),
            "pad_id": int(pad),
            "bos_id": int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None,
            "add_bos": bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None,
            "rope_theta": float(getattr(config, "rope_theta", 10000.0)),
            "rms_norm_eps": float(config.rms_norm_eps),
            "dropped_layers": [],
            "schedule": None,
            "export": {"seed": seed, "seconds": None, "verified_max_abs_diff": None},
        }
        if verify:
            from . import _stage_manifest, ExportVerificationError

            say("verify", 0, 1)
            staged = _stage_manifest(w, manifest)
            diff = verify_generate(staged, model)
            manifest["export"]["verified_max_abs_diff"] = diff
            if diff > verify_tolerance:
                raise ExportVerificationError(
                    f"bundle logits differ from the torch model by {diff:.2e} (> {verify_tolerance:g}); export not written")
            say("verify", 1, 1)
        manifest["export"]["seconds"] = round(time.perf_counter() - t0, 2)
        return w.commit(manifest)


VERIFY_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


def reference_logits(model, prompt_ids: list[int], new_ids: list[int]) -> np.ndarray:
    """transformers' logits for the prompt's last position and after each of ``new_ids`` (one forward pass)."""
    import torch

    ids = torch.as_tensor(list(prompt_ids) + list(new_ids), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float().numpy()
    return logits[len(prompt_ids) - 1:]


def verify_generate(bundle: Bundle, model, steps: int = 6) -> float:
    """Max |logit difference| between the bundle (policy ``full``, greedy) and transformers over a few steps."""
    from edge_sel.runtime import Generator

    gen = Generator(bundle, policy="full")
    worst = 0.0
    try:
        for p in VERIFY_PROMPTS:
            res = gen.generate(p, max_new_tokens=steps, return_logits=True, stop=False)
            ref = reference_logits(model, res.prompt_ids, res.tokens[:-1])
            mine = np.stack(res.logits)
            worst = max(worst, float(np.max(np.abs(mine - ref[: len(mine)]))))
    finally:
        gen.close()
    return worst


__all__ = ["export_generate", "build_graphs", "verify_generate", "reference_logits", "chat_spec", "EMPTY_POS"]
