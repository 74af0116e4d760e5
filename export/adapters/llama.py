"""Llama-style decoders (Llama, SmolLM2, Qwen2, Qwen3, Mistral) used as yes/no LLM rerankers.

Scoring follows Qwen3-Reranker: the prompt ends where the assistant would answer, and the score is
``logit("yes") - logit("no")`` at the last token (the log-odds behind its softmax p(yes)). Only the
two lm_head rows are kept (2 x hidden instead of vocab x hidden).

Embedding stage (runtime): rows gathered from the memory-mapped table. Layer graph:
``hidden [B,T,H], mask [B,T], position_ids [B,T] -> hidden_out``; rotary embeddings are computed
inside the graph from ``position_ids``; the causal + padding mask is built in-graph from positions.
"""

from __future__ import annotations

import numpy as np

from .base import Adapter, GraphSpec, SplitModel

SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')
DEFAULT_INSTRUCTION = "Given a query, retrieve relevant passages that answer the query"


def prompt_template(model_type: str) -> dict:
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    if model_type == "qwen3":
        suffix += "<think>\n\n</think>\n\n"
    return {
        "prefix": "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: ",
        "suffix": suffix,
        "instruction": DEFAULT_INSTRUCTION,
    }


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "qwen2", "qwen3", "mistral")
    scorings = ("yes_no",)

    def load(self, resolved, scoring, seed):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        if resolved.kind == "gguf":
            folder, name = resolved.path.parent, resolved.path.name
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
        else:
            tok = AutoTokenizer.from_pretrained(resolved.path)
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32, attn_implementation="eager")
        return model.float().eval(), tok

    def split(self, model, tokenizer, scoring, max_length, resolved_path=None):
        import torch

        config = model.config
        inner = model.model
        rotary = inner.rotary_emb
        H = config.hidden_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or H // heads
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
        layers = [GraphSpec(LayerGraph(layer).eval(), sample, ["hidden", "mask", "position_ids"], ["hidden_out"], axes)
                  for layer in inner.layers]

        yes = tokenizer.encode("yes", add_special_tokens=False)
        no = tokenizer.encode("no", add_special_tokens=False)
        if len(yes) != 1 or len(no) != 1:
            from edge_sel.runtime.errors import InputError

            raise InputError(f"tokenizer splits 'yes'/'no' into several tokens ({yes}, {no}); yes/no scoring needs single tokens")
        w = model.lm_head.weight.detach()
        rows = torch.stack([w[yes[0]], w[no[0]]])
        bias = None
        if getattr(model.lm_head, "bias", None) is not None:
            bias = model.lm_head.bias.detach()[[yes[0], no[0]]]
        norm = inner.norm

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

        head = GraphSpec(Head().eval(), (torch.randn(2, H),), ["pooled"], ["score"], {"pooled": {0: "batch"}, "score": {0: "batch"}})
        dims = {
            "num_layers": len(inner.layers), "hidden": H, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", heads) or heads, "head_dim": head_dim,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size,
        }
        limit = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        extras = {
            "embedding": {"rule": "gather"},
            "pooling": "last",
            "score_rule": "yes_minus_no_logit",
            "prompt": prompt_template(config.model_type),
            "token_ids": {"yes": int(yes[0]), "no": int(no[0])},
            "pad_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)),
            "eos_ids": [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else [],
            "rope_theta": float(getattr(config, "rope_theta", 10000.0)),
            "rms_norm_eps": float(config.rms_norm_eps),
        }
        return SplitModel("llama", scoring, dims, min(max_length or 2048, limit),
                          inner.embed_tokens.weight.detach().numpy(), {}, layers, head, extras)

    def reference_scores(self, model, batch_ids, batch_types, split, query_ids=None):
        import torch

        yes, no = split.extras["token_ids"]["yes"], split.extras["token_ids"]["no"]
        scores = []
        with torch.no_grad():
            for ids in batch_ids:  # one at a time: no padding involved in the reference
                out = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None])
                logits = out.logits[0, -1]
                scores.append(float(logits[yes] - logits[no]))
        return np.asarray(scores, dtype=np.float32)
