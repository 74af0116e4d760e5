from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import ScorePolicy


@dataclass
class H2O(ScorePolicy):
    """Heavy hitters: keep the tokens with the largest accumulated attention, plus a recent window.

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models", NeurIPS 2023 (arXiv:2306.14048). Scores are per KV head (attention of the head's query
    group summed over queries and steps), eviction per head; ``recent_ratio`` of the budget is the recent window.
    """

    name: ClassVar[str] = "h2o"
    needs_decode_attention: ClassVar[bool] = True
    votes: ClassVar[str] = "sum"
    recent_ratio: float = 0.5

    def recent_kept(self, target):
        return int(target * self.recent_ratio)
