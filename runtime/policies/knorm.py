from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import ScorePolicy


@dataclass
class Knorm(ScorePolicy):
    """Keep the tokens whose keys have the smallest L2 norm.

    Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024
    (arXiv:2406.11430): a low key norm goes with a high attention score, so the lowest-norm keys are
    the most attended. Needs no attention statistics at all (one norm per cached key and KV head),
    so it works with any prefill; eviction is per KV head, no slot is protected.
    """

    name: ClassVar[str] = "knorm"

    def score(self, layer, keys, votes):
        self.count(multiplications=keys.size)
        return -np.linalg.norm(keys, axis=-1)
