from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Policy, sinks_and_recent


@dataclass
class StreamingLLM(Policy):
    """Attention sinks + a recent window.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
    (arXiv:2309.17453): keep the first ``sinks`` tokens (which soak up attention mass) and the most
    recent ones; no scores, so its only MPC cost is moving the kept entries.
    """

    name: ClassVar[str] = "streaming_llm"
    sinks: int = 4

    @property
    def min_tokens(self):  # type: ignore[override]
        return self.sinks + 4

    def keep(self, layer, cache, target, phase):
        self.count(gathers=cache.kv_heads * target)
        return sinks_and_recent(cache.n, target, self.sinks)
