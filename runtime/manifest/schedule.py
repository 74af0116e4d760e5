"""Early-ranking pruning: the calibrated schedule, how it did on its calibration data, and what dropped layers cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .node import Node, Reader as _Reader, freeze, json_field as _json


SCHEDULE_METHODS = ("probe", "head", "cosine")
SCHEDULE_RULES = ("margin", "rank", "spread")


@dataclass(frozen=True, kw_only=True)
class ScheduleLayer(Node):
    layer: int
    margin: float | None = None
    keep: float | None = None
    spread: float | None = None     # rule "spread": margin in units of the query's score spread near the K-th best

    @classmethod
    def read(cls, r: _Reader, v, p: str, rule: str) -> "ScheduleLayer":
        """One entry of a schedule with rule ``rule``: ``keep`` (rank), ``spread`` or ``margin``."""
        e = r.obj(v, p)
        if rule == "rank":
            keep = r.float(e.get("keep"), f"{p}.keep", positive=True)
            if keep > 1:
                r.fail(f"{p}.keep", f"expected a fraction in (0, 1], got {keep}")
            return cls(layer=r.int(e.get("layer"), f"{p}.layer", lo=0), keep=keep, **cls._base(e))
        key = "spread" if rule == "spread" else "margin"
        margin = r.float(e.get(key), f"{p}.{key}")
        if margin < 0:
            r.fail(f"{p}.{key}", f"expected a number >= 0, got {margin}")
        return cls(layer=r.int(e.get("layer"), f"{p}.layer", lo=0), **{key: margin}, **cls._base(e))


@dataclass(frozen=True, kw_only=True)
class Agreement(Node):
    """How a calibrated schedule did on its calibration data (simulated)."""

    layer_work_saved: float | None = _json("fraction", None)
    topk_recall: float | None = _json("fraction", None)
    topk_identical: float | None = _json("fraction", None)


def _free(r: _Reader, d: dict, key: str, p: str):
    """:meth:`_Reader.free`; null when absent."""
    return None if d.get(key) is None else r.free(d[key], f"{p}.{key}" if p else key)


@dataclass(frozen=True, kw_only=True)
class DropCost(Node):
    """What dropping layers cost, measured on calibration text against the full bundle."""

    top10_overlap: float | None = _json("fraction", None)
    top10_identical: float | None = _json("fraction", None)
    threshold: float | None = _json("float", None)
    requested: int | str | None = None            # a number of layers or "auto"
    block_influence: Mapping[str, float] | None = _json("free", None)   # source index -> influence of the dropped block
    calibration: Mapping[str, Any] | None = _json("free", None)

    @classmethod
    def _read_first(cls, r, d, p):
        req = d.get("requested")
        if req is not None and req != "auto":
            r.int(req, f"{p}.requested", lo=0)
        return {"requested": req}


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec(Node):
    """Early-ranking pruning schedule written by calibration; ``layers[i].layer`` is a position in ``layers``."""

    method: str
    top_k: int
    layers: tuple[ScheduleLayer, ...]
    version: int = 1
    rule: str = "margin"
    floor: int | None = None
    cluster_gap: float = 0.0
    safety: float = 1.0
    probe: str | None = None
    source_layers: tuple[int, ...] | None = None
    calibration: Mapping[str, Any] | None = None     # what it was calibrated on (data, queries, candidates, seed, seconds)
    agreement: Agreement | None = None
    per_layer: tuple[Mapping[str, Any], ...] | None = None  # per layer: spearman / top-k overlap with the final scores
    shadow: Mapping[str, Any] | None = None          # shadow mode's counts when it last tightened this schedule

    @classmethod
    def read(cls, r: _Reader, v, p: str) -> "ScheduleSpec":
        d = r.obj(v, p)
        rule = r.str(d.get("rule", "margin"), f"{p}.rule", choices=SCHEDULE_RULES)

        src = d.get("source_layers")
        return cls(method=r.str(d.get("method", "head"), f"{p}.method", choices=SCHEDULE_METHODS),
                   top_k=r.int(d.get("top_k"), f"{p}.top_k", lo=1),
                   layers=r.list(d.get("layers"), f"{p}.layers", lambda x, q: ScheduleLayer.read(r, x, q, rule)),
                   version=r.int(d.get("version", 1), f"{p}.version", lo=1), rule=rule,
                   floor=r.int(d.get("floor"), f"{p}.floor", lo=0, optional=True),
                   cluster_gap=r.float(d.get("cluster_gap", 0.0), f"{p}.cluster_gap"),
                   safety=r.float(d.get("safety", 1.0), f"{p}.safety", positive=True),
                   probe=r.str(d.get("probe"), f"{p}.probe", optional=True),
                   source_layers=None if src is None else r.list(src, f"{p}.source_layers", lambda x, q: r.int(x, q, lo=0)),
                   calibration=_free(r, d, "calibration", p), shadow=_free(r, d, "shadow", p),
                   agreement=None if d.get("agreement") is None else Agreement.read(r, d["agreement"], f"{p}.agreement"),
                   per_layer=None if d.get("per_layer") is None else r.list(d["per_layer"], f"{p}.per_layer",
                                                                          lambda x, q: freeze(r.obj(x, q))),
                   **cls._base(d))
