"""The generate engine, split by concern: the public API (:mod:`.api`), the model's sessions and weight
pages (:mod:`.model`), one call's state (:mod:`.call`), prefill (:mod:`.prefill`), decode
(:mod:`.decode`), sampling (:mod:`.sampling`) and stats (:mod:`.stats`). Budget planning lives in
:mod:`edge_sel.runtime.planning.kv`, the KV policies in :mod:`edge_sel.runtime.policies`."""

from __future__ import annotations

from .api import DEFAULT_CHUNK_TOKENS, GenerationResult, Generator
from .model import TRIM_AFTER_TOKENS
from .stats import GenerationStats

__all__ = ["Generator", "GenerationResult", "GenerationStats", "DEFAULT_CHUNK_TOKENS", "TRIM_AFTER_TOKENS"]
