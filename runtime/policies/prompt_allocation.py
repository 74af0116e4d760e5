"""``mpcache_ea_survey``: ``mpcache_ea_alloc`` with the layers' shares measured on the prompt itself, by a survey pass.

KVzip (Kim et al., 2025) and Ada-KV (Feng et al., 2024) split the budget by one top-k over every layer's scores of
the prompt at hand; ``mpcache_ea_alloc`` can only use a split calibrated once per model, because a look-once prefill
compresses each layer before the next has run. Here the engine first runs the context through every layer once,
recording (:mod:`edge_sel.runtime.generate.survey`; nothing is cached, one more prefill of the context, so the
prefill takes ~2x as long), with :class:`LongRangeAttention`: each key's largest attention from a prompt query at
least ``distance`` positions after it, the statistic whose calibrated split already won. One top-k over all layers
at the kept fraction (:func:`global_shares`) gives this prompt's shares, tempered like the calibrated ones
(``temper``); the planner turns them into per-layer capacities with the same total (the bytes of equal layers), so
the budget stays a hard bound. Inside each layer everything is ``mpcache_ea``'s (expected-attention static
eviction, MPCache's dynamic group selection, MPC costs counted). The recorded scores (``[layers, kv, n]`` float32)
are counted against the budget (``fixed_bytes``); without a survey (a rolling prefill) the calibrated shares apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .layer_allocation import LongRangeAttention, MPCacheEAAlloc, global_shares, temper_at
from .mpcache import with_dynamic_selection


@dataclass
class MPCacheEASurvey(MPCacheEAAlloc):
    """:class:`MPCacheEAAlloc` with this prompt's own layer split (module docstring)."""

    name: ClassVar[str] = "mpcache_ea_survey_static"
    distance: int = 32  # a query this many positions after a key or more scores it in the survey
    measured: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.distance, bool) or not isinstance(self.distance, int) or self.distance < 1:
            raise ValueError(f"distance must be a positive integer, got {self.distance!r}")

    def surveyor(self):
        return LongRangeAttention(distance=self.distance)

    def surveyed(self, recorder):
        self.measured = recorder.stacked(recorder.ctx.prompt_len)

    def end(self):
        super().end()
        self.measured = None  # one call's survey: a reused instance must not plan the next prompt with it

    def fixed_bytes(self, n_layers, kv_heads, head_dim, n_tokens):
        # the survey's scores of every layer, alive from the survey until the cache is planned
        return super().fixed_bytes(n_layers, kv_heads, head_dim, n_tokens) + n_layers * kv_heads * n_tokens * 4

    def layer_shares(self, n_layers, kept=1.0, model=()):
        if self.measured is None or self.shares is not None or len(self.measured) != n_layers or kept >= 1:
            return super().layer_shares(n_layers, kept, model)
        s = global_shares(self.measured, kept) ** (self.temper if self.temper is not None else temper_at(kept))
        return s / s.mean() if s.sum() > 0 else None


def mpcache_ea_survey(**kw):
    """``mpcache_ea`` with per-layer budgets measured on the prompt (:class:`MPCacheEASurvey`) and MPCache's dynamic selection."""
    return with_dynamic_selection(MPCacheEASurvey, kw, "mpcache_ea_survey")
