"""``a+b``: several policies acting as one (a static prefill eviction + a dynamic decode selection, ...)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Policy


@dataclass
class Composite(Policy):
    """``static + dynamic (+ ...)``: the first part with an opinion decides each choice; every part
    sees every event."""

    parts: tuple = ()
    title: str = ""
    name: ClassVar[str] = "composite"

    @property
    def label(self) -> str:
        return self.title or "+".join(p.label if isinstance(p, Composite) else p.name for p in self.parts)

    def begin(self, ctx):
        super().begin(ctx)
        for p in self.parts:
            p.begin(ctx)

    @property
    def needs_decode_attention(self):  # type: ignore[override]
        return any(p.needs_decode_attention for p in self.parts)

    @property
    def min_tokens(self):  # type: ignore[override]
        return max(p.min_tokens for p in self.parts)

    @property
    def window_reset(self):  # type: ignore[override]
        return any(p.window_reset for p in self.parts)

    @property
    def evicts(self):  # type: ignore[override]
        return all(p.evicts for p in self.parts)

    @property
    def align(self):  # type: ignore[override]
        a = 1
        for p in self.parts:
            a = int(np.lcm(a, p.align))
        return a

    def observation_window(self, prompt_len):
        return max(p.observation_window(prompt_len) for p in self.parts)

    def bytes_per_token(self, kv_heads, head_dim):
        return sum(p.bytes_per_token(kv_heads, head_dim) for p in self.parts)

    def fixed_bytes(self, *a):
        return sum(p.fixed_bytes(*a) for p in self.parts)

    def fetch_tokens(self, *a):
        return max(p.fetch_tokens(*a) for p in self.parts)

    def suffix_step(self, chunk, cache):
        return min(p.suffix_step(chunk, cache) for p in self.parts)

    def held_bytes(self):
        return sum(p.held_bytes() for p in self.parts)

    def report(self, decode_steps):
        out: dict = {}
        for p in self.parts:
            out.update(p.report(decode_steps))
        return out

    def skip_layer(self, layer):
        return any(p.skip_layer(layer) for p in self.parts)

    @property
    def total_cost(self) -> Counter:
        c = Counter(self.cost)
        for p in self.parts:
            c.update(getattr(p, "total_cost", p.cost))
        return c

    def _first(self, hook, *a):
        for p in self.parts:
            r = getattr(p, hook)(*a)
            if r is not None:
                return r
        return None

    def _each(self, hook, *a):
        for p in self.parts:
            getattr(p, hook)(*a)

    def keep(self, *a):
        return self._first("keep", *a)

    def select(self, *a):
        return self._first("select", *a)

    def after_layer(self, *a):
        return self._first("after_layer", *a)

    def end(self):
        self._each("end")

    def accumulate(self, *a):
        self._each("accumulate", *a)

    def appended(self, *a):
        self._each("appended", *a)

    def evicted(self, *a):
        self._each("evicted", *a)

    def compacted(self, *a):
        self._each("compacted", *a)

    def recall(self, *a):
        self._each("recall", *a)

    def before_suffix_chunk(self, *a):
        self._each("before_suffix_chunk", *a)
