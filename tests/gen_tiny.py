"""Tiny random-weight decoders with a long context, exported as generate bundles (cached per session)."""

from __future__ import annotations

from pathlib import Path

from tiny_models import chat_tokenizer, save_widened

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_gen_decoder(path: Path, kind: str = "llama", layers: int = 4, seed: int = 0, context: int = 8192) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = chat_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    common = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=context,
                  tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    extra = {"head_dim": 8} if kind == "qwen3" else {}
    model = cls[1](cls[0](**common, **extra)).eval()
    return save_widened(model, tok, path)


def long_text(n_chars: int) -> str:
    from edge_sel.export.textdata import docstring_pairs

    text = " ".join(q + " " + p for q, p in docstring_pairs())
    while len(text) < n_chars:
        text += " " + text
    return text[:n_chars]
