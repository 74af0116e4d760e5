"""A profile as a Chrome / Perfetto trace-event JSON file (opens in ui.perfetto.dev and chrome://tracing).

The trace-event format (Chrome's "Trace Event Format" document): complete events (``ph: "X"``) for the engine's
stage spans, instant events (``"i"``) for plans, pruning and evictions, counter events (``"C"``) for RSS by kind,
the engine-known bytes and the budget, and metadata (``"M"``) naming the tracks. With onnxruntime's per-operator
profiles, each session's operator events are moved onto the same clock (onnxruntime stamps them in microseconds
from the session's profiling start, an epoch time in nanoseconds) and shown on a track of their own.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from edge_sel.runtime.profiler import ProfileResult

PID = 1
OPS_PID = 2


def _us(prof: ProfileResult, t: float) -> float:
    return round((t - prof.t_start) * 1e6, 3)


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    try:
        return v.item()  # numpy scalars
    except AttributeError:
        return str(v)


def trace_events(prof: ProfileResult, ops: bool = False) -> list[dict]:
    threads: dict[str, int] = {"MainThread": 1, "": 1}
    out: list[dict] = [{"ph": "M", "pid": PID, "name": "process_name", "args": {"name": "edge_sel"}}]

    def tid(name: str) -> int:
        if name not in threads:
            threads[name] = len(set(threads.values())) + 1
        return threads[name]

    for e in prof.events:
        args = _jsonable(e.args)
        if e.kind == "span":
            out.append({"ph": "X", "pid": PID, "tid": tid(e.thread), "name": e.name, "cat": e.name.split(".")[0],
                        "ts": _us(prof, e.t0), "dur": round((e.t1 - e.t0) * 1e6, 3), "args": args})
        elif e.kind == "instant":
            out.append({"ph": "i", "s": "t", "pid": PID, "tid": tid(e.thread), "name": e.name, "cat": e.name.split(".")[0],
                        "ts": _us(prof, e.t0), "args": args})
        elif e.kind == "counter":
            out.append({"ph": "C", "pid": PID, "name": "engine-known bytes", "ts": _us(prof, e.t0),
                        "args": {k: int(v) for k, v in args.items()}})
    base = prof.baseline
    for s in prof.samples:
        ts = _us(prof, s.t)
        if s.anon is not None:
            out.append({"ph": "C", "pid": PID, "name": "RSS by kind (bytes)", "ts": ts,
                        "args": {"anonymous": s.anon, "file-backed": s.file, "shared": s.shmem}})
        out.append({"ph": "C", "pid": PID, "name": "RSS (bytes)", "ts": ts, "args": {"rss": s.rss}})
    if prof.budget is not None:
        for t in (prof.t_start, prof.t_end):
            out.append({"ph": "C", "pid": PID, "name": "budget line (bytes)", "ts": _us(prof, t),
                        "args": {"baseline + budget": base.rss + prof.budget}})
    for name, n in threads.items():
        if name:
            out.append({"ph": "M", "pid": PID, "tid": n, "name": "thread_name", "args": {"name": name}})
    if ops:
        out += op_events(prof)
    return out


def op_events(prof: ProfileResult) -> list[dict]:
    """onnxruntime's per-operator events of every profiled session, on this profile's clock."""
    out = [{"ph": "M", "pid": OPS_PID, "name": "process_name", "args": {"name": "onnxruntime operators"}}]
    for n, (prefix, start_ns) in enumerate(prof.op_sessions, start=1):
        files = sorted(glob.glob(glob.escape(prefix) + "*.json"))
        if not files:
            continue
        try:
            events = json.loads(Path(files[0]).read_text())
        except (OSError, ValueError):
            continue
        offset = start_ns / 1000 - prof.wall_start * 1e6
        graph = None
        for ev in events:
            if ev.get("ph") != "X":
                continue
            if ev.get("name") == "model_loading_uri" and graph is None:
                graph = ev.get("args", {}).get("model_path")
            args = ev.get("args", {})
            out.append({"ph": "X", "pid": OPS_PID, "tid": n, "cat": ev.get("cat", "ort"),
                        "name": args.get("op_name") or ev.get("name", "?"), "ts": round(ev["ts"] + offset, 3),
                        "dur": ev.get("dur", 0), "args": {"node": ev.get("name"), **{k: args[k] for k in
                                                          ("output_size", "parameter_size") if k in args}}})
        out.append({"ph": "M", "pid": OPS_PID, "tid": n, "name": "thread_name",
                    "args": {"name": f"session {n}: {os.path.basename(files[0])}"}})
    return out


def write_trace(prof: ProfileResult, path: str | os.PathLike, ops: bool = False, meta: dict | None = None) -> Path:
    doc = {"traceEvents": trace_events(prof, ops), "displayTimeUnit": "ms", "otherData": _jsonable(meta or {})}
    path = Path(path)
    path.write_text(json.dumps(doc))
    return path
