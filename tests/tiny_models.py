"""Small random-weight models of the real architectures, with real (tiny, trained-here) tokenizers.

Saved as ordinary Hugging Face directories so the exporter takes exactly the path a user's model takes.
"""

from __future__ import annotations

from pathlib import Path

from edge_sel.export.textdata import docstring_pairs

SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIALS_CHAT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    return [q + " " + p for q, p in docstring_pairs(limit=300)] + ["yes no " * 20]


def bert_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS_BERT))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


def chat_tokenizer(vocab_size: int = 800):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS_CHAT,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens(["yes", "no"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", model_max_length=512)


def make_bert(path: Path, kind: str = "bert", cross_encoder: bool = False, seed: int = 0, layers: int = 3) -> Path:
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, BertModel, XLMRobertaConfig,
                              XLMRobertaForSequenceClassification, XLMRobertaModel)

    torch.manual_seed(seed)
    tok = bert_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=160, num_labels=1)
    if kind == "bert":
        cfg = BertConfig(**common, type_vocab_size=2, pad_token_id=tok.pad_token_id)
        model = BertForSequenceClassification(cfg) if cross_encoder else BertModel(cfg)
    else:  # xlm-roberta: positions offset by pad_token_id + 1, classifier head on <s>
        cfg = XLMRobertaConfig(**common, type_vocab_size=1, pad_token_id=tok.pad_token_id)
        model = XLMRobertaForSequenceClassification(cfg) if cross_encoder else XLMRobertaModel(cfg)
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_decoder(path: Path, kind: str = "llama", seed: int = 0, layers: int = 3) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = chat_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    extra = {"head_dim": 8} if kind == "qwen3" else {}
    model = cls[1](cls[0](**common, **extra)).eval()
    return save_widened(model, tok, path)


PHI3_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_phi3(path: Path, seed: int = 0, layers: int = 3, context: int = 512, partial_rotary_factor: float = 1.0) -> Path:
    """A random-weight Phi-3 (``Phi3ForCausalLM``: fused ``qkv_proj`` and ``gate_up_proj``, grouped-query attention)
    built from its transformers config, with Phi-3's chat markers as special tokens and its chat template."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    tok = chat_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tok.eos_token = "<|endoftext|>"
    tok.chat_template = PHI3_CHAT_TEMPLATE
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=context,
                     original_max_position_embeddings=context, partial_rotary_factor=partial_rotary_factor,
                     sliding_window=None, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Phi3ForCausalLM(cfg).eval()
    return save_widened(model, tok, path)


def save_widened(model, tok, path: Path) -> Path:
    """Save a random-weight model and its tokenizer, its matrices widened 3x first: the tiny default init gives
    nearly uniform attention and scores, widened ones differ visibly between documents and tokens."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def export_coreml(tmp_path_factory, name: str, make, precision: str = "fp16", task: str = "rerank", **kw):
    """A tiny model made by ``make`` and exported with Core ML packages (``--format coreml``), opened as a Bundle."""
    from edge_sel.export import export
    from edge_sel.runtime.bundle import Bundle

    root = tmp_path_factory.mktemp(f"coreml_{name}_{precision}")
    return Bundle.open(export(make(root / "hf", **kw), root / "bundle", task=task, format="coreml", coreml_precision=precision))


def tiny_coreml_bundles(tmp_path_factory, layers: int, generate_layers: int = 2, context: int = 512) -> dict:
    """The four tiny kinds (bi-encoder, cross-encoder, yes/no Llama, generating Llama) with Core ML packages."""
    from gen_tiny import make_gen_decoder

    return {
        "bert_bi": export_coreml(tmp_path_factory, "bert_bi", make_bert, layers=layers),
        "bert_ce": export_coreml(tmp_path_factory, "bert_ce", make_bert, cross_encoder=True, layers=layers),
        "llama_rerank": export_coreml(tmp_path_factory, "llama", make_decoder, layers=layers),
        "llama_generate": export_coreml(tmp_path_factory, "llama_gen", make_gen_decoder, task="generate",
                                        layers=generate_layers, context=context),
    }

