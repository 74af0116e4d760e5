"""edge_sel: on-device inference for selection workloads (reranking, KV-bounded generation).

``edge_sel.export_model(model, out, task="rerank")`` (needs the ``export`` extra: torch; the torch side is the
subpackage :mod:`edge_sel.export`),
``edge_sel.Bundle.open(path)``, ``edge_sel.Reranker(bundle, memory_budget="128MB").rank(query, docs)`` (``docs`` a list,
or ``edge_sel.DocumentsFile(path)``: a documents file read batch by batch).
Importing ``edge_sel`` never imports torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.documents import DocumentsFile
from edge_sel.runtime.errors import BudgetError, BundleError, EdgeSelError, InputError, ModelNotFoundError


def export_model(model, out, task: str = "rerank", **kwargs):
    """Export a model to a bundle (see :func:`edge_sel.export.export`). Imports torch lazily."""
    from edge_sel.export import export

    return export(model, out, task=task, **kwargs)


def __getattr__(name):
    if name == "Reranker":
        from .runtime import Reranker

        return Reranker
    if name == "Generator":
        from .runtime import Generator

        return Generator
    raise AttributeError(f"module 'edge_sel' has no attribute {name!r}")


__all__ = ["Bundle", "DocumentsFile", "Reranker", "Generator", "export_model", "EdgeSelError", "BundleError", "BudgetError", "InputError", "ModelNotFoundError"]
