from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import ObservationWindowPolicy


@dataclass
class SnapKV(ObservationWindowPolicy):
    """Observation-window voting at prefill.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
    (arXiv:2404.14469): the last ``window`` prompt queries vote (attention summed over the window,
    max-pooled with ``kernel``) per KV head; keep the top-voted prefix tokens plus the window itself.
    Chunks before the window (prompts longer than the budget) accumulate votes the same way.
    """

    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel: int = 7

    @property
    def vote_pool(self):  # type: ignore[override]
        return self.kernel

    def recent_kept(self, target):
        return min(self.window, target // 2)
