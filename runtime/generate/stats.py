"""What one generate call measured: a typed record, its full dict view and the public one the CLI prints."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from ..memory import peak_rss_bytes
from ..policies import policy_label

COST_KEYS = ("comparisons", "multiplications", "exp_div", "gathers")


def _public(**kw):
    return field(metadata={"public": True}, **kw)


@dataclass
class GenerationStats:
    policy: str = _public()
    prompt_tokens: int = _public()
    new_tokens: int = _public()
    prefill_s: float = _public()
    decode_s: float = 0.0
    decode_ms_per_token: float | None = _public(default=None)
    decode_cpu_ms_per_token: float | None = None  # all threads; robust to a busy machine
    shared_pool_threads: int = 0  # the process-wide spinning pool the decoder's sessions run on (0: their own pools)
    kv_capacity_tokens: int = _public(default=0)  # resident + fetch area: what attention may read (the mean layer's)
    kv_capacity_tokens_per_layer: list = field(default_factory=list)  # each layer's (unequal with ``layer_shares``)
    kv_resident_tokens: int = 0
    kv_fetch_tokens: int = 0
    kv_budget_bytes: int | None = _public(default=None)
    kv_bytes_allocated: int = _public(default=0)
    kv_bytes_peak: int = _public(default=0)
    prefill_mode: str = "layer"
    prefill_scratch_bytes: int = 0
    kv_tokens_peak_per_layer: int = 0
    kv_tokens_kept: list = field(default_factory=list)
    selection_scratch_bytes_peak: int = 0
    evictions: int = _public(default=0)
    cost_prefill: dict = field(default_factory=dict)
    cost_per_decode_step: dict = _public(default_factory=dict)
    skipped_layers: list = _public(default_factory=list)
    peak_rss_bytes: int = _public(default=0)
    provider: dict = _public(default_factory=dict)  # execution providers: choice, node assignment, load time
    memory_release: dict = field(default_factory=dict)  # which memory mechanisms ran (memory.ReleaseLog)
    sections: dict = field(default_factory=dict)  # the policy's own sections (e.g. "cold": a recall store's I/O)

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sections"}
        out.update(self.sections)
        return out

    def public(self) -> dict[str, Any]:
        """The fields a user reads (``edge-sel generate --json``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("public")}


class StatsRecorder:
    """Turns a running call into :class:`GenerationStats`; created when its prefill is done."""

    def __init__(self, planner, call, tracker, prefill_s: float):
        self.planner, self.call, self.tracker, self.prefill_s = planner, call, tracker, prefill_s
        self.prefill_cost = self.cost()
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def cost(self) -> dict:
        p = self.call.policy
        return dict(getattr(p, "total_cost", p.cost))

    def stats(self, n_decode: int, n_tokens: int) -> GenerationStats:
        call, planner, policy = self.call, self.planner, self.call.policy
        decode_s = time.perf_counter() - self.t0
        decode_cpu = time.process_time() - self.cpu0
        per_slot = planner.slot_bytes(policy)
        cost = self.cost()
        held = policy.held_bytes()
        scratch = 0 if call.scratch is None else planner.scratch_bytes(call.scratch.capacity)
        peak = max(self.tracker.peak, self.tracker.start)
        try:
            peak = max(peak, peak_rss_bytes())
        except Exception:
            pass
        return GenerationStats(
            policy=policy_label(policy),
            prompt_tokens=len(call.prompt_ids),
            new_tokens=n_tokens,
            prefill_s=self.prefill_s,
            decode_s=decode_s,
            decode_ms_per_token=1000 * decode_s / n_decode if n_decode else None,
            decode_cpu_ms_per_token=1000 * decode_cpu / n_decode if n_decode else None,
            kv_capacity_tokens=call.capacity + call.fetch,
            kv_resident_tokens=call.capacity,
            kv_fetch_tokens=call.fetch,
            kv_budget_bytes=planner.budget_bytes,
            kv_bytes_allocated=sum(c.capacity + c.fetch for c in call.caches) * per_slot + held,
            kv_bytes_peak=sum(c.peak for c in call.caches) * per_slot + scratch + held,
            prefill_mode="layer" if call.scratch is not None else "rolling",
            prefill_scratch_bytes=scratch,
            kv_tokens_peak_per_layer=max(c.peak for c in call.caches),
            kv_capacity_tokens_per_layer=[c.capacity + c.fetch for c in call.caches],
            kv_tokens_kept=[c.n for c in call.caches],
            selection_scratch_bytes_peak=call.scratch_peak,
            evictions=call.evictions,
            cost_prefill={k: self.prefill_cost.get(k, 0) for k in COST_KEYS},
            cost_per_decode_step={k: ((cost.get(k, 0) - self.prefill_cost.get(k, 0)) / n_decode if n_decode else 0.0)
                                  for k in COST_KEYS},
            skipped_layers=sorted(L for L in range(planner.n_layers) if policy.skip_layer(L)),
            peak_rss_bytes=peak,
            sections=policy.report(n_decode),
        )
