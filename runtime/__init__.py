"""edge_sel.runtime — the run side: numpy + onnxruntime + tokenizers, never torch (DESIGN §1, §3)."""

from edge_sel.bundle import Bundle

from .generator import GenerationResult, Generator
from .plan import Planner
from .reranker import Reranker
from .stream import LayerStream

__all__ = ["Bundle", "Reranker", "Generator", "GenerationResult", "LayerStream", "Planner"]
