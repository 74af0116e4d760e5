"""One-line summaries of a bundle's dropped layers and early-ranking schedule, shared by the commands."""

from __future__ import annotations


def dropped_line(spec) -> str:
    """One line on dropped layers; ``spec``: the bundle's typed manifest (or its raw JSON, parsed here)."""
    from edge_sel.runtime.manifest import Manifest

    if not isinstance(spec, Manifest):
        spec = Manifest.parse(spec)
    line = f"dropped layers (source indices): {list(spec.dropped_layers)}"
    cost = spec.drop_cost
    if cost is not None and cost.top10_overlap is not None:
        identical = cost.top10_identical if cost.top10_identical is not None else float("nan")
        line += (f" · measured on calibration text: top-10 agreement {cost.top10_overlap:.3f}, "
                 f"same top-10 set on {100 * identical:.0f}% of queries")
    return line


def schedule_line(s) -> str:
    """One line on an early-ranking schedule (typed, or the JSON a calibration report holds)."""
    from edge_sel.runtime.manifest import Agreement, ScheduleSpec

    if not isinstance(s, ScheduleSpec):
        s = ScheduleSpec.parse(s, path="schedule")
    ag = s.agreement or Agreement()
    recall = ag.topk_recall if ag.topk_recall is not None else float("nan")
    return (f"early ranking: {s.method} ({s.rule} rule) at layers {[e.layer for e in s.layers]} for top-{s.top_k} · calibration: "
            f"top-K kept {recall:.3f}, layer-work saved {100 * (ag.layer_work_saved or 0):.0f}%")
