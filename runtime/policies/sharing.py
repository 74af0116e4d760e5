"""Cross-layer index sharing (MPCache, WindowKV): layers ``L .. L+share-1`` reuse the leader's decisions.

The generator runs every layer on the same token sequence, so the n-th eviction of a follower layer
happens at the same point, with the same target, as the leader's n-th: replaying the leader's kept
slot indices keeps the group's caches aligned slot for slot, and a decode-time selection computed on
the leader is then valid in the followers as is. Followers pay no scoring cost at all.
"""

from __future__ import annotations

import numpy as np


class LayerSharing:
    def __init__(self, share: int, n_layers: int):
        self.share = max(1, int(share))
        self.n_layers = n_layers
        self.events: dict[int, int] = {}
        self.decisions: dict[tuple[int, int], list] = {}  # (leader, event) -> [idx, followers still to replay]

    def leader(self, layer: int) -> int:
        return layer - layer % self.share

    def is_leader(self, layer: int) -> bool:
        return layer % self.share == 0

    def next_event(self, layer: int) -> int:
        e = self.events.get(layer, 0)
        self.events[layer] = e + 1
        return e

    def record(self, layer: int, event: int, idx: np.ndarray) -> None:
        followers = min(self.share, self.n_layers - layer) - 1
        if followers > 0:  # prefill runs layer by layer: keep until every follower replayed it
            self.decisions[(layer, event)] = [idx, followers]

    def decide(self, layer: int, n: int, target: int, compute, fallback: bool = True) -> tuple[np.ndarray | None, bool]:
        """The layer's next decision: the leader's replayed (``(idx, True)``) or, for a leader — and for a
        follower whose replay does not fit when ``fallback`` — ``compute()``'s, recorded for the followers."""
        event = self.next_event(layer)
        leader = self.is_leader(layer)
        if not leader:
            idx = self.replay(layer, event, n, target)
            if idx is not None or not fallback:
                return idx, idx is not None
        idx = compute()
        if leader and idx is not None:
            self.record(layer, event, idx)
        return idx, False

    def replay(self, layer: int, event: int, n: int, target: int) -> np.ndarray | None:
        key = (self.leader(layer), event)
        entry = self.decisions.get(key)
        if entry is None:
            return None
        entry[1] -= 1
        if entry[1] <= 0:
            del self.decisions[key]
        idx = entry[0]
        if idx.shape[-1] > target or (idx.size and int(idx.max()) >= n):
            return None
        return idx
