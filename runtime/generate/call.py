"""The state of one generate call: its plan, policy, per-layer caches and counters."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import trace
from ..kvcache import LayerCache
from ..policies import Policy


@dataclass
class Call:
    prompt_ids: list[int]
    max_new: int
    capacity: int   # resident tokens per layer (each cache's own ``capacity`` when a policy shares them unequally)
    policy: Policy
    caches: list[LayerCache] = field(default_factory=list)
    scratch: LayerCache | None = None  # look-once prefill: one layer's whole-prompt KV, reused layer after layer
    evictions: int = 0
    scratch_peak: int = 0  # largest decode-time gathered selection (bytes)
    suffix: int = 0  # protected prompt suffix: prefilled after the rest was compressed, never evicted by prefill
    keep_suffix_hidden: bool = False  # score(): keep the last layer's hidden states of the suffix
    suffix_hidden: np.ndarray | None = None  # ... from the last compressed token to the end
    fetch: int = 0  # fetch-area slots per layer on top of ``capacity``, inside the budget
    passes: list = field(default_factory=list)  # context-reconstruction passes (:mod:`.reconstruct`) a look-once prefill runs

    def make_room(self, layer: int, need: int, phase: str) -> None:
        """Evict from layer ``layer``'s cache so ``need`` more tokens fit; at decode, a block at once (a
        policy's eviction costs a top-k, so it runs every few tokens, not every token)."""
        c, policy = self.caches[layer], self.policy
        a = policy.align
        block = need
        if phase == "decode":
            block = max(need, min(32, max(1, c.capacity // 8)))
        block = -(-block // a) * a
        target = max(0, (c.capacity - block) // a * a)
        policy.compress(layer, c, target, phase)
        trace.instant("evict", layer=layer, phase=phase, kept=int(c.n))
        self.evictions += 1
