"""BERT-style encoders (BERT, MiniLM, RoBERTa, XLM-RoBERTa) as cross-encoders or bi-encoders.

Embedding stage (runtime, numpy): word rows gathered from the memory-mapped table + position +
token-type rows, then LayerNorm. Layer graph: ``hidden [B,T,H], mask [B,T] -> hidden_out``
(a cross-encoder's last layer: ``[B,1,H]``, the first token only — the head reads nothing else).
Head: cross-encoder = pooler/classifier on the first token; bi-encoder = L2-normalised mean pooling
(sentence-transformers' all-MiniLM-L6-v2 recipe).
"""

from __future__ import annotations

import json
import logging
import math


from .base import Adapter, BundleGraphs, GraphSpec, LayerGraphs

log = logging.getLogger("edge_sel")

def _torch():
    import torch

    return torch


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta")
    scorings = ("cross_encoder", "bi_encoder")

    def default_scoring(self, config: dict) -> str:
        archs = config.get("architectures") or []
        return "cross_encoder" if any("SequenceClassification" in a for a in archs) else "bi_encoder"

    def load(self, resolved, scoring, seed):
        torch = _torch()
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        path = resolved.path
        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed)
        if scoring == "cross_encoder":
            kwargs = {}
            if not any("SequenceClassification" in a for a in (config.architectures or [])):
                kwargs["num_labels"] = 1  # seeded classifier head on a plain encoder (tests, demos)
                log.warning("%s has no classifier: the cross-encoder head is initialised at random (seed %d), so its "
                            "scores rank nothing until it is trained", resolved.name, seed)
            model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager", **kwargs)
        else:
            model = AutoModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False)
        return model.float().eval(), tok

    def _max_length(self, resolved_path, model, tok, max_length):
        limit = model.config.max_position_embeddings
        if self._roberta_like(model.config):  # positions start after padding_idx
            limit -= model.config.pad_token_id + 1
        st = resolved_path / "sentence_bert_config.json" if resolved_path else None
        if max_length:
            return min(max_length, limit)
        if st is not None and st.is_file():
            return min(json.loads(st.read_text())["max_seq_length"], limit)
        if tok.model_max_length and tok.model_max_length < 100_000:
            return min(tok.model_max_length, limit)
        return limit

    @staticmethod
    def _encoder(model, scoring):
        return model if scoring == "bi_encoder" else getattr(model, model.base_model_prefix)

    @staticmethod
    def _roberta_like(config) -> bool:
        return config.model_type in ("roberta", "xlm-roberta")

    @staticmethod
    def _first_token_final(config, scoring) -> bool:
        """A CLS-pooled cross-encoder with absolute positions: the last layer computes the first token only."""
        return scoring == "cross_encoder" and getattr(config, "position_embedding_type", "absolute") == "absolute"

    def rerank_graphs(self, model, tokenizer, scoring, max_length, prefix_reuse=None, resolved_path=None) -> BundleGraphs:
        torch = _torch()
        config = model.config
        encoder_model = self._encoder(model, scoring)
        emb = encoder_model.embeddings
        layers = encoder_model.encoder.layer
        H = config.hidden_size
        roberta_like = self._roberta_like(config)

        class LayerGraph(torch.nn.Module):
            def __init__(self, layer):
                super().__init__()
                self.layer = layer

            def forward(self, hidden, mask):
                bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
                return self.layer(hidden, attention_mask=bias)[0]

        class FirstTokenLayerGraph(torch.nn.Module):
            """The final layer of a CLS-pooled cross-encoder: keys and values of every token, but the query,
            attention output and feed-forward of the first token only — the head reads nothing else. Saves about
            10/12 of that layer's matrix work (K/V projections remain); output ``[batch, 1, hidden]``."""

            def __init__(self, layer):
                super().__init__()
                self.layer = layer

            def forward(self, hidden, mask):
                att = self.layer.attention
                sa = att.self
                heads, d = sa.num_attention_heads, sa.attention_head_size
                first = hidden[:, :1]
                q = sa.query(first).reshape(hidden.shape[0], 1, heads, d).transpose(1, 2)
                k = sa.key(hidden).reshape(hidden.shape[0], -1, heads, d).transpose(1, 2)
                v = sa.value(hidden).reshape(hidden.shape[0], -1, heads, d).transpose(1, 2)
                bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
                p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
                ctx = (p @ v).transpose(1, 2).reshape(hidden.shape[0], 1, heads * d)
                a = att.output(ctx, first)
                return self.layer.output(self.layer.intermediate(a), a)

        sample_h = torch.randn(2, 7, H)
        sample_m = torch.ones(2, 7)
        sample_m[1, 5:] = 0
        axes = {"hidden": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}, "hidden_out": {0: "batch", 1: "seq"}}
        first_token_final = self._first_token_final(config, scoring)
        layer_specs = [
            GraphSpec(LayerGraph(layer).eval(), (sample_h, sample_m), ["hidden", "mask"], ["hidden_out"], axes)
            for layer in layers
        ]
        if first_token_final:
            layer_specs[-1] = GraphSpec(FirstTokenLayerGraph(layers[-1]).eval(), (sample_h, sample_m), ["hidden", "mask"],
                                        ["hidden_out"], {**axes, "hidden_out": {0: "batch"}})

        if scoring == "bi_encoder":
            class Head(torch.nn.Module):
                def forward(self, pooled):
                    return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)

            head = GraphSpec(Head().eval(), (torch.randn(2, H),), ["pooled"], ["embedding"],
                             {"pooled": {0: "batch"}, "embedding": {0: "batch"}})
        else:
            if roberta_like:
                classifier = model.classifier

                class Head(torch.nn.Module):
                    def __init__(self):
                        super().__init__()
                        self.classifier = classifier

                    def forward(self, pooled):
                        return self.classifier(pooled[:, None, :])[:, -1]
            else:
                pooler, classifier = encoder_model.pooler, model.classifier

                class Head(torch.nn.Module):
                    def __init__(self):
                        super().__init__()
                        self.pooler, self.classifier = pooler, classifier

                    def forward(self, pooled):
                        return self.classifier(self.pooler(pooled[:, None, :]))[:, -1]

            head = GraphSpec(Head().eval(), (torch.randn(2, H),), ["pooled"], ["score"],
                             {"pooled": {0: "batch"}, "score": {0: "batch"}})

        arrays = {
            "position": emb.position_embeddings.weight.detach().numpy(),
            "ln_weight": emb.LayerNorm.weight.detach().numpy(),
            "ln_bias": emb.LayerNorm.bias.detach().numpy(),
        }
        if getattr(emb, "token_type_embeddings", None) is not None:
            arrays["token_type"] = emb.token_type_embeddings.weight.detach().numpy()
        dims = {
            "num_layers": len(layers), "hidden": H, "heads": config.num_attention_heads,
            "kv_heads": config.num_attention_heads, "head_dim": H // config.num_attention_heads,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size,
        }
        return BundleGraphs(dims, self._max_length(resolved_path, model, tokenizer, max_length),
                            emb.word_embeddings.weight.detach().numpy(), arrays, [LayerGraphs(g) for g in layer_specs], head,
                            {"inputs": layer_specs[0].input_names, "outputs": layer_specs[0].output_names})

    def manifest_extras(self, model, tokenizer, task, scoring):
        config = model.config
        return {
            "embedding": {
                "rule": "bert",
                "layer_norm_eps": float(config.layer_norm_eps),
                "position_offset": int(config.pad_token_id + 1) if self._roberta_like(config) else 0,
            },
            "pooling": "mean" if scoring == "bi_encoder" else "cls",
            "score_rule": "cosine" if scoring == "bi_encoder" else "logit",
            # the last layer graph returns the first token only (FirstTokenLayerGraph): [batch, 1, hidden]
            "final_layer_output": "first_token" if self._first_token_final(config, scoring) else "all_tokens",
            "pad_id": int(tokenizer.pad_token_id or 0),
        }

    def reference_scores(self, model, tokenizer, scoring, doc_ids, doc_types, query_ids=None):
        torch = _torch()
        pad_id = int(tokenizer.pad_token_id or 0)
        token_types = getattr(self._encoder(model, scoring).embeddings, "token_type_embeddings", None) is not None

        def run(ids_list, types_list):
            T = max(len(x) for x in ids_list)
            ids = torch.full((len(ids_list), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(ids_list), T), dtype=torch.long)
            tt = torch.zeros((len(ids_list), T), dtype=torch.long)
            for i, x in enumerate(ids_list):
                ids[i, : len(x)] = torch.as_tensor(x)
                mask[i, : len(x)] = 1
                if types_list is not None and model.config.type_vocab_size > 1:
                    tt[i, : len(x)] = torch.as_tensor(types_list[i])
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, token_type_ids=tt if token_types else None), mask

        if scoring == "bi_encoder":
            def embed(ids_list):
                out, mask = run(ids_list, None)
                h = out.last_hidden_state
                m = mask[..., None].float()
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, dim=-1)

            q = embed([query_ids])
            d = embed(doc_ids)
            return (d @ q[0]).numpy()
        out, _ = run(doc_ids, doc_types)
        return out.logits[:, -1].numpy()
