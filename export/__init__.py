"""edge_sel.export — the torch side: turn a Hugging Face / GGUF model into a bundle.

``export(model, out, task="rerank")`` (:mod:`edge_sel.export.pipeline`) resolves the model, asks its family's
adapter (:mod:`edge_sel.export.adapters`) for the task's graphs, writes them into a staged bundle, checks it against
the torch model when ``verify=True`` and commits it. Bundle passes (calibrate, drop layers, quantize, graph upgrades)
rewrite existing bundles: :mod:`edge_sel.export.passes`. Importing this package does not import torch.
"""

from __future__ import annotations

from .pipeline import export
from .verify import VERIFY_TOLERANCE, ExportVerificationError

__all__ = ["export", "ExportVerificationError", "VERIFY_TOLERANCE"]
