"""The early-ranking schedule: at which layers the runtime scores the live candidates and how much it prunes there.

GRATING (EuroSys'26, "monolithic forwarding") observed that the relative order of candidates settles in
intermediate layers of a reranker. A schedule (calibrated by :mod:`edge_sel.export.passes.calibrate`, stored in
the bundle manifest) names the layers, the method that scores a layer (``probe``, ``head`` or ``cosine``, see
:mod:`.scoring`) and the rule that turns early scores into a keep-set (see :mod:`.pruning`):

* ``margin`` — per layer a margin in score units: clusters of similar score whose best member is below
  ``s_K - margin`` are dropped;
* ``rank``   — per layer a fraction of the call's candidates kept by early score. The probe's error is
  heavy-tailed in score units but not in rank, so at the same held-out safety the rank rule saves more work;
* ``spread`` — per layer a margin in units of the query's own score spread near the K-th best (per-query adaptive).

Each rule is a module of :mod:`.rules`; ``margins`` holds the per-layer parameter of ``margin`` and ``spread``,
``keep`` that of ``rank``.

A schedule calibrated for top-K protects any ``top_k <= K``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_sel.runtime.errors import BundleError, InputError

from .rules import RULES, rule_for
from .scoring import scoring_class

SCHEDULE_VERSION = 1
METHODS = ("probe", "head", "cosine")
PROBE_ARRAY = "early_probe"


@dataclass
class Schedule:
    """Where and how much to prune. ``layers[i]`` is a position in the bundle's ``layers`` list."""

    method: str
    top_k: int
    layers: list[int]
    margins: list[float]
    floor: int | None = None
    cluster_gap: float = 0.0
    safety: float = 1.0
    probe: str | None = None          # name of the probe array in the manifest's ``arrays``
    source_layers: list[int] | None = None  # ``source_index`` of each schedule layer (guards against re-exported / dropped layers)
    info: dict[str, Any] = field(default_factory=dict)
    rule: str = "margin"
    keep: list[float] | None = None    # rule "rank": fraction of the call's candidates kept at each schedule layer

    def to_manifest(self) -> dict[str, Any]:
        key = rule_for(self.rule).param_key
        layers = [{"layer": int(l), key: float(v)} for l, v in zip(self.layers, self.params)]
        return {"version": SCHEDULE_VERSION, "method": self.method, "rule": self.rule, "top_k": int(self.top_k), "layers": layers,
                "floor": self.floor, "cluster_gap": float(self.cluster_gap), "safety": float(self.safety),
                "probe": self.probe, "source_layers": self.source_layers, **self.info}

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> "Schedule":
        if not isinstance(d, dict):
            raise InputError(f"schedule must be a mapping, got {type(d).__name__}")
        try:
            rule = str(d.get("rule", "margin"))
            if rule not in RULES:
                raise InputError(f"unknown pruning rule {rule!r} in the schedule (known: {', '.join(RULES)})")
            layers = [int(e["layer"]) for e in d["layers"]]
            keep = [float(e["keep"]) for e in d["layers"]] if rule == "rank" else None
            margins = [0.0] * len(layers) if rule == "rank" else [float(e[rule_for(rule).param_key]) for e in d["layers"]]
            known = {"version", "method", "rule", "top_k", "layers", "floor", "cluster_gap", "safety", "probe", "source_layers"}
            return cls(method=str(d.get("method", "head")), top_k=int(d["top_k"]), layers=layers, margins=margins, rule=rule, keep=keep,
                       floor=None if d.get("floor") is None else int(d["floor"]), cluster_gap=float(d.get("cluster_gap", 0.0)),
                       safety=float(d.get("safety", 1.0)), probe=d.get("probe"), source_layers=d.get("source_layers"),
                       info={k: v for k, v in d.items() if k not in known})
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"malformed early-ranking schedule ({type(e).__name__}: {e}); recalibrate with `edge-sel calibrate BUNDLE`") from None

    def validate(self, bundle) -> None:
        """Refuse a schedule that does not fit ``bundle`` (layers it lacks, wrong method, missing probe)."""
        where = bundle.root
        n = len(bundle.spec.layers)
        if int(self.top_k) <= 0:
            raise InputError(f"{where}: schedule top_k must be positive, got {self.top_k}")
        if self.method not in METHODS:
            raise InputError(f"{where}: unknown early-ranking method {self.method!r} (known: {', '.join(METHODS)})")
        scoring_class(bundle).check_method(self.method, where)
        if self.rule not in RULES:
            raise InputError(f"{where}: unknown pruning rule {self.rule!r} (known: {', '.join(RULES)})")
        if self.rule == "rank":
            if self.keep is None or len(self.keep) != len(self.layers):
                raise InputError(f"{where}: a rank schedule needs one keep fraction per layer, got {self.keep!r} for layers {self.layers}")
            if any(not (np.isfinite(f) and 0 < f <= 1) for f in self.keep):
                raise InputError(f"{where}: rank schedule keep fractions must be in (0, 1], got {self.keep}")
        if len(self.layers) != len(self.margins):
            raise InputError(f"{where}: schedule has {len(self.layers)} layers but {len(self.margins)} margins")
        for l in self.layers:
            if not 0 <= l < n:
                raise InputError(f"{where}: schedule prunes at layer {l}, but the bundle has layers 0..{n - 1}; "
                                 f"recalibrate with `edge-sel calibrate {where}`")
        if sorted(set(self.layers)) != list(self.layers):
            raise InputError(f"{where}: schedule layers must be strictly increasing, got {self.layers}")
        if any(not np.isfinite(m) or m < 0 for m in self.margins):
            raise InputError(f"{where}: schedule margins must be finite and >= 0, got {self.margins}")
        if self.source_layers is not None:
            actual = [bundle.spec.layers[l].source_index for l in self.layers]
            if list(self.source_layers) != actual:
                raise InputError(f"{where}: schedule was calibrated for source layers {self.source_layers} but those positions now hold "
                                 f"{actual} (layers were dropped or re-exported); recalibrate with `edge-sel calibrate {where}`")
        if self.method == "probe":
            if not self.probe or not bundle.has_array(self.probe):
                raise InputError(f"{where}: schedule uses a probe array {self.probe!r} that the bundle does not list; recalibrate")
            shape = list(bundle.spec.arrays[self.probe].shape)
            if len(shape) != 2 or shape[0] != n:
                raise BundleError(f"{where}: probe array {self.probe!r} has shape {shape}, expected [{n}, F+1]")

    @property
    def params(self) -> list[float]:
        """The rule's per-layer parameters (keep fractions for ``rank``, margins otherwise)."""
        return list(self.keep or []) if self.rule == "rank" else list(self.margins)

    def param_at(self, layer: int) -> float:
        return self.params[self.layers.index(layer)]

    def keep_count(self, layer: int, n_candidates: int) -> int:
        """Rule ``rank``: how many of the call's ``n_candidates`` stay live after ``layer``."""
        return int(np.ceil(self.keep[self.layers.index(layer)] * n_candidates - 1e-9))

    def margin_at(self, layer: int) -> float | None:
        try:
            return self.margins[self.layers.index(layer)]
        except ValueError:
            return None
