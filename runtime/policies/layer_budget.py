"""``mpcache_ea`` with unequal layer budgets (``mpcache_ea_layers``).

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (2024): lower layers
spread their attention over the whole context, higher layers concentrate it on a few tokens, so at the same total a
cache that keeps more tokens in the lower layers and fewer in the higher ones loses less. Here each layer's share of
what the context keeps falls linearly with depth, ``1 + slope * (1 - 2 L / (n - 1))`` (``slope=0``: equal layers);
the planner turns the shares into per-layer capacities with the same total as equal layers, so the KV bytes are the
same and the budget stays a hard bound (:func:`edge_sel.runtime.planning.kv.split_layers`). Inside each layer
everything is ``mpcache_ea``'s: the expected-attention static eviction (:class:`.expected_attention.MPCacheEA`) and
MPCache's dynamic group selection. On two tuning windows of the perplexity benchmark no slope (-0.3, 0.3, 0.6) moved
the ratio beyond the windows' noise (1.038-1.042 vs 1.039 at 20 % kept), so equal layers stay the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .expected_attention import MPCacheEA
from .mpcache import with_dynamic_selection


@dataclass
class MPCacheEALayers(MPCacheEA):
    """:class:`MPCacheEA` whose layers keep unequal shares of the context (see the module docstring)."""

    name: ClassVar[str] = "mpcache_ea_layers_static"
    slope: float = 0.5   # the first layer keeps 1 + slope times the mean, the last 1 - slope times it

    def __post_init__(self):
        super().__post_init__()
        if not -1.0 <= self.slope <= 1.0:
            raise ValueError(f"slope must be in [-1, 1], got {self.slope}")

    def layer_shares(self, n_layers, kept=1.0, model=()):
        if n_layers < 2 or self.slope == 0:
            return None
        return 1.0 + self.slope * (1.0 - 2.0 * np.arange(n_layers) / (n_layers - 1))


def mpcache_ea_layers(**kw):
    """``mpcache_ea`` with per-layer budgets (:class:`MPCacheEALayers`) and MPCache's dynamic selection."""
    return with_dynamic_selection(MPCacheEALayers, kw, "mpcache_ea_layers")
