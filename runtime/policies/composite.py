"""``a+b``: several policies acting as one (a static prefill eviction + a dynamic decode selection, ...)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Policy


def _first_opinion(results):
    """The first result that is not None (the later parts are not asked)."""
    return next((r for r in results if r is not None), None)


def _every(results) -> None:
    """Ask every part; no result."""
    for _ in results:
        pass


def _merged(results) -> dict:
    out: dict = {}
    for r in results:
        out.update(r)
    return out


@dataclass
class Composite(Policy):
    """``static + dynamic (+ ...)``: the first part with an opinion decides each choice; every part
    sees every event. The planning attributes and the hooks that only fold the parts' answers are
    installed from :data:`_ATTRIBUTES` and :data:`_HOOKS` below."""

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
    def align(self):  # type: ignore[override]
        a = 1
        for p in self.parts:
            a = int(np.lcm(a, p.align))
        return a

    @property
    def total_cost(self) -> Counter:
        c = Counter(self.cost)
        for p in self.parts:
            c.update(getattr(p, "total_cost", p.cost))
        return c


# How the parts' answers fold into the composite's: planning attributes, then the engine's calls and
# extension points (the first part with an opinion decides a choice; every part sees every event).
_ATTRIBUTES = {"needs_decode_attention": any, "window_reset": any, "min_tokens": max, "evicts": all}
_HOOKS = {
    "observation_window": max, "fetch_tokens": max, "reconstruction": max, "layer_shares": _first_opinion,
    "surveyor": _first_opinion, "surveyed": _every, "survey_tokens": max, "suffix_step": min, "skip_layer": any,
    "bytes_per_token": sum, "fixed_bytes": sum, "prefill_bytes": sum, "held_bytes": sum, "report": _merged,
    "keep": _first_opinion, "select": _first_opinion, "after_layer": _first_opinion,
    "end": _every, "accumulate": _every, "appended": _every, "evicted": _every, "compacted": _every,
    "recall": _every, "before_suffix_chunk": _every, "queries": _every,
}


def _over_parts(combine, attr: str) -> property:
    return property(lambda self: combine(getattr(p, attr) for p in self.parts))


def _to_parts(combine, hook: str):
    def method(self, *a):  # a generator: _first_opinion stops asking at the first answer
        return combine(getattr(p, hook)(*a) for p in self.parts)

    method.__name__, method.__qualname__ = hook, f"Composite.{hook}"
    return method


for _name, _combine in _ATTRIBUTES.items():
    setattr(Composite, _name, _over_parts(_combine, _name))
for _name, _combine in _HOOKS.items():
    setattr(Composite, _name, _to_parts(_combine, _name))
