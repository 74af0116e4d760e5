"""Llama-shaped decoders (Llama, SmolLM2, Qwen2, Qwen3, Mistral): yes/no rerankers and generators.

Rerank scoring follows Qwen3-Reranker: the prompt ends where the assistant would answer, and the score is
``logit("yes") - logit("no")`` at the last token (the log-odds behind its softmax p(yes)). Only the two lm_head rows
are kept. By default each layer is exported as the split ``qkv`` + ``attn`` graphs (prefix reuse: the runtime
computes the instruction + query prefix once per query), rewritten into the rerank form
(:mod:`edge_sel.export.prefix_layers`); ``prefix_reuse=False`` exports whole-layer graphs.

Generate bundles hold the split graphs as exported (the KV policies read ``attn_sum`` / ``attn_max``), the
full-vocabulary LM head, the chat template rendered around a marker and the stop ids.

The embedding stage is a row gather from the memory-mapped table in both tasks. Graph shapes:
:mod:`edge_sel.export.adapters.decoder_graphs`. A family with another projection layout or rotary variant
subclasses :class:`LlamaAdapter` and overrides its hooks (``qkv_parts``, ``project_qkv``, ``apply_rotary``,
``embed_table``, ``prompt_template``, ``stop_tokens``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_sel.runtime.errors import InputError

from . import decoder_graphs as dg
from .base import Adapter, BundleGraphs, LayerGraphs
from .chat import chat_spec, stop_ids

SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')
DEFAULT_INSTRUCTION = "Given a query, retrieve relevant passages that answer the query"


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "qwen2", "qwen3", "mistral")
    tasks = ("rerank", "generate")
    scorings = ("yes_no",)
    gguf = True
    stop_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")

    # ---- family hooks ----------------------------------------------------------------------------------------
    def qkv_parts(self, attn) -> dict:
        """What the qkv graph module holds for ``project_qkv``: the attention's projection modules (their names
        become the graph's weight names) and any constants."""
        return {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj}

    def project_qkv(self, m, x, q_shape, kv_shape):
        """``q [B,T,heads,D], k, v [B,T,kv,D]`` (the given shapes) from the normed hidden state ``x``; ``m`` holds
        ``qkv_parts``."""
        q = m.q_proj(x).view(q_shape)
        k = m.k_proj(x).view(kv_shape)
        return q, k, m.v_proj(x).view(kv_shape)

    def apply_rotary(self, q, k, cos, sin):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb(q, k, cos, sin)

    def embed_table(self, model) -> np.ndarray:
        """The rows the runtime gathers as the first layer's input."""
        return model.model.embed_tokens.weight.detach().float().numpy()

    def prompt_template(self, model_type: str) -> dict:
        """The yes/no rerank prompt (ChatML, as Qwen3-Reranker), around the document."""
        suffix = "<|im_end|>\n<|im_start|>assistant\n"
        if model_type == "qwen3":
            suffix += "<think>\n\n</think>\n\n"
        return {
            "prefix": "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: ",
            "suffix": suffix,
            "instruction": DEFAULT_INSTRUCTION,
        }

    def yes_no_ids(self, tokenizer) -> tuple[int, int]:
        yes = tokenizer.encode("yes", add_special_tokens=False)
        no = tokenizer.encode("no", add_special_tokens=False)
        if len(yes) != 1 or len(no) != 1:
            raise InputError(f"tokenizer splits 'yes'/'no' into several tokens ({yes}, {no}); yes/no scoring needs single tokens")
        return int(yes[0]), int(no[0])

    # ---- the adapter contract ----------------------------------------------------------------------------------
    def default_scoring(self, config: dict) -> str:
        return "yes_no"

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

    @staticmethod
    def _context(config) -> int:
        return int(getattr(config, "max_position_embeddings", 2048) or 2048)

    def rerank_graphs(self, model, tokenizer, scoring, max_length, prefix_reuse=None, resolved_path=None) -> BundleGraphs:
        yes, no = self.yes_no_ids(tokenizer)
        d = dg.dims(model.config, len(model.model.layers))
        max_len = min(max_length or 2048, self._context(model.config))
        head = dg.yes_no_head(model, yes, no)
        embed = self.embed_table(model)
        if prefix_reuse is False:
            layers = dg.layer_graphs(model)
            return BundleGraphs(d, max_len, embed, {}, [LayerGraphs(g) for g in layers], head,
                                {"inputs": layers[0].input_names, "outputs": layers[0].output_names})
        from edge_sel.export.prefix_layers import RerankForm

        pairs = dg.split_layer_graphs(model, self)
        return BundleGraphs(d, max_len, embed, {}, [LayerGraphs(attn, qkv) for qkv, attn in pairs], head,
                            {**dg.split_layer_io(pairs), "prefix_reuse": True}, rewrite=RerankForm(d))

    def generate_graphs(self, model, tokenizer, max_length) -> BundleGraphs:
        from edge_sel.export.generate_layers import GenerateForm

        pairs = dg.split_layer_graphs(model, self)
        limit = self._context(model.config)
        d = dg.dims(model.config, len(pairs))
        return BundleGraphs(d, min(int(max_length or limit), limit), self.embed_table(model),
                            {}, [LayerGraphs(attn, qkv) for qkv, attn in pairs], dg.lm_head(model),
                            dg.split_layer_io(pairs), head_external=True, rewrite=GenerateForm(d))

    def manifest_extras(self, model, tokenizer, task, scoring) -> dict[str, Any]:
        config = model.config
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        rope = {"rope_theta": float(getattr(config, "rope_theta", 10000.0)), "rms_norm_eps": float(config.rms_norm_eps)}
        if task == "generate":
            return {"embedding": {"rule": "gather"}, "chat": chat_spec(tokenizer),
                    "stop_ids": stop_ids(tokenizer, self.stop_tokens), "pad_id": int(pad),
                    "bos_id": int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None,
                    "add_bos": bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None,
                    **rope}
        yes, no = self.yes_no_ids(tokenizer)
        return {"embedding": {"rule": "gather"}, "pooling": "last", "score_rule": "yes_minus_no_logit",
                "prompt": self.prompt_template(config.model_type), "token_ids": {"yes": yes, "no": no},
                "pad_id": int(pad),
                "eos_ids": [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else [], **rope}

    def reference_scores(self, model, tokenizer, scoring, doc_ids, doc_types, query_ids=None):
        import torch

        yes, no = self.yes_no_ids(tokenizer)
        scores = []
        with torch.no_grad():
            for ids in doc_ids:  # one at a time: no padding involved in the reference
                logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0, -1]
                scores.append(float(logits[yes] - logits[no]))
        return np.asarray(scores, dtype=np.float32)

    def reference_logits(self, model, prompt_ids, new_ids):
        """One forward pass over prompt + new tokens: the logits at the prompt's last position and after each new one."""
        import torch

        ids = torch.as_tensor(list(prompt_ids) + list(new_ids), dtype=torch.long)[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float().numpy()
        return logits[len(prompt_ids) - 1:]
