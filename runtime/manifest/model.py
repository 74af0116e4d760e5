"""What model a bundle holds: task, scoring, dimensions, embedding rule, pooling, prompt, chat template, token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .node import Node, json_field as _json


TASKS = ("rerank", "generate")
SCORINGS = ("yes_no", "cross_encoder", "bi_encoder", "lm")   # "lm": generate bundles (full-vocabulary head)
TASK_SCORINGS = {"rerank": ("yes_no", "cross_encoder", "bi_encoder"), "generate": ("lm",)}
EMBEDDING_RULES = ("gather", "bert")
POOLINGS = ("cls", "mean", "last")
SCORE_RULES = ("logit", "cosine", "yes_minus_no_logit")
FINAL_LAYER_OUTPUTS = ("all_tokens", "first_token")


@dataclass(frozen=True, kw_only=True)
class ModelInfo(Node):
    scoring: str
    task: str
    name: str | None = _json("str", None, nonempty=False)
    source: str | None = _json("str", None, nonempty=False)
    family: str | None = _json("str", None, nonempty=False)
    model_type: str | None = _json("str", None, nonempty=False)

    @classmethod
    def _read_first(cls, r, d, p):
        task = r.str(d.get("task"), f"{p}.task", choices=TASKS)
        scoring = r.str(d.get("scoring"), f"{p}.scoring", choices=SCORINGS)
        if scoring not in TASK_SCORINGS[task]:
            r.fail(f"{p}.scoring", f"{scoring!r} is not a scoring of task {task!r} (one of {', '.join(TASK_SCORINGS[task])})")
        return {"scoring": scoring, "task": task}


@dataclass(frozen=True, kw_only=True)
class Dims(Node):
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    num_layers: int | None = _json("int", None, lo=1)
    intermediate: int | None = _json("int", None, lo=1)
    vocab: int | None = _json("int", None, lo=1)

    def _implied(self) -> dict[str, Any]:
        return {"kv_heads": self.heads, "head_dim": self.hidden // self.heads}

    @classmethod
    def _read_first(cls, r, d, p):
        hidden = r.int(d.get("hidden"), f"{p}.hidden", lo=1)
        heads = r.int(d.get("heads"), f"{p}.heads", lo=1)
        kv_heads = r.int(d.get("kv_heads", heads), f"{p}.kv_heads", lo=1)
        head_dim = r.int(d.get("head_dim", hidden // heads), f"{p}.head_dim", lo=1)
        if heads % kv_heads:
            r.fail(f"{p}.kv_heads", f"{kv_heads} does not divide heads ({heads})")
        return {"hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


@dataclass(frozen=True, kw_only=True)
class EmbeddingRule(Node):
    """``gather``: rows of ``embed``. ``bert``: + position (offset by ``position_offset``) and token-type rows, then
    LayerNorm(``ln_weight``, ``ln_bias``, ``layer_norm_eps``)."""

    rule: str = "gather"
    layer_norm_eps: float | None = None
    position_offset: int = _json("int", 0, lo=0)

    @classmethod
    def _read_first(cls, r, d, p):
        rule = r.str(d.get("rule", "gather"), f"{p}.rule", choices=EMBEDDING_RULES)
        eps = r.float(d.get("layer_norm_eps"), f"{p}.layer_norm_eps", positive=True, optional=rule != "bert")
        return {"rule": rule, "layer_norm_eps": eps}


@dataclass(frozen=True, kw_only=True)
class PromptSpec(Node):
    """Yes/no reranking prompt: ``prefix`` (with ``{instruction}`` and ``{query}``) + document + ``suffix``."""

    prefix: str = _json("str", nonempty=False)
    suffix: str = _json("str", nonempty=False)
    instruction: str = _json("str", "", nonempty=False)


@dataclass(frozen=True, kw_only=True)
class TokenIds(Node):
    yes: int = _json("int", lo=0)
    no: int = _json("int", lo=0)


@dataclass(frozen=True, kw_only=True)
class ChatSpec(Node):
    """The chat template rendered around the user text: ``before`` + text + ``after`` (with a system prompt:
    ``system_before`` + system + ``system_between`` + text + ``after``); ``template``: the original Jinja source."""

    before: str = _json("str", nonempty=False)
    after: str = _json("str", nonempty=False)
    template: str | None = _json("str", None, nonempty=False)
    system_before: str | None = _json("str", None, nonempty=False)
    system_between: str | None = _json("str", None, nonempty=False)

    @classmethod
    def _read_first(cls, r, d, p):
        s = cls._read_declared(r, d, p, {}, names=("template", "system_before", "system_between"))
        if (s["system_before"] is None) != (s["system_between"] is None):
            r.fail(f"{p}.system_between", "system_before and system_between come together")
        return s
