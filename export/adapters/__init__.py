"""Model-family adapters. Adding a family: one module + one entry in ``ADAPTERS``."""

from edge_sel.runtime.errors import InputError

from .base import Adapter, GraphSpec, SplitModel
from .bert import BertAdapter
from .llama import LlamaAdapter

ADAPTERS: list[Adapter] = [BertAdapter(), LlamaAdapter()]


def adapter_for(model_type: str) -> Adapter:
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    known = sorted(t for a in ADAPTERS for t in a.model_types)
    raise InputError(f"model type {model_type!r} is not supported; supported: {', '.join(known)}")


__all__ = ["Adapter", "GraphSpec", "SplitModel", "ADAPTERS", "adapter_for"]
