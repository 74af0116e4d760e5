"""What one ranking call did: timings, memory, plan, layer work and pruning (``Reranker.stats``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _f(default: Any = None, *, public: bool = False, per_call: bool = False, factory=None) -> Any:
    """``public``: shown to users (``edge-sel rerank --json``); ``per_call``: set only by some calls, left out
    of :meth:`RerankStats.as_dict` while unset (None)."""
    meta = {"public": public, "per_call": per_call}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RerankStats:
    """Public fields first, in the order users see them; then the engine's own details."""

    latency_s: float | None = _f(public=True, per_call=True)
    tokenize_s: float | None = _f(public=True, per_call=True)
    embed_s: float = _f(0.0, public=True)
    layers_s: float = _f(0.0, public=True)
    head_s: float = _f(0.0, public=True)
    layer_load_wait_s: float = _f(0.0, public=True)
    peak_rss_bytes: int | None = _f(public=True, per_call=True)
    start_rss_bytes: int | None = _f(public=True, per_call=True)
    window_layers: int = _f(0, public=True)
    chunk_size: int = _f(0, public=True)           # rows of the largest chunk
    chunk_tokens: int = _f(0, public=True)
    n_chunks: int = _f(0, public=True)
    memory_budget_bytes: int | None = _f(None, public=True)
    live_per_layer: list[int] = _f(public=True, factory=list)   # documents computed by each layer
    n_layers: int = _f(0, public=True)
    n_documents: int | None = _f(public=True, per_call=True)
    n_truncated: int | None = _f(public=True, per_call=True)
    layer_loads: int = _f(0, public=True)
    pruning: str = _f("off", public=True)
    layer_work_saved: float = _f(0.0, public=True)
    token_work_saved: float = _f(0.0, public=True)
    n_pruned: int = _f(0, public=True)
    dropped_layers: list[int] = _f(public=True, factory=list)
    # execution providers (edge_sel.runtime.providers): the choice, node assignment, every session's load time since
    # the Reranker was made and this call's share (``call_session_load_s``: streamed layers load again per call)
    provider: dict = _f(public=True, factory=dict)
    shadow: dict | None = _f(public=True, per_call=True)  # shadow mode's counts and cost so far (see .shadow)
    plan_estimate: dict = _f(factory=dict)
    prefix_reuse_tokens: int = _f(0)
    spill: bool = _f(False)
    final_layer_last_token_only: bool = _f(False)
    order: str = _f("monolithic")                  # "depth-first" or "monolithic" (see .execution)
    spill_bytes_written: int | None = _f(per_call=True)
    spill_bytes_read: int | None = _f(per_call=True)
    heap_trims: int = _f(0)
    # which memory mechanisms ran (edge_sel.runtime.memory.ReleaseLog): glibc or macOS heap release, weight pages
    memory_release: dict | None = _f(per_call=True)

    def as_dict(self) -> dict[str, Any]:
        """Every field (per-call fields only when set)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.metadata["per_call"] and getattr(self, f.name) is None)}

    def public(self) -> dict[str, Any]:
        """The fields a user is shown."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata["public"] and not (f.metadata["per_call"] and getattr(self, f.name) is None)}
