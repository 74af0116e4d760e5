"""KV budget planning for generation: turn ``kv_budget`` into the cache's capacity, or refuse it up front.

``kv_budget``: ``None`` (room for the whole prompt and every new token), tokens per layer (``int``),
a fraction of the prompt (``float`` in (0, 1]), or bytes for the whole cache (``"64MB"``: keys, values,
slot positions, scores and the policy's own statistics, all layers). With a protected suffix a fraction
means the fraction of the context kept, with the suffix and the new tokens on top (kvpress's
``compression_ratio``); a token or byte budget still bounds the whole cache. An infeasible budget is
refused before any work with the minimum that would work (:class:`BudgetError.minimum_bytes`).

The plan: the resident tokens per layer, the policy's fetch area on top of them (both inside the
budget; a policy that reads evicted tokens back sizes it), and whether prefill uses a one-layer
whole-prompt scratch (look-once prefill), which a byte budget must also pay for (with a policy that reconstructs
the context, KVzip's way, the scratch holds the context and one reconstruction pass). A policy with
``layer_shares`` gets unequal layers: the same total (so the same bytes), each layer at least the minimum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edge_sel.runtime.errors import BudgetError, InputError
from edge_sel.runtime.units import format_size, parse_size

from ..kvcache import LayerCache
from ..policies import Policy, policy_label

log = logging.getLogger("edge_sel")


def parse_budget(kv_budget) -> tuple[str, float] | None:
    """``("tokens" | "fraction" | "bytes", value)`` or None (no budget)."""
    if kv_budget is None:
        return None
    if isinstance(kv_budget, bool):
        raise InputError(f"kv_budget must be tokens, a fraction or a size, got {kv_budget!r}")
    if isinstance(kv_budget, (int, np.integer)):
        if kv_budget <= 0:
            raise BudgetError(f"kv_budget must be positive, got {kv_budget} tokens")
        return ("tokens", int(kv_budget))
    if isinstance(kv_budget, float):
        if not 0.0 < kv_budget <= 1.0:
            raise BudgetError(f"kv_budget as a fraction of the prompt must be in (0, 1], got {kv_budget}")
        return ("fraction", float(kv_budget))
    text = str(kv_budget).strip()
    try:  # "512" -> tokens, "0.2" -> fraction, "64MB" -> bytes
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        if not np.isfinite(value) or value <= 0:
            raise BudgetError(f"kv_budget must be positive, got {text!r}")
        if "." in text or "e" in text.lower():
            if value > 1.0 and value != int(value):
                raise BudgetError(f"kv_budget {text!r}: a fraction of the prompt must be in (0, 1] and tokens a whole number")
            return parse_budget(value if value <= 1.0 else int(value))
        return ("tokens", int(value))
    try:
        return ("bytes", parse_size(text))
    except InputError as e:
        raise BudgetError(f"kv_budget {text!r}: {e}. Use tokens (512), a fraction of the prompt (0.2) or a size (64MB)") from None


@dataclass(frozen=True)
class KVPlan:
    resident: int   # tokens per layer the cache holds
    fetch: int      # fetch-area slots per layer on top of ``resident`` (inside the budget)
    scratch: bool   # prefill builds each layer's whole prompt K/V in one shared scratch, then compresses it
    layers: tuple = ()  # resident tokens of each layer when they differ (sum <= n_layers * resident); empty: equal
    scratch_tokens: int = 0  # the scratch's slots: the prompt, or the context and a reconstruction pass if longer
    kept: float = 1.0  # the fraction of the context a layer keeps, on average

    def layer(self, i: int) -> int:
        return self.layers[i] if self.layers else self.resident


class KVPlanner:
    """Capacity planning for one model geometry, one budget and one prefill mode."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, context: int, kv_budget, prefill: str = "layer",
                 heads: int | None = None):
        self.n_layers, self.kv_heads, self.head_dim, self.context = n_layers, kv_heads, head_dim, context
        self.heads = heads or kv_heads  # query heads (a policy may keep statistics of the queries while a layer runs)
        self.budget = parse_budget(kv_budget)
        self.prefill = prefill

    @property
    def budget_bytes(self) -> int | None:
        return self.budget[1] if self.budget and self.budget[0] == "bytes" else None

    def slot_bytes(self, policy: Policy) -> int:
        """Bytes one cached token costs in one layer (K, V, position, score, policy statistics)."""
        return LayerCache.bytes_per_slot(self.kv_heads, self.head_dim) + policy.bytes_per_token(self.kv_heads, self.head_dim)

    def bytes_per_token(self, policy: Policy) -> int:
        return self.n_layers * self.slot_bytes(policy)

    def scratch_bytes(self, n_tokens: int) -> int:
        return n_tokens * LayerCache.bytes_per_slot(self.kv_heads, self.head_dim)

    def clamp_new(self, n_prompt: int, max_new: int) -> int:
        """``max_new`` clamped so positions stay inside the model's context."""
        room = self.context - n_prompt
        if max_new > room:
            log.warning("max_new_tokens=%d clamped to %d: the model's context is %d tokens", max_new, room, self.context)
        return max(1, min(max_new, room))

    def min_tokens(self, policy: Policy, n_prompt: int, max_new: int) -> int:
        if not policy.evicts:
            return n_prompt + max_new
        a = policy.align
        need = max(policy.min_tokens + 1, 2 * a, 8)
        return -(-need // a) * a

    def fixed_bytes(self, policy: Policy, whole: int) -> int:
        return (policy.fixed_bytes(self.n_layers, self.kv_heads, self.head_dim, whole)
                + policy.prefill_bytes(self.heads, self.head_dim))

    def minimum_bytes(self, policy: Policy, n_prompt: int, max_new: int) -> int:
        """Smallest byte budget a prompt of ``n_prompt`` tokens and ``max_new`` new ones can run with."""
        return (self.min_tokens(policy, n_prompt, max_new) * self.bytes_per_token(policy)
                + self.fixed_bytes(policy, n_prompt + max_new))

    def plan(self, policy: Policy, n_prompt: int, max_new: int, suffix: int = 0) -> KVPlan:
        whole = n_prompt + max_new
        per_tok = self.bytes_per_token(policy)
        need = self.min_tokens(policy, n_prompt, max_new)
        scratch = self.prefill == "layer"
        n_ctx = n_prompt - suffix
        # a look-once prefill may run context-reconstruction passes (KVzip) whose keys the scratch holds for a while
        room = max(0, self.context - n_ctx)
        scratch_tokens = max(n_prompt, n_ctx + max(0, int(policy.reconstruction(n_ctx, room)),
                                                   int(policy.survey_tokens(n_ctx, room))))
        fixed = self.fixed_bytes(policy, whole) if self.budget is not None else 0
        a = policy.align
        if self.budget is None:
            cap = -(-whole // a) * a
        else:
            kind, value = self.budget
            if kind == "bytes":
                value = max(0, int(value) - fixed)  # the policy's fixed RAM comes out of the byte budget first
            cap = {"tokens": lambda: int(value), "bytes": lambda: int(value) // per_tok,
                   "fraction": lambda: (int(np.ceil(value * (n_prompt - suffix))) + suffix + max_new if suffix
                                        else int(np.ceil(value * n_prompt)))}[kind]()
            if kind == "bytes" and scratch and (cap if suffix else cap // a * a) < whole:  # after the alignment
                # the scratch counts against a byte budget; without room for it, prefill rolls instead
                with_scratch = (int(value) - self.scratch_bytes(scratch_tokens)) // per_tok
                if with_scratch // a * a >= need:
                    cap = with_scratch
                else:
                    scratch = False
            if suffix:  # exact: the context's share is not rounded down to the policy's alignment
                cap = min(-(-whole // a) * a, cap)
            else:
                cap = min(-(-whole // a) * a, cap // a * a)
        fetch = 0
        if self.budget is not None and cap >= need:  # the fetch area only takes what the resident minimum leaves
            # (below the minimum the budget is refused next: no "running without recall" warning before the error)
            fetch = policy.fetch_tokens(cap, suffix, whole, max(0, cap - max(need, suffix + 8 if suffix else 0)))
        res = cap - fetch
        if (res < need or (suffix and res - suffix < 8)) and res < whole:
            raise self._refusal(policy, cap, need, per_tok, fixed, n_prompt, max_new, suffix)
        layers = ()
        base = suffix + max_new if suffix else 0  # the suffix and the new tokens: every layer holds them
        kept = min(1.0, max(0, res - base) / max(1, n_prompt - suffix))  # the fraction of the context each layer keeps
        geometry = (self.n_layers, self.heads, self.kv_heads, self.head_dim)
        shares = policy.layer_shares(self.n_layers, kept, geometry) if res < whole else None
        if shares is not None:
            lo = max(need, base + 8) if suffix else need
            hi = -(-whole // a) * a  # no layer needs more than the whole call
            layers = split_layers(res, base, np.asarray(shares, dtype=np.float64), lo, hi, 1 if suffix else a)
        scratch = scratch and min(layers or (res,)) < whole
        return KVPlan(res, fetch, scratch, layers, scratch_tokens if scratch else 0, kept)

    def _refusal(self, policy, cap, need, per_tok, fixed, n_prompt, max_new, suffix) -> BudgetError:
        what = {"tokens": "tokens", "fraction": "of the prompt", "bytes": "bytes"}[self.budget[0]] if self.budget else ""
        extra = (f"the 'full' policy keeps the {n_prompt}-token prompt and {max_new} new tokens"
                 if not policy.evicts else f"policy {policy_label(policy)!r} needs at least {need} tokens per layer")
        if suffix and policy.evicts and need < suffix + 8:
            extra += f" and room for the {suffix} protected suffix tokens plus 8"
            need = suffix + 8
        return BudgetError(
            f"kv_budget {self.budget[1] if self.budget else None} {what} gives {cap} cached tokens per layer, below the "
            f"minimum {need} ({extra}); minimum budget: {need} tokens = {format_size(need * per_tok + fixed)} "
            f"(--kv-budget {need} or {-(-(need * per_tok + fixed) // 1024**2)}MiB)", minimum_bytes=need * per_tok + fixed)


def split_layers(res: int, base: int, shares: np.ndarray, lo: int, hi: int, step: int) -> tuple[int, ...]:
    """Per-layer capacities: ``base`` each plus the context's share ``(res - base) * shares / mean(shares)``, in
    multiples of ``step``, each in ``[lo, hi]``, summing to at most ``n * res`` (the budget of ``n`` equal layers)."""
    n = len(shares)
    if n == 0 or not np.all(np.isfinite(shares)) or shares.min() < 0 or shares.sum() <= 0:
        raise ValueError(f"layer shares must be finite, non-negative and not all zero, got {shares}")
    total = n * res
    ideal = base + (res - base) * shares / shares.mean()
    caps = np.clip(np.floor(ideal / step) * step, lo, hi).astype(np.int64)
    while caps.sum() > total:  # the minimum pushed some layers up: take it back from the most over-served
        ok = caps - step >= lo
        if not ok.any():
            return tuple([res] * n)
        caps[np.argmax(np.where(ok, caps - ideal, -np.inf))] -= step
    while total - caps.sum() >= step:  # rounding left room: give it to the most under-served
        ok = caps + step <= hi
        if not ok.any():
            break
        caps[np.argmax(np.where(ok, ideal - caps, -np.inf))] += step
    return tuple(int(c) for c in caps)
