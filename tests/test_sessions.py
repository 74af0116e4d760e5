"""Session options of the onnxruntime backend: per-session pools that never spin by default; EDGE_SEL_SHARED_THREADS
runs every session of the process on one process-wide pool (set when the module is imported, so tried in a child)."""

from __future__ import annotations

import os
import subprocess
import sys

from edge_sel.runtime.sessions import SHARED_THREADS_ENV, session_options

CHILD = r"""
import numpy as np
from onnx import TensorProto, helper
from edge_sel.runtime import sessions
g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                      [helper.make_tensor_value_info(n, TensorProto.FLOAT, [256, 256]) for n in "ab"],
                      [helper.make_tensor_value_info("c", TensorProto.FLOAT, [256, 256])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
import onnxruntime as ort
so = sessions.session_options(2)
s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
c = s.run(None, {"a": a, "b": a})[0]
assert np.allclose(c, a @ a, atol=1e-3)
print(sessions.SHARED_THREADS, so.use_per_session_threads)
"""


def test_per_session_pools_by_default(monkeypatch):
    monkeypatch.delenv(SHARED_THREADS_ENV, raising=False)
    so = session_options(2)
    assert so.use_per_session_threads and so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_shared_pool_runs_every_session():
    for value, want in (("2", "2 False"), ("", "0 True"), ("two", "0 True")):
        env = {**os.environ, SHARED_THREADS_ENV: value}
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-2:] == want.split(), (value, out.stdout)
