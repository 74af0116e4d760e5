"""The policy contract (kvpress style, DESIGN §3/§8): one small dataclass per method, the base class
carries the shared mechanics.

The generator calls, per layer ``L``:

* ``observe(L, cache, attn_sum, attn_max, slots, phase)`` after every attention run
  (``phase`` is ``"prefill"``, ``"window"`` — the prompt's observation window, its last chunks — or
  ``"decode"``; ``slots`` is None when the whole cache was read, else the ``[kv, m]`` selection);
* ``keep(L, cache, target, phase) -> slots`` whenever the cache must shrink to ``target`` tokens:
  once per layer at the end of its prefill (``"final"``: the layer's whole prompt is in a one-layer
  scratch buffer, scored by the observation window), in blocks during decode, or — in the strict
  ``prefill="rolling"`` mode — as chunks arrive. Returns ascending slot indices, ``[m]`` for all heads or ``[kv, m]`` per head;
* ``select(L, q, cache) -> slots | None`` before each decode-step attention (dynamic, query-aware
  selection; None reads the whole cache);
* ``evicted(L, cache, keep)`` just before the cache (or the prefill scratch) keeps only ``keep``: the
  other slots leave RAM (a recalling policy writes them to its cold store);
* ``recall(L, q, cache, phase)`` before the attention of the protected suffix (``phase="suffix"``,
  ``q`` the queries it selects with) and of each decode step (``"decode"``): a recalling policy fills
  the cache's fetch area with evicted groups; ``fetch_tokens(cap, suffix, whole, room)`` is how many
  of the budget's ``cap`` slots form that area (at most ``room``, what the resident minimum leaves; 0: no offload);
* ``skip_layer(L) -> bool`` (decode), ``after_layer(L, h_in, h_out, q_last, cache, positions) -> token index | None``
  at the end of each layer's prefill (prompt distillation may drop prompt tokens for later layers).

Every policy counts the cost of its decisions in the terms secure multi-party computation cares
about (``comparisons``, ``multiplications``, ``exp_div``, ``gathers``), so "MPC-friendly" is measured.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np


def log2c(n: int) -> int:
    return max(1, int(np.ceil(np.log2(max(2, n)))))


def topk_sorted(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest along the last axis, ascending (stable layout for the cache)."""
    n = scores.shape[-1]
    if k >= n:
        idx = np.arange(n)
        return np.broadcast_to(idx, scores.shape[:-1] + (n,)).copy() if scores.ndim > 1 else idx
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    return np.sort(part, axis=-1)


@dataclass
class Context:
    n_layers: int
    kv_heads: int
    heads: int
    head_dim: int
    capacity: int
    prompt_len: int
    max_new_tokens: int
    cold_dir: str | None = None   # directory the generator call owns for evicted K/V (recalling policies)
    fetch: int = 0                # slots of each layer's fetch area (after ``capacity``)
    stream_suffix: bool = False   # the protected suffix is text being scored (score()): recalls come causally, per block


