"""Phi-3 decoders (``Phi3ForCausalLM``): the Llama graphs with Phi-3's fused projections and chat markers.

Attention projects q, k and v with one ``qkv_proj`` matrix (rows: heads*D query, then kv*D key, then kv*D value);
the MLP's fused ``gate_up_proj`` is the model's own module inside the graphs. Phi-3 models with
``partial_rotary_factor < 1`` rotate only the first part of each head (Phi-3's own rotary function); with the full
head they use Llama's, whose pattern the rerank form's RotaryEmbedding rewrite recognises.
"""

from __future__ import annotations

from .llama import DEFAULT_INSTRUCTION, SYSTEM, LlamaAdapter


class Phi3Adapter(LlamaAdapter):
    family = "phi3"
    model_types = ("phi3",)
    gguf = False
    stop_tokens = ("<|end|>", "<|endoftext|>")

    def qkv_parts(self, attn) -> dict:
        return {"qkv_proj": attn.qkv_proj, "q_width": attn.config.num_attention_heads * attn.head_dim,
                "kv_width": attn.num_key_value_heads * attn.head_dim}

    def project_qkv(self, m, x, q_shape, kv_shape):
        qkv = m.qkv_proj(x)
        q, kv = m.q_width, m.kv_width
        return qkv[..., :q].view(q_shape), qkv[..., q:q + kv].view(kv_shape), qkv[..., q + kv:].view(kv_shape)

    def apply_rotary(self, q, k, cos, sin):
        if cos.shape[-1] < q.shape[-1]:
            from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

            return apply_rotary_pos_emb(q, k, cos, sin)
        return super().apply_rotary(q, k, cos, sin)

    def prompt_template(self, model_type: str) -> dict:
        return {"prefix": "<|system|>\n" + SYSTEM + "<|end|>\n<|user|>\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: ",
                "suffix": "<|end|>\n<|assistant|>\n", "instruction": DEFAULT_INSTRUCTION}

