"""A profile summarised: stages by time and memory, attribution at the peak, the plan's estimate vs what was
measured; rendered as a PNG (matplotlib), a self-contained HTML page and a terminal table (rich)."""

from __future__ import annotations

import base64
import bisect
import html
import os
from collections import defaultdict
from pathlib import Path

from edge_sel.runtime.profiler import ProfileResult
from edge_sel.runtime.units import format_size

MiB = 1024 * 1024
# spans drawn as bands under the memory plot (the rest, e.g. spill reads, would only add noise)
BAND_COLORS = {"tokenize": "#bbbbbb", "embed": "#f4a261", "layer": "#8ecae6", "head": "#e76f51",
               "prefill.layer": "#90be6d", "decode": "#cdb4db", "chunk": "#577590", "layer.load": "#f94144",
               "weights.map": "#f94144"}
BAND_ROWS = {"chunk": 1, "layer.load": 2, "weights.map": 2}  # nested spans get their own row of bands above the stage row


def _label(e) -> str:
    detail = ", ".join(f"{k}={v}" for k, v in e.args.items() if k in ("layer", "step"))
    return f"{e.name} ({detail})" if detail else e.name


def stage_rows(prof: ProfileResult) -> list[dict]:
    """One row per span: time, RSS at its start, peak RSS inside it and the growth."""
    ts = [s.t for s in prof.samples]
    rows = []
    for e in prof.spans():
        i0 = max(0, bisect.bisect_right(ts, e.t0) - 1)
        i1 = bisect.bisect_right(ts, e.t1)
        inside = prof.samples[i0:max(i1, i0 + 1)]
        start = prof.samples[i0].rss
        peak = max(s.rss for s in inside)
        rows.append({"stage": _label(e), "name": e.name, "t0_s": e.t0 - prof.t_start, "dur_s": e.t1 - e.t0,
                     "rss_start": start, "rss_peak": peak, "growth": peak - start, "thread": e.thread})
    return rows


def stage_totals(rows: list[dict]) -> list[dict]:
    agg: dict[str, dict] = defaultdict(lambda: {"count": 0, "total_s": 0.0, "max_growth": 0, "max_peak": 0})
    for r in rows:
        a = agg[r["name"]]
        a["count"] += 1
        a["total_s"] += r["dur_s"]
        a["max_growth"] = max(a["max_growth"], r["growth"])
        a["max_peak"] = max(a["max_peak"], r["rss_peak"])
    return sorted(({"stage": k, **v} for k, v in agg.items()), key=lambda r: -r["total_s"])


def measured_components(prof: ProfileResult) -> dict:
    """What the process held, by the plan's components: weights (file-backed growth), hidden states / KV cache
    (engine-known), activations and other heap (the rest of the anonymous growth), all at their maxima; and
    the total (peak RSS minus the RSS when the profile began)."""
    att = prof.attribution()
    out = {"total": att["rss_bytes"] - att["baseline_bytes"]}
    engine_max: dict = defaultdict(int)
    for e in prof.events:
        if e.kind == "counter":
            for k, v in e.args.items():
                engine_max[k.replace("_bytes", "")] = max(engine_max[k.replace("_bytes", "")], int(v))
    out.update(engine_max)
    if att.get("weights_bytes") is not None:
        base = prof.baseline
        out["weights"] = max(s.file - base.file for s in prof.samples)
        out["activations_at_peak"] = max(0, att["other_anon_bytes"])
    return out


def summarize(prof: ProfileResult, command: dict, stats: dict, estimate: dict | None) -> dict:
    rows = stage_rows(prof)
    peak = prof.peak()
    measured = measured_components(prof)
    plan_rows = []
    for k, v in (estimate or {}).items():
        m = measured.get(k)
        plan_rows.append({"component": k, "estimate_bytes": v, "measured_bytes": m,
                          "error": (m - v) / v if m is not None and v else None})
    by_mem = sorted(rows, key=lambda r: -r["rss_peak"])[:10]
    return {
        "command": command, "duration_s": prof.t_end - prof.t_start, "samples": len(prof.samples),
        "interval_ms": 1000 * prof.interval, "baseline_rss_bytes": prof.baseline.rss, "peak_rss_bytes": peak.rss,
        "peak_t_s": peak.t - prof.t_start, "budget_bytes": prof.budget, "attribution": prof.attribution(),
        "measured": measured, "plan": plan_rows, "stages": stage_totals(rows),
        "top_by_time": sorted(rows, key=lambda r: -r["dur_s"])[:10], "top_by_memory": by_mem, "stats": stats,
    }


