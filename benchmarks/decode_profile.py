"""Where one decode step's time goes: onnxruntime's kernels, onnxruntime's own per-run work, the Python binding
(feeds in, outputs out) and the engine's Python around the sessions.

    python -m benchmarks.decode_profile BUNDLE [BUNDLE ...] --prompt-tokens 1024 --steps 32 --threads 2

Per bundle, two generate calls on the same Botchan prompt (full cache, greedy):

1. plain (``--repeats`` calls): each decode step's wall time (the engine's ``decode`` spans) and the wall time spent inside the sessions'
   ``run`` calls (the sessions wrapped in a timer), in all and by graph kind (every layer's qkv graph, attn graph, the head);
2. profiled (onnxruntime's per-operator profiler on): per step, the sum of the sessions' ``model_run`` events
   (onnxruntime's whole Run) and of their ``Node`` events (the kernels).

So per token: Python outside the session calls (step - session-call wall, from the plain call); and, from the
profiled call (slower: the profiler's own cost), the sessions' kernels, onnxruntime's per-run work around them
(``model_run`` - kernels) and the kernel time per operator type.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time

from edge_sel.runtime import trace
from edge_sel.runtime.generate import Generator


class TimedSession:
    """Forwards everything to an onnxruntime session, adding the wall time of its ``run*`` calls to ``clock``."""

    def __init__(self, session, clock: list[float]):
        self._s, self._clock = session, clock

    def __getattr__(self, name):
        attr = getattr(self._s, name)
        if not name.startswith("run"):
            return attr

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return attr(*a, **kw)
            finally:
                self._clock[0] += time.perf_counter() - t
        return timed


def _prompt(g: Generator, n: int) -> list[int]:
    from edge_sel.export.textdata import botchan

    ids = g.tokenizer.encode_prompt(botchan(), False, None)
    return ids[:n]


def _steps(sink: trace.Sink) -> list[tuple[float, float]]:
    return [(e.t0, e.t1) for e in sink.events if e.kind == "span" and e.name == "decode"]


def plain(bundle: str, n: int, steps: int, threads: int) -> dict:
    g = Generator(bundle, policy="full", threads=threads)
    clock = [0.0]
    stages = {"qkv": [0.0], "attn": [0.0], "head": [0.0]}  # the same calls' wall time by graph kind

    class Both:  # a session timed into the total and into its kind
        def __init__(self, s, kind):
            self._s = TimedSession(TimedSession(s, clock), stages[kind])

        def __getattr__(self, name):
            return getattr(self._s, name)
    m = g.model
    m.layers = [(Both(a, "qkv"), Both(b, "attn")) for a, b in m.layers]
    m.head = Both(m.head, "head")
    ids = _prompt(g, n)
    sink = trace.Sink()
    marks: list[tuple[float, ...]] = []
    prev = trace.install(sink)
    try:
        for i, _ in enumerate(g.run(ids, steps + 1, 0.0, 1.0, None, False, None, False)):
            marks.append((clock[0],) + tuple(c[0] for c in stages.values()))  # at each yield: a step's share is the difference
    finally:
        trace.install(prev)
    spans = _steps(sink)
    walls = [b - a for a, b in spans]
    per = [[marks[i + 1][j] - marks[i][j] for i in range(len(spans))] for j in range(len(stages) + 1)]
    out = {"step_ms": 1e3 * statistics.median(walls), "session_call_ms": 1e3 * statistics.median(per[0]), "steps": len(walls)}
    out.update({f"{k}_ms": 1e3 * statistics.median(per[j + 1]) for j, k in enumerate(stages)})
    return out


def profiled(bundle: str, n: int, steps: int, threads: int, prefix: str) -> dict:
    sink = trace.Sink()
    sink.op_prefix = prefix
    prev = trace.install(sink)
    try:
        g = Generator(bundle, policy="full", threads=threads)
        ids = _prompt(g, n)
        for _ in g.run(ids, steps + 1, 0.0, 1.0, None, False, None, False):
            pass
        for a, b in g.model.layers:
            a.end_profiling(), b.end_profiling()
        g.model.head.end_profiling()
    finally:
        trace.install(prev)
    epoch = time.time_ns() / 1e3 - time.perf_counter() * 1e6  # perf_counter µs -> epoch µs
    spans = [(a * 1e6 + epoch, b * 1e6 + epoch) for a, b in _steps(sink)]
    runs = [0.0] * len(spans)
    kernels = [0.0] * len(spans)
    ops: dict[str, float] = {}
    n_runs = 0
    for file_prefix, start_ns in sink.sessions:
        for path in glob.glob(file_prefix + "*.json"):
            for ev in json.load(open(path)):
                if ev.get("ph") != "X":
                    continue
                t = start_ns / 1e3 + ev["ts"]
                for i, (a, b) in enumerate(spans):
                    if a <= t <= b:
                        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
                            runs[i] += ev["dur"] / 1e3
                            n_runs += 1
                        elif ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                            kernels[i] += ev["dur"] / 1e3
                            op = ev.get("args", {}).get("op_name", "?")
                            ops[op] = ops.get(op, 0.0) + ev["dur"] / 1e3 / len(spans)
                        break
    walls = [(b - a) / 1e3 for a, b in spans]
    return {"profiled_step_ms": statistics.median(walls), "model_run_ms": statistics.median(runs),
            "kernel_ms": statistics.median(kernels), "session_runs_per_step": n_runs / max(1, len(spans)),
            "kernel_ms_by_op": {k: round(v, 3) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8]}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scratch", default="/tmp/edge_sel_decode_profile_")
    p.add_argument("--repeats", type=int, default=1, help="plain calls per bundle; the median is reported")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled call (the kernel / onnxruntime split)")
    args = p.parse_args(argv)
    for b in args.bundles:
        plains = [plain(b, args.prompt_tokens, args.steps, args.threads) for _ in range(args.repeats)]
        a = {k: statistics.median(x[k] for x in plains) for k in plains[0]}
        row = {"bundle": b, **a, "python_ms": a["step_ms"] - a["session_call_ms"]}
        if not args.no_profile:
            c = profiled(b, args.prompt_tokens, args.steps, args.threads, args.scratch + str(time.time_ns()))
            row.update(c, ort_run_overhead_ms=c["model_run_ms"] - c["kernel_ms"])
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return 0


if __name__ == "__main__":
    from edge_sel.runtime.sessions import own_process

    own_process()  # measured as the edge-sel command runs: the thread-pool rule applies
    raise SystemExit(main())
