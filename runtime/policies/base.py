"""The KV policy contract: one small dataclass per method; the base classes carry the mechanics.

The generate engine calls, per layer ``L`` (nothing else):

* ``begin(ctx)`` / ``end()`` around a call (``end`` also after an exception: release files);
* planning, before any allocation: ``bytes_per_token``, ``fixed_bytes``, ``prefill_bytes``, ``fetch_tokens``,
  ``layer_shares``, ``reconstruction``, ``surveyor`` / ``surveyed`` (a recording pass over the context first), the class
  attributes ``min_tokens``, ``align``, ``evicts``, and ``observation_window(prompt_len)``;
* ``observe(L, cache, attn_sum, attn_max, slots, phase)`` after an attention run (``phase``:
  ``"prefill"``, ``"window"`` — the prompt's observation window, its last chunks —, ``"reconstruct"`` — a
  context-reconstruction pass's attention over the context's keys (``reconstruction``) — or ``"decode"``;
  ``slots`` None when the whole cache was read, else the ``[kv, m]`` selection). At decode steps only
  when ``needs_decode_attention``;
* ``queries(L, q, positions, phase)`` with each prompt chunk's queries (``[1, H, T, D]``, after the rotary
  embedding), before its attention runs;
* ``appended(L, cache, s)`` after new tokens were written to slots ``s`` of a layer's cache;
* ``compress(L, cache, target, phase, into=None)`` whenever a cache must shrink to ``target`` tokens
  (once per layer at the end of a "layer" prefill, from the one-layer scratch ``cache`` ``into`` the
  layer's cache; in blocks during decode; as chunks arrive in a "rolling" prefill);
* ``attend(L, q, cache) -> slots | None`` before each decode-step attention (None reads the whole cache);
* ``suffix_step`` and ``before_suffix_chunk`` around the protected suffix's chunks;
* ``skip_layer(L)`` (decode) and ``after_layer(L, h_in, h_out, q_last, cache, positions)`` (end of a
  layer's prefill; may return the prompt token indices later layers keep);
* ``report(decode_steps)`` (the policy's own stats sections) and ``held_bytes()`` (RAM it holds
  beside the cache slots, counted in the reported KV bytes).

A policy implements extension points instead, and the base turns them into the calls above:
``keep`` (which slots stay; None: attention sinks + recent tokens), ``evicted`` (the other slots are
about to leave RAM), ``compacted`` (the cache was rewritten), ``select`` (a decode-time selection),
``recall`` (fill the cache's fetch area, :mod:`.recall`), ``accumulate`` (fold an attention run into the
cache's per-slot scores). Score-and-evict methods derive from :class:`ScorePolicy` and write only
``score()`` plus declarative knobs.

Every policy counts the cost of its decisions in the terms secure multi-party computation cares
about (``comparisons``, ``multiplications``, ``exp_div``, ``gathers``), so "MPC-friendly" is measured.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .sharing import LayerSharing

SINKS = 4  # attention sinks the default eviction keeps (Xiao et al. 2024)


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


def max_pool(x: np.ndarray, kernel: int) -> np.ndarray:
    """1-D max pooling along the last axis, same length (SnapKV clusters neighbouring votes)."""
    r = kernel // 2
    out = x.copy()
    for s in range(1, r + 1):
        out[..., s:] = np.maximum(out[..., s:], x[..., :-s])
        out[..., :-s] = np.maximum(out[..., :-s], x[..., s:])
    return out


def sinks_and_recent(n: int, target: int, sinks: int = SINKS) -> np.ndarray:
    """The first ``sinks`` slots and the most recent ones, ``target`` in all (StreamingLLM's rule)."""
    sinks = min(sinks, target)
    return np.concatenate([np.arange(sinks), np.arange(n - (target - sinks), n)])


@dataclass
class Context:
    n_layers: int
    kv_heads: int
    heads: int
    head_dim: int
    capacity: int
    prompt_len: int
    max_new_tokens: int
    fetch: int = 0                # slots of each layer's fetch area (after ``capacity``)
    stream_suffix: bool = False   # the protected suffix is text being scored (score()): recalls come causally
    look_once: bool = False       # "layer" prefill: each layer's whole prompt is scored once, from a scratch
    rope_theta: float | None = None  # the model's rotary base (a policy modelling future queries rotates with it)
    capacities: tuple = ()        # resident slots per layer when they differ (``layer_shares``); empty: ``capacity`` each

    def layer_capacity(self, layer: int) -> int:
        return self.capacities[layer] if self.capacities else self.capacity


@dataclass
class Policy:
    """Base: no eviction of its own (the sinks + recent fallback), no selection, no layer skipping."""

    name: ClassVar[str] = "base"
    needs_decode_attention: ClassVar[bool] = False   # wants observe() at decode steps
    window_reset: ClassVar[bool] = False             # look-once prefill: keys are scored by the observation window only
    min_tokens: ClassVar[int] = 8                    # smallest cache (tokens per layer) it can work with
    align: ClassVar[int] = 1                         # capacity / eviction granularity
    evicts: ClassVar[bool] = True                    # False: the budget must hold the prompt and every new token

    cost: Counter = field(default_factory=Counter, init=False, repr=False)

    # ---- lifecycle and planning ---------------------------------------------------------
    def begin(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cost = Counter()
        self.windowed: set[int] = set()

    def end(self) -> None:
        """The call is over (normally or not): release files and handles."""

    def observation_window(self, prompt_len: int) -> int:
        """How many final prompt tokens form the observation window (its own last prefill chunk); 0 = none."""
        return 0

    def bytes_per_token(self, kv_heads: int, head_dim: int) -> int:
        """Extra bytes per cached token per layer the policy keeps (counted against the budget)."""
        return 0

    def fixed_bytes(self, n_layers: int, kv_heads: int, head_dim: int, n_tokens: int) -> int:
        """RAM the policy keeps whatever the capacity (counted against a byte budget), for ``n_tokens`` in all."""
        return 0

    def prefill_bytes(self, heads: int, head_dim: int) -> int:
        """RAM the policy holds only while one layer's prompt runs (e.g. statistics of its ``heads`` query heads),
        counted against a byte budget beside the scratch."""
        return 0

    def fetch_tokens(self, cap: int, suffix: int, whole: int, room: int) -> int:
        """Slots of each layer's fetch area, carved out of ``cap`` (the budget's tokens per layer), ``<= room``."""
        return 0

    def reconstruction(self, n_ctx: int, room: int) -> int:
        """Tokens of each context-reconstruction pass a look-once prefill runs after a layer's context (KVzip: an
        instruction to repeat the context, then the context again; its attention is handed over as phase
        ``"reconstruct"`` and its keys dropped), at most ``room`` (the positions the model has left); 0: none.
        The scratch holds the context and one pass, so a byte budget pays for it."""
        return 0

    def surveyor(self, kept: float = 1.0) -> "Policy | None":
        """A recording policy the engine runs over the prompt's context before planning the cache (one plain
        layer-by-layer pass, :mod:`edge_sel.runtime.generate.survey`), only when the prefill is look-once and
        evicts; ``kept``: the fraction of the context the first plan keeps; None: no survey."""
        return None

    def survey_tokens(self, n_ctx: int, room: int) -> int:
        """Tokens of the context-reconstruction pass the survey's recorder may run (its ``reconstruction``), so the
        planner sizes the scratch for it; 0: none."""
        return 0

    def surveyed(self, recorder: "Policy") -> None:
        """The survey's recorder, after its pass (before ``layer_shares`` is asked and before ``begin``)."""

    def layer_shares(self, n_layers: int, kept: float = 1.0, model: tuple = ()) -> np.ndarray | None:
        """Relative share of each layer in what the context keeps (mean 1; the planner keeps the total and each
        layer's minimum); None: every layer keeps the same number of tokens. ``kept``: the fraction of the context
        the budget keeps; ``model``: (layers, query heads, KV heads, head size)."""
        return None

    # ---- the engine's calls -------------------------------------------------------------
    def observe(self, layer, cache, attn_sum, attn_max, slots, phase) -> None:
        if phase == "window" and self.window_reset and self.ctx.look_once and layer not in self.windowed:
            self.windowed.add(layer)
            cache.score[:, : cache.n] = 0.0  # look-once: only the window's queries score the keys
        self.accumulate(layer, cache, attn_sum, attn_max, slots, phase)

    def queries(self, layer, q, positions, phase) -> None:
        """A prompt chunk's queries (``[1, H, T, D]`` after the rotary embedding) at ``positions``."""

    def appended(self, layer, cache, s: slice) -> None:
        pass

    def compress(self, layer, cache, target: int | None, phase: str, into=None) -> None:
        """Shrink ``cache`` to ``target`` slots (None: keep all) in place, or copy what stays ``into`` another."""
        idx = None
        if target is not None:
            idx = self.keep(layer, cache, target, phase)
            if idx is None:  # no opinion: attention sinks + recent tokens, needs no scores
                idx = sinks_and_recent(cache.n, target)
            self.evicted(layer, cache, idx)
        if into is None:
            if idx is not None:
                cache.compact(idx)
            into = cache
        else:
            into.load_from(cache, idx)
        self.compacted(layer, into)

    def attend(self, layer, q, cache):
        """Slots a decode step's attention reads (resident selection + the fetch area), None = the whole cache."""
        self.recall(layer, q, cache, "decode")
        slots = self.select(layer, q, cache)
        if slots is not None and cache.nf:
            slots = np.concatenate([slots, np.broadcast_to(cache.fetched_slots(), (slots.shape[0], cache.nf))], axis=1)
        return slots

    def suffix_step(self, chunk: int, cache) -> int:
        """Tokens per chunk of the protected suffix."""
        return chunk

    def before_suffix_chunk(self, layer, cache, i: int, queries: list, q_ctx) -> None:
        """Before the attention of the suffix's chunk ``i`` (``queries``: every chunk's queries;
        ``q_ctx``: the context's last queries or None)."""

    def skip_layer(self, layer) -> bool:
        return False

    def after_layer(self, layer, h_in, h_out, q_last, cache, positions):
        return None

    def report(self, decode_steps: int) -> dict:
        """The policy's own stats sections (merged into the generator's stats)."""
        return {}

    def held_bytes(self) -> int:
        return 0

    # ---- extension points ---------------------------------------------------------------
    def accumulate(self, layer, cache, attn_sum, attn_max, slots, phase) -> None:
        pass

    def keep(self, layer, cache, target, phase):
        """Ascending slot indices that stay, ``[m]`` for all heads or ``[kv, m]`` per head; None: no opinion."""
        return None

    def evicted(self, layer, cache, keep) -> None:
        pass

    def compacted(self, layer, cache) -> None:
        pass

    def select(self, layer, q, cache):
        return None

    def recall(self, layer, q, cache, phase) -> None:
        pass

    # ---- shared mechanics ---------------------------------------------------------------
    def count(self, **kw) -> None:
        for k, v in kw.items():
            self.cost[k] += int(v)

    def keep_top(self, n: int, score: np.ndarray, target: int, recent: int = 0, first: int = 0) -> np.ndarray:
        """Keep the ``first`` and the ``recent`` of ``n`` slots plus the best-scored others, ``target`` in all.

        ``score`` is ``[n]`` (shared) or ``[kv, n]`` (per head). Counted: a top-k over the candidates."""
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


class ScorePolicy(Policy):
    """Score-and-evict (kvpress's ``ScorerPress``): a subclass writes ``score()`` and sets knobs.

    Knobs (class attributes or dataclass fields): ``votes`` — how an attention run folds into the
    cache's per-slot scores (None: no votes; ``"sum"``: accumulated probabilities, additions only;
    ``"max"``: running max); ``heads`` — ``"each"`` (one score row per KV head, per-head eviction) or
    ``"shared"`` (reduced over the layer's heads, one kept set); ``vote_pool`` — max-pool each vote;
    ``pool`` — max-pool the final score; ``share`` — groups of layers replaying the leader's decisions
    (followers neither vote nor score); ``sinks_kept(target)`` / ``recent_kept(target)`` — slots always kept.
    ``choose`` may be overridden for a selection that is not a top-k (whole windows, thresholds)."""

    votes = None
    heads = "each"
    vote_pool = 1
    pool = 1
    share = 1

    def begin(self, ctx):
        super().begin(ctx)
        self.sharing = LayerSharing(self.share, ctx.n_layers)

    def score(self, layer: int, keys: np.ndarray, votes: np.ndarray) -> np.ndarray:
        """Importance of each cached token (higher stays): ``[kv, n]`` or ``[n]``. ``keys``: ``[kv, n, D]``
        (after rotary embedding), ``votes``: ``[kv, n]`` the attention folded in by ``votes``/``heads``."""
        return votes if self.heads == "each" else votes[0]

    def sinks_kept(self, target: int) -> int:
        return 0

    def recent_kept(self, target: int) -> int:
        return 0

    def choose(self, n: int, kv_heads: int, score: np.ndarray, target: int) -> np.ndarray:
        return self.keep_top(n, score, target, recent=self.recent_kept(target), first=self.sinks_kept(target))

    def accumulate(self, layer, cache, attn_sum, attn_max, slots, phase):
        if self.votes is None or not self.sharing.is_leader(layer):
            return
        if phase == "decode" and not self.needs_decode_attention:
            return
        maxed = self.votes == "max"
        a = (attn_max if maxed else attn_sum)[0]                                   # [kv, m]
        if self.heads == "shared":
            if maxed:
                self.count(comparisons=a.size)
            row = a.max(axis=0) if maxed else a.sum(axis=0)
            if slots is None:
                n = row.shape[0]
                cache.score[:, :n] = np.maximum(cache.score[:, :n], row[None]) if maxed else cache.score[:, :n] + row[None]
            else:
                for h in range(slots.shape[0]):  # per-head selections; the score row is shared by the heads
                    ok = slots[h] >= 0  # -1: no slot (a selection's group past the capacity)
                    s, ah = slots[h][ok], a[h][ok]
                    cur = cache.score[:, s]
                    cache.score[:, s] = np.maximum(cur, ah[None]) if maxed else cur + ah[None]
            return
        if self.vote_pool > 1 and slots is None:
            a = max_pool(a, self.vote_pool)
            self.count(comparisons=cache.kv_heads * a.shape[1] * (self.vote_pool - 1))
        if slots is None:
            m = a.shape[1]
            if maxed:
                cache.score[:, :m] = np.maximum(cache.score[:, :m], a)
            else:
                cache.score[:, :m] += a
        else:  # additions only (free in MPC); the probabilities come from attention itself
            for h in range(slots.shape[0]):
                ok = slots[h] >= 0
                s, ah = slots[h][ok], a[h][ok]
                if maxed:
                    cache.score[h, s] = np.maximum(cache.score[h, s], ah)
                else:
                    cache.score[h, s] += ah

    def keep(self, layer, cache, target, phase):
        n = cache.n

        def decide():
            score = self.score(layer, cache.k[0, :, :n], cache.score[:, :n])
            if self.pool > 1:  # a token attended to keeps its neighbours, as SnapKV's pooling
                rows = score.shape[0] if score.ndim > 1 else 1
                score = max_pool(score, self.pool)
                self.count(comparisons=rows * n * (self.pool - 1))
            return self.choose(n, cache.kv_heads, score, target)

        idx, replayed = self.sharing.decide(layer, n, target, decide)
        if replayed:
            self.count(gathers=cache.kv_heads * target)
        return idx


class ObservationWindowPolicy(ScorePolicy):
    """Scored by the observation window's summed attention (SnapKV's rule, shared by WindowKV): the last
    prompt queries, as many as the dataclass field named by ``observed`` but at most half the prompt, vote;
    a look-once prefill scores the keys by the window's queries only."""

    window_reset = True
    votes = "sum"
    observed = "window"  # the field holding the window's size

    def observation_window(self, prompt_len):
        return min(getattr(self, self.observed), max(1, prompt_len // 2))
