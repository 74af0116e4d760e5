"""Model-family adapters. Adding a family: one module + one entry in ``ADAPTERS``."""

from __future__ import annotations

import json

from edge_sel.runtime.errors import InputError

from .base import Adapter, BundleGraphs, GraphSpec, LayerGraphs
from .bert import BertAdapter
from .llama import LlamaAdapter
from .phi3 import Phi3Adapter

ADAPTERS: list[Adapter] = [BertAdapter(), LlamaAdapter(), Phi3Adapter()]


def adapter_for(model_type: str) -> Adapter:
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    known = sorted(t for a in ADAPTERS for t in a.model_types)
    raise InputError(f"model type {model_type!r} is not supported; supported: {', '.join(known)}")


def model_config(resolved) -> dict:
    """The model's ``config.json`` as a dict (empty for a GGUF file, whose metadata transformers reads at load)."""
    if resolved.kind == "gguf":
        return {}
    return json.loads((resolved.path / "config.json").read_text())


def model_type(resolved) -> str:
    if resolved.kind == "gguf":  # GGUF decoders load through transformers' path of the GGUF-capable adapter
        return next(a for a in ADAPTERS if a.gguf).model_types[0]
    return model_config(resolved)["model_type"]


def adapter_for_model(resolved) -> Adapter:
    """The adapter of a resolved model (:func:`edge_sel.export.sources.resolve`)."""
    return adapter_for(model_type(resolved))


def model_types_for(task: str) -> list[str]:
    return [t for a in ADAPTERS if task in a.tasks for t in a.model_types]


__all__ = ["Adapter", "BundleGraphs", "GraphSpec", "LayerGraphs", "ADAPTERS", "adapter_for", "adapter_for_model",
           "model_config", "model_type", "model_types_for"]
