"""Stage events from the engines: spans, instants and engine-known byte counts, for a profiler to collect.

The engines call :func:`begin`/:func:`end`, :func:`span`, :func:`instant` and :func:`counter` at their natural
points (tokenize, embedding gather, each layer's load/run/release, each chunk, spill writes and reads, pruning,
prefill layers, decode steps, evictions, recalls). Without an active :class:`Sink` every call is one global
read and a return, so the hooks cost nothing measurable. A sink is process-wide rather than a context variable:
the reranker loads layers on a background thread, whose events belong to the same call.

Timestamps are :func:`time.perf_counter` seconds; a sink keeps them as recorded and the profiler turns them
into a timeline (:mod:`edge_sel.runtime.profiler`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

_SINK: "Sink | None" = None


@dataclass
class Event:
    """One record: ``kind`` "span" (``t0``..``t1``), "instant" (``t0``) or "counter" (``values`` at ``t0``)."""

    kind: str
    name: str
    t0: float
    t1: float | None = None
    thread: str = ""
    args: dict[str, Any] = field(default_factory=dict)


class Sink:
    """Collects events while installed with :func:`install` (one at a time per process)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.sessions: list[tuple[str, int]] = []  # per-op profiling: (file prefix, profiling start in epoch ns)
        self.op_prefix: str | None = None  # set to a path prefix to have onnxruntime profile every session

    def add(self, ev: Event) -> None:
        self.events.append(ev)  # list.append is atomic: safe from the layer-loader thread


def install(sink: Sink | None) -> "Sink | None":
    """Make ``sink`` the active sink (None: none); returns the previous one."""
    global _SINK
    previous, _SINK = _SINK, sink
    return previous


def active() -> bool:
    return _SINK is not None


def begin(name: str, **args) -> tuple | None:
    """Start a span; pass the returned token to :func:`end` (None when nothing listens)."""
    if _SINK is None:
        return None
    return (name, time.perf_counter(), args)


def end(token: tuple | None, **more) -> None:
    """Close a span opened by :func:`begin`; ``more`` adds arguments known only at the end."""
    sink = _SINK
    if token is None or sink is None:
        return
    name, t0, args = token
    if more:
        args = {**args, **more}
    sink.add(Event("span", name, t0, time.perf_counter(), threading.current_thread().name, args))


@contextlib.contextmanager
def _span(name: str, args: dict):
    token = begin(name, **args)
    try:
        yield
    finally:
        end(token)


_NULL = contextlib.nullcontext()


def span(name: str, **args):
    """``with span("tokenize"):`` — a span around the block (a shared no-op context when nothing listens)."""
    return _NULL if _SINK is None else _span(name, args)


def instant(name: str, **args) -> None:
    sink = _SINK
    if sink is not None:
        sink.add(Event("instant", name, time.perf_counter(), None, threading.current_thread().name, args))


def counter(name: str, values: dict | Callable[[], dict]) -> None:
    """Engine-known bytes at this moment, e.g. ``counter("engine", lambda: {"hidden_bytes": n})`` (a callable is
    evaluated only when a sink listens, so computing the value costs nothing otherwise)."""
    sink = _SINK
    if sink is not None:
        sink.add(Event("counter", name, time.perf_counter(), None, "", dict(values() if callable(values) else values)))


def op_profile_prefix() -> str | None:
    """A fresh file prefix for one session's onnxruntime per-operator profile, or None when not asked for."""
    sink = _SINK
    if sink is None or sink.op_prefix is None:
        return None
    return f"{sink.op_prefix}{len(sink.sessions)}-{time.perf_counter_ns()}"


def register_session(session, prefix: str) -> None:
    """Called by the session loader for a profiled session: the profile file's prefix and its clock origin
    (onnxruntime writes the file when the session is released)."""
    sink = _SINK
    if sink is not None:
        sink.sessions.append((prefix, session.get_profiling_start_time_ns()))
