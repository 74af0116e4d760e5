"""Profile a block of engine work: memory by kind sampled over time, plus the engines' stage events.

>>> with Profiler(budget=128 << 20) as prof:
...     Reranker(bundle, memory_budget="128MB").rank(query, docs)
>>> prof.result.peak()

A sampler thread reads the process's resident set every ``interval`` seconds (5 ms by default), split by kind:
on Linux anonymous, file-backed and shared memory from ``/proc/self/status`` (``RssAnon``/``RssFile``/
``RssShmem``: the same split as ``/proc/self/smaps_rollup``, read in ~10 us where the rollup walks every mapping
and took ~5 ms with onnxruntime loaded); elsewhere the total RSS that psutil gives. The engines' stage events and
engine-known byte counts (hidden states, KV cache) arrive through :mod:`edge_sel.runtime.trace`.

Attribution at the peak: the file-backed pages mapped since the profile began are the bundle's weights
(onnxruntime maps external weights, :mod:`edge_sel.runtime.sessions`), the engine-known bytes are hidden states
and KV cache, and the rest of the anonymous growth is activations and other heap.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil

from . import trace

KINDS = ("anon", "file", "shmem")


def _status_reader():
    """A function returning ``(rss, anon, file, shmem)`` bytes now (kinds None where the OS does not split)."""
    if sys.platform.startswith("linux"):
        try:
            fd = os.open("/proc/self/status", os.O_RDONLY)
        except OSError:
            fd = None
        if fd is not None:
            fields = re.compile(rb"RssAnon:\s+(\d+).*?RssFile:\s+(\d+).*?RssShmem:\s+(\d+)", re.S)

            def read() -> tuple:
                m = fields.search(os.pread(fd, 8192, 0))
                anon, file, shmem = int(m[1]) << 10, int(m[2]) << 10, int(m[3]) << 10
                return (anon + file + shmem, anon, file, shmem)

            read.close = lambda: os.close(fd)  # type: ignore[attr-defined]
            return read
    proc = psutil.Process()

    def read_total() -> tuple:
        return (proc.memory_info().rss, None, None, None)

    read_total.close = lambda: None  # type: ignore[attr-defined]
    return read_total


@dataclass
class Sample:
    t: float
    rss: int
    anon: int | None
    file: int | None
    shmem: int | None


@dataclass
class ProfileResult:
    """What a profile recorded: samples, events (perf_counter seconds), the budget and where per-op profiles went."""

    t_start: float
    t_end: float
    wall_start: float                 # time.time() at t_start (aligns onnxruntime's epoch timestamps)
    samples: list[Sample]
    events: list[trace.Event]
    budget: int | None = None
    op_sessions: list[tuple[str, int]] = field(default_factory=list)
    interval: float = 0.005

    @property
    def baseline(self) -> Sample:
        return self.samples[0]

    def peak(self) -> Sample:
        return max(self.samples, key=lambda s: s.rss)

    def counter_at(self, t: float, name: str = "engine") -> dict:
        """The engine-known byte counts in force at time ``t`` (each key: its last value at or before ``t``)."""
        out: dict = {}
        for e in self.events:
            if e.kind == "counter" and e.name == name and e.t0 <= t:
                out.update(e.args)
        return out

    def attribution(self, at: Sample | None = None) -> dict:
        """Memory at the peak (or ``at``) by what holds it: the baseline process, weights, engine-known bytes
        (hidden states / KV cache), other anonymous growth. ``sum_bytes`` vs ``rss_bytes`` says how well it adds up."""
        s = at or self.peak()
        b = self.baseline
        engine = {k: int(v) for k, v in self.counter_at(s.t).items()}
        known = sum(engine.values())
        out = {"t_s": s.t - self.t_start, "rss_bytes": s.rss, "baseline_bytes": b.rss, "engine": engine}
        if s.file is None:
            out.update(weights_bytes=None, other_anon_bytes=None, sum_bytes=None)
            return out
        weights = max(0, s.file - b.file)
        other = s.anon - b.anon - known
        out.update(weights_bytes=weights, other_anon_bytes=other, shmem_bytes=s.shmem - b.shmem,
                   sum_bytes=b.rss + weights + known + max(0, other) + (s.shmem - b.shmem))
        return out

    def spans(self) -> list[trace.Event]:
        return [e for e in self.events if e.kind == "span"]


class Profiler:
    """Context manager: sample memory and collect stage events over a block (one profiler at a time).

    ``ops_prefix``: a path prefix; every onnxruntime session created inside the block writes its per-operator
    profile there (onnxruntime's own profiler; the files appear when the sessions are released).
    """

    def __init__(self, interval: float = 0.005, budget: int | None = None, ops_prefix: str | None = None):
        self.interval = float(interval)
        self.budget = budget
        self.sink = trace.Sink()
        self.sink.op_prefix = ops_prefix
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous = None
        self.result: ProfileResult | None = None

    def _sample_now(self, read) -> None:
        rss, anon, file, shmem = read()
        self.samples.append(Sample(time.perf_counter(), rss, anon, file, shmem))

    def _run(self, read) -> None:
        samples, clock, pause, interval = self.samples, time.perf_counter, time.sleep, self.interval
        while not self._stop.is_set():
            pause(interval)
            rss, anon, file, shmem = read()
            samples.append(Sample(clock(), rss, anon, file, shmem))

    def __enter__(self) -> "Profiler":
        if trace.active():
            raise RuntimeError("another profiler is already active in this process")
        self._read = _status_reader()
        self.t_start, self.wall_start = time.perf_counter(), time.time()
        self._sample_now(self._read)
        self._previous = trace.install(self.sink)
        self._thread = threading.Thread(target=self._run, args=(self._read,), name="edge_sel-profiler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_now(self._read)
        trace.install(self._previous)
        self._read.close()
        self.result = ProfileResult(self.t_start, time.perf_counter(), self.wall_start, list(self.samples),
                                    list(self.sink.events), self.budget, list(self.sink.sessions), self.interval)