def plot_png(prof: ProfileResult, path: str | os.PathLike, title: str = "") -> Path | None:
    """The memory plot; None when matplotlib is not installed (``pip install edge-sel[profile]``)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t - prof.t_start for s in prof.samples]
    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    if prof.samples[0].anon is not None:
        ax.stackplot(t, [[s.anon / MiB for s in prof.samples], [s.file / MiB for s in prof.samples],
                         [s.shmem / MiB for s in prof.samples]],
                     labels=["anonymous", "file-backed (weights, code)", "shared"],
                     colors=["#2a9d8f", "#e9c46a", "#adb5bd"], alpha=0.85)
    ax.plot(t, [s.rss / MiB for s in prof.samples], color="black", lw=1, label="RSS")
    top = max(s.rss for s in prof.samples) / MiB
    if prof.budget is not None:
        line = (prof.baseline.rss + prof.budget) / MiB
        ax.axhline(line, color="#d62828", ls="--", lw=1.2, label=f"baseline + budget ({format_size(prof.budget)})")
        top = max(top, line)
    seen = set()
    for e in prof.spans():
        if e.name not in BAND_COLORS:
            continue
        lab = e.name if e.name not in seen else None
        seen.add(e.name)
        alt = (e.args.get("layer", 0) or 0) % 2
        row = BAND_ROWS.get(e.name, 0)
        ax.axvspan(e.t0 - prof.t_start, e.t1 - prof.t_start, ymin=0.035 * row, ymax=0.035 * (row + 1) - 0.005,
                   color=BAND_COLORS[e.name], alpha=0.55 if alt else 1.0, lw=0, label=lab)
    peak = prof.peak()
    ax.plot([peak.t - prof.t_start], [peak.rss / MiB], "v", color="#d62828", ms=9)
    ax.annotate(f"peak {format_size(peak.rss)}", (peak.t - prof.t_start, peak.rss / MiB), textcoords="offset points",
                xytext=(6, 8), fontsize=9)
    ax.set_ylim(0, top * 1.12)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(title or "memory over time")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _size(v) -> str:
    return "" if v is None else format_size(int(v))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(summary: dict, png: Path | None, path: str | os.PathLike) -> Path:
    img = base64.b64encode(Path(png).read_bytes()).decode() if png is not None else None
    att = summary["attribution"]
    cmd = " ".join(summary["command"].get("argv", []))
    overview = [["command", cmd], ["duration", f"{summary['duration_s']:.3f} s"],
                ["samples", f"{summary['samples']} every {summary['interval_ms']:.1f} ms"],
                ["baseline RSS", _size(summary["baseline_rss_bytes"])], ["peak RSS", _size(summary["peak_rss_bytes"])],
                ["peak at", f"{summary['peak_t_s']:.3f} s"], ["budget", _size(summary["budget_bytes"]) or "none"]]
    attr = [["baseline (interpreter, libraries)", _size(att["baseline_bytes"])],
            ["weights (file-backed growth)", _size(att.get("weights_bytes"))]]
    attr += [[f"{k} (engine-known)", _size(v)] for k, v in att["engine"].items()]
    attr += [["other anonymous (activations, heap)", _size(att.get("other_anon_bytes"))],
             ["sum", _size(att.get("sum_bytes"))], ["sampled RSS", _size(att["rss_bytes"])]]
    plan = [[r["component"], _size(r["estimate_bytes"]), _size(r["measured_bytes"]),
             "" if r["error"] is None else f"{100 * r['error']:+.0f}%"] for r in summary["plan"]]
    stages = [[r["stage"], r["count"], f"{1000 * r['total_s']:.1f}", _size(r["max_growth"]), _size(r["max_peak"])]
              for r in summary["stages"]]
    by_time = [[r["stage"], f"{1000 * r['dur_s']:.1f}", _size(r["rss_peak"])] for r in summary["top_by_time"]]
    by_mem = [[r["stage"], _size(r["rss_peak"]), _size(r["growth"]), f"{1000 * r['dur_s']:.1f}"] for r in summary["top_by_memory"]]
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>edge-sel profile</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}}table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}}th{{background:#f1f1f1}}img{{max-width:100%}}
h2{{margin-top:28px}}</style></head><body>
<h1>edge-sel profile</h1>
{_table(["", ""], overview)}
{f'<img alt="memory over time" src="data:image/png;base64,{img}">' if img else
 "<p>(no plot: matplotlib is not installed; pip install edge-sel[profile])</p>"}
<h2>Memory at the peak, by what holds it</h2>{_table(["part", "bytes"], attr)}
<h2>Plan estimate vs measured</h2>{_table(["component", "estimate", "measured", "error"], plan) if plan else "<p>no estimate</p>"}
<h2>Stages</h2>{_table(["stage", "count", "total ms", "max growth", "max peak RSS"], stages)}
<h2>Top stages by time</h2>{_table(["stage", "ms", "peak RSS"], by_time)}
<h2>Top stages by memory</h2>{_table(["stage", "peak RSS", "growth", "ms"], by_mem)}
</body></html>"""
    path = Path(path)
    path.write_text(doc, encoding="utf-8")
    return path


def print_summary(summary: dict, console, files: dict) -> None:
    from rich.table import Table

    att = summary["attribution"]
    console.print(f"[bold]profile[/] {summary['duration_s']:.3f} s · peak RSS {_size(summary['peak_rss_bytes'])} at "
                  f"{summary['peak_t_s']:.3f} s · baseline {_size(summary['baseline_rss_bytes'])}"
                  + (f" · budget {_size(summary['budget_bytes'])}" if summary["budget_bytes"] else ""))
    if att.get("weights_bytes") is not None:
        parts = [f"weights {_size(att['weights_bytes'])}"] + [f"{k} {_size(v)}" for k, v in att["engine"].items()]
        console.print("at the peak: " + " · ".join(parts) + f" · other anonymous {_size(att['other_anon_bytes'])}")
    t = Table(title="stages")
    for col in ("stage", "count", "total ms", "max growth", "max peak RSS"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for r in summary["stages"]:
        t.add_row(r["stage"], str(r["count"]), f"{1000 * r['total_s']:.1f}", _size(r["max_growth"]), _size(r["max_peak"]))
    console.print(t)
    if summary["plan"]:
        p = Table(title="plan estimate vs measured")
        for col in ("component", "estimate", "measured", "error"):
            p.add_column(col)
        for r in summary["plan"]:
            p.add_row(r["component"], _size(r["estimate_bytes"]), _size(r["measured_bytes"]),
                      "" if r["error"] is None else f"{100 * r['error']:+.0f}%")
        console.print(p)
    for k, v in files.items():
        console.print(f"{k}: {v}")