@dataclass
class Policy:
    """Base: no eviction of its own (``keep`` returns None), no selection, no layer skipping."""

    name: ClassVar[str] = "base"
    needs_decode_attention: ClassVar[bool] = False   # wants observe() at decode steps
    window_reset: ClassVar[bool] = False             # "layer" prefill: score keys by the observation window only
    min_tokens: ClassVar[int] = 8                    # smallest cache (tokens per layer) it can work with
    align: ClassVar[int] = 1                         # capacity / eviction granularity
    recalls: ClassVar[bool] = False                  # reads evicted tokens back (needs a fetch area)

    cost: Counter = field(default_factory=Counter, init=False, repr=False)

    def begin(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cost = Counter()

    def observation_window(self, prompt_len: int) -> int:
        """How many final prompt tokens form the observation window (its own last prefill chunk); 0 = none."""
        return 0

    def bytes_per_token(self, kv_heads: int, head_dim: int) -> int:
        """Extra bytes per cached token per layer the policy keeps (counted against the budget)."""
        return 0

    def observe(self, layer, cache, attn_sum, attn_max, slots, phase) -> None:
        pass

    def keep(self, layer, cache, target, phase):
        return None

    def after_compact(self, layer, cache) -> None:
        pass

    def after_append(self, layer, cache, s: slice) -> None:
        pass

    def select(self, layer, q, cache):
        return None

    def skip_layer(self, layer) -> bool:
        return False

    def after_layer(self, layer, h_in, h_out, q_last, cache, positions):
        return None

    def fetch_tokens(self, cap: int, suffix: int, whole: int, room: int) -> int:
        """Slots of each layer's fetch area, carved out of ``cap`` (the budget's tokens per layer), ``<= room``."""
        return 0

    def fixed_bytes(self, n_layers: int, kv_heads: int, head_dim: int, n_tokens: int) -> int:
        """RAM the policy keeps whatever the capacity (counted against a byte budget), for ``n_tokens`` in all."""
        return 0

    def evicted(self, layer, cache, keep) -> None:
        pass

    def recall(self, layer, q, cache, phase) -> None:
        pass

    def end(self) -> None:
        """The call is over (normally or not): release files and handles."""

    def cold_stats(self) -> dict:
        return {}

    # ---- shared mechanics ---------------------------------------------------------------
    def count(self, **kw) -> None:
        for k, v in kw.items():
            self.cost[k] += int(v)

    def keep_top(self, cache, score: np.ndarray, target: int, recent: int = 0, first: int = 0) -> np.ndarray:
        """Keep the ``first`` and the ``recent`` slots plus the best-scored others, ``target`` in all.

        ``score`` is ``[n]`` (shared) or ``[kv, n]`` (per head). Counted: a top-k over the candidates."""
        n = cache.n
        recent = min(recent, max(0, target - first))
        s = np.array(score[..., :n], dtype=np.float32, copy=True)
        if first:
            s[..., :first] = np.inf
        if recent:
            s[..., n - recent:] = np.inf
        idx = topk_sorted(s, target)
        rows = 1 if s.ndim == 1 else s.shape[0]
        self.count(comparisons=rows * n * log2c(target), gathers=rows * target)
        return idx


@dataclass
class Composite(Policy):
    """``static + dynamic (+ ...)``: the first part with an opinion decides each hook."""

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
    def recalls(self):  # type: ignore[override]
        return any(p.recalls for p in self.parts)

    def fetch_tokens(self, *a):
        return max(p.fetch_tokens(*a) for p in self.parts)

    def fixed_bytes(self, *a):
        return sum(p.fixed_bytes(*a) for p in self.parts)

    def evicted(self, *a):
        for p in self.parts:
            p.evicted(*a)

    def recall(self, *a):
        for p in self.parts:
            p.recall(*a)

    def end(self):
        for p in self.parts:
            p.end()

    def cold_stats(self):
        out: dict = {}
        for p in self.parts:
            out.update(p.cold_stats())
        return out

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

    def observe(self, *a):
        for p in self.parts:
            p.observe(*a)

    def keep(self, *a):
        for p in self.parts:
            r = p.keep(*a)
            if r is not None:
                return r
        return None

    def after_compact(self, *a):
        for p in self.parts:
            p.after_compact(*a)

    def after_append(self, *a):
        for p in self.parts:
            p.after_append(*a)

    def select(self, *a):
        for p in self.parts:
            r = p.select(*a)
            if r is not None:
                return r
        return None

    def skip_layer(self, layer):
        return any(p.skip_layer(layer) for p in self.parts)

    def after_layer(self, *a):
        for p in self.parts:
            r = p.after_layer(*a)
            if r is not None:
                return r
        return None

    @property
    def total_cost(self) -> Counter:
        c = Counter(self.cost)
        for p in self.parts:
            c.update(getattr(p, "total_cost", p.cost))
        return c
