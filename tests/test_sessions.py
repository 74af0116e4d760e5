"""Session options of the onnxruntime backend: per-session pools that never spin, or one process-wide spinning pool
(EDGE_SEL_SHARED_THREADS: auto from the first generate-engine session on when the cores are free, 0 off, N forced). The pool is
decided once per process, so each case runs in a child."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from edge_sel.runtime.sessions import SHARED_THREADS_ENV, free_cores

CHILD = r"""
import sys
import numpy as np
from onnx import TensorProto, helper
from edge_sel.runtime import sessions
if sys.argv[1] != "measured":  # the auto rule given this many free cores
    sessions.free_cores = lambda sample_s=0: float(sys.argv[1])
if sys.argv[2] == "owned":  # as the edge-sel command and the benchmark workers declare
    sessions.own_process()
g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                      [helper.make_tensor_value_info(n, TensorProto.FLOAT, [256, 256]) for n in "ab"],
                      [helper.make_tensor_value_info("c", TensorProto.FLOAT, [256, 256])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
import onnxruntime as ort
def opened(so):  # each session opened right after its options, as load_session does
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    assert np.allclose(s.run(None, {"a": a, "b": a})[0], a @ a, atol=1e-3)
    return so
rerank = opened(sessions.session_options(2))  # a session of large ops (the rerank engine's)
decode = opened(sessions.session_options(2, small_ops=True))
other = opened(sessions.session_options(1))  # opened after the decision
print(rerank.intra_op_num_threads, rerank.get_session_config_entry("session.intra_op.allow_spinning"))
print(sessions.shared_pool_threads(2, small_ops=True), rerank.use_per_session_threads, decode.use_per_session_threads,
      other.use_per_session_threads)
"""


def child(value: str | None, free: str = "measured", owned: bool = True) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != SHARED_THREADS_ENV}
    if value is not None:
        env[SHARED_THREADS_ENV] = value
    out = subprocess.run([sys.executable, "-c", CHILD, free, "owned" if owned else "library"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-6:]


def test_forced_values():
    # N: every session on the shared pool; 0 or an unreadable value: every session on its own pool
    assert child("2")[2:] == ["2", "False", "False", "False"]
    assert child("0", free="2")[2:] == ["0", "True", "True", "True"]
    assert child("two", free="2")[2:] == ["0", "True", "True", "True"]


def test_auto_uses_the_shared_pool_only_for_small_op_sessions_when_the_cores_are_free():
    # a large-op session opened before keeps its own pool; once the shared pool exists every later session runs on it
    # (a pool of its own: the thread count asked for, never spinning)
    assert child(None, free="2") == ["2", "0", "2", "True", "False", "False"]
    assert child("auto", free="1.9")[2:] == ["2", "True", "False", "False"]
    assert child(None, free="1.2")[2:] == ["0", "True", "True", "True"]  # a core busy at our priority: no spinning


def test_a_library_process_keeps_per_session_pools_unless_asked():
    # inside someone else's program the shared pool would make onnxruntime refuse that program's own sessions
    assert child(None, free="2", owned=False)[2:] == ["0", "True", "True", "True"]
    assert child("auto", free="2", owned=False)[2:] == ["2", "True", "False", "False"]


def test_free_cores_is_a_share_of_the_machine():
    f = free_cores(0.05)
    assert 0.0 <= f <= (psutil.cpu_count() or 1) + 1e-9


def test_the_edge_sel_command_owns_its_process():
    # the console entry declares the process its own, so an unset variable means auto there
    code = ("import os, sys; from edge_sel import cli; from edge_sel.runtime import sessions\n"
            "sessions.free_cores = lambda sample_s=0: 2.0\n"
            "cli.main = lambda argv=None: 0\n"
            "assert cli.console_main() == 0\n"
            "print(sessions.shared_pool_threads(2, small_ops=True))")
    env = {k: v for k, v in os.environ.items() if k != SHARED_THREADS_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "2"
