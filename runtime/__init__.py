"""edge_sel.runtime — the run side: numpy + onnxruntime + tokenizers, never torch.

The lowest layer of the project: the bundle format (:mod:`.bundle`), errors, sizes and memory helpers
live here with the two engines, so that ``export/``, ``devices/`` and the face (``edge_sel/``) depend
on the runtime and never the other way round. The engines are imported lazily, so opening a bundle
does not load them.
"""

from __future__ import annotations

from .bundle import Bundle


def __getattr__(name):
    if name in ("Reranker",):
        from .rerank import Reranker

        return Reranker
    if name in ("Generator", "GenerationResult"):
        from . import generate

        return getattr(generate, name)
    if name == "Planner":
        from .planning import Planner

        return Planner
    if name == "LayerStream":
        from .rerank.stream import LayerStream

        return LayerStream
    raise AttributeError(f"module 'edge_sel.runtime' has no attribute {name!r}")


__all__ = ["Bundle", "Reranker", "Generator", "GenerationResult", "LayerStream", "Planner"]
