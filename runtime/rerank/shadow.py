"""Shadow mode: a safety net for early ranking on the user's own text.

With ``Reranker(bundle, shadow=0.05)`` about one pruned ``rank()`` call in twenty is run again unpruned once its
pruned answer is computed (in the same call; the extra time is reported, never mixed into the call's latency). The
unpruned run also scores every candidate at the schedule's layers, so when the pruned top-K differs from the full
model's (a *miss*) the schedule is tightened exactly enough for that query: each layer's parameter is raised to
``safety x`` the rule's need on it (:mod:`.rules`), again until replaying the schedule on the recorded scores keeps
the full top-K. A schedule that came from the bundle is then stored back into it through the atomic bundle writer
(staged beside it, hashed, renamed into place, verified on open): a bundle becomes safe on the distribution it
actually serves without a separate calibration run. Counts and cost are in ``last_stats["shadow"]``; the stored
schedule's ``shadow`` entry (shown by ``edge-sel info``) keeps the counts as of the last tightening.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_sel.runtime.bundle import MANIFEST, Bundle
from edge_sel.runtime.bundle_writer import BundleWriter
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.manifest import editable

from .pruning import replay
from .rules import rule_for
from .schedule import Schedule

log = logging.getLogger("edge_sel")

TIGHTEN_SAFETY = 1.25   # a missed layer's parameter becomes this x the need the miss showed
MAX_ROUNDS = 8          # replay rounds before the schedule's pruning layers are given up for this query


def check_fraction(shadow) -> float:
    """``shadow`` as a fraction in [0, 1] (InputError otherwise)."""
    if isinstance(shadow, bool) or not isinstance(shadow, (int, float)) or not (0.0 <= float(shadow) <= 1.0):
        raise InputError(f"shadow must be a fraction of calls in [0, 1], got {shadow!r}")
    return float(shadow)


class LayerScoreRecorder:
    """An observer for :meth:`Reranker.trace`: every candidate's early score at the schedule's layers."""

    def __init__(self, schedule: Schedule, scorer, query_item: bool, n_docs: int):
        self.layers = set(schedule.layers)
        self.scorer, self.query_item, self.n_docs = scorer, query_item, n_docs
        self.pooled: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.query: dict[int, np.ndarray] = {}

    def __call__(self, obs) -> None:
        if obs.layer not in self.layers:
            return
        docs = obs.items < self.n_docs
        if not docs.all():
            self.query[obs.layer] = obs.pooled[~docs][0]
        self.pooled.setdefault(obs.layer, []).append((obs.items[docs], obs.pooled[docs]))

    def scores(self) -> dict[int, np.ndarray]:
        out = {}
        for layer, parts in self.pooled.items():
            s = np.zeros(self.n_docs)
            for items, pooled in parts:
                s[items] = self.scorer(layer, pooled, self.query.get(layer))
            out[layer] = s
        return out


def tightened(schedule: Schedule, layer_scores: dict[int, np.ndarray], full: np.ndarray, last_layer: int,
              safety: float = TIGHTEN_SAFETY) -> Schedule:
    """``schedule`` with each layer's parameter raised until replaying it on ``layer_scores`` keeps the top-K of
    the full scores ``full``; the layers are dropped when that never happens within :data:`MAX_ROUNDS`."""
    k = min(int(schedule.top_k), len(full))
    rule = rule_for(schedule.rule)
    top = np.argsort(-full, kind="stable")[:k]
    params = [max(p, rule.param(rule.need(np.asarray(layer_scores[l]), top, k), safety))
              for l, p in zip(schedule.layers, schedule.params)]
    for _ in range(MAX_ROUNDS):
        live, _ = replay(schedule.rule, layer_scores, schedule.layers, params, k, len(full), schedule.floor,
                         schedule.cluster_gap, last_layer)
        if set(top) <= set(live):
            return _with_params(schedule, schedule.layers, params)
        params = [rule.param(p, safety) if p > 0 else 1e-3 for p in params]
    return _with_params(schedule, [], [])


def _with_params(schedule: Schedule, layers: list[int], params: list[float]) -> Schedule:
    src = schedule.source_layers
    keep_src = [src[schedule.layers.index(l)] for l in layers] if src is not None else None
    return Schedule(method=schedule.method, top_k=schedule.top_k, layers=list(layers),
                    margins=[0.0] * len(layers) if schedule.rule == "rank" else list(params),
                    keep=list(params) if schedule.rule == "rank" else None, rule=schedule.rule, floor=schedule.floor,
                    cluster_gap=schedule.cluster_gap, safety=schedule.safety, probe=schedule.probe,
                    source_layers=keep_src, info=dict(schedule.info))


def store_schedule(bundle: Bundle, schedule: Schedule) -> Bundle:
    """Rewrite ``bundle`` with ``schedule`` through the atomic writer (every other file hard-linked unchanged) and
    return it reopened and verified."""
    raw = editable(json.loads((bundle.root / MANIFEST).read_text(encoding="utf-8")))
    with BundleWriter(bundle.root, overwrite=True) as w:
        w.link_from(bundle, bundle.spec.files)
        w.commit({**raw, "schedule": schedule.to_manifest()})
    return Bundle.open(bundle.root, verify=True)


@dataclass
class ShadowStats:
    """Shadow runs of one :class:`Reranker` so far."""

    fraction: float
    calls: int = 0                # pruned rank() calls seen
    runs: int = 0                 # of which were also run unpruned
    misses: int = 0               # runs whose pruned top-K set differed from the full model's
    seconds: float = 0.0          # time spent in shadow runs
    tightenings: int = 0
    stored: int = 0               # tightened schedules written into the bundle
    pruned_seconds: float = 0.0   # time of the pruned calls (the shadow cost is relative to it)
    last: dict[str, Any] = field(default_factory=dict)  # the last call: ran, matched, seconds

    def as_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "calls": self.calls, "runs": self.runs, "misses": self.misses,
                "miss_rate": self.misses / self.runs if self.runs else None, "seconds": round(self.seconds, 4),
                "cost": round(self.seconds / self.pruned_seconds, 4) if self.pruned_seconds else None, "tightenings": self.tightenings, "stored": self.stored, "last": dict(self.last)}


class Shadow:
    """Decides which calls run in shadow, compares, tightens and stores (see the module docstring)."""

    def __init__(self, fraction: float, seed: int | None = None, persist: bool = True):
        self.stats = ShadowStats(check_fraction(fraction))
        self.rng = np.random.default_rng(seed)
        self.persist = persist

    def due(self, pruned_seconds: float) -> bool:
        """Count a pruned call that took ``pruned_seconds``; whether it runs in shadow."""
        self.stats.calls += 1
        self.stats.pruned_seconds += pruned_seconds
        return bool(self.rng.random() < self.stats.fraction)

    def run(self, rr, query: str, documents: list[str], instruction: str | None, returned: list[int], top_k: int) -> Schedule | None:
        """Run the call unpruned, compare with ``returned`` (the pruned top ids); the tightened schedule on a miss."""
        st = self.stats
        sched = rr.schedule
        rec = LayerScoreRecorder(sched, rr.layer_scorer, rr.scoring.query_item, len(documents))
        t = time.perf_counter()
        full = rr.trace(query, documents, rec, instruction=instruction)
        spent = time.perf_counter() - t
        st.runs += 1
        st.seconds += spent
        k = min(top_k, len(documents))
        matched = set(returned[:k]) == set(np.argsort(-full, kind="stable")[:k].tolist())
        st.last = {"ran": True, "matched": matched, "seconds": round(spent, 4)}
        if matched:
            return None
        st.misses += 1
        new = tightened(sched, rec.scores(), full, len(rr.bundle.spec.layers) - 1)
        st.tightenings += 1
        new.info["shadow"] = {"runs": st.runs, "misses": st.misses, "tightenings": st.tightenings}
        log.warning("shadow run: the pruned top-%d differed from the full model's; schedule tightened to %s %s",
                    k, new.layers, [round(p, 4) for p in new.params])
        return new

    def store(self, bundle: Bundle, schedule: Schedule) -> Bundle | None:
        """Store ``schedule`` in ``bundle`` (when persisting); the reopened bundle, or None when it was not stored."""
        if not self.persist:
            return None
        try:
            out = store_schedule(bundle, schedule)
        except OSError as e:  # a read-only bundle still gets the tightened schedule in memory
            log.warning("shadow mode could not store the tightened schedule in %s (%s); using it in memory only", bundle.root, e)
            return None
        self.stats.stored += 1
        return out
