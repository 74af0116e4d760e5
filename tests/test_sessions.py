"""Session options of the onnxruntime backend: spinning off by default, EDGE_SEL_SPIN=1 spins only within a run."""

from __future__ import annotations

import numpy as np

from edge_sel.runtime.sessions import SPIN_ENV, session_options


def test_spinning_is_off_by_default(monkeypatch):
    monkeypatch.delenv(SPIN_ENV, raising=False)
    so = session_options(2)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_spin_env_spins_within_a_run_only(monkeypatch, tmp_path):
    """With EDGE_SEL_SPIN=1 a pool may spin, but stops when its run returns (the next session's pool does not compete
    with it); the sessions compute the same thing."""
    from onnx import TensorProto, helper

    from edge_sel.runtime.sessions import load_session

    monkeypatch.setenv(SPIN_ENV, "1")
    so = session_options(2)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 64]) for n in "ab"],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [64, 64])])
    path = tmp_path / "mm.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    r = np.random.default_rng(0)
    a, b = r.standard_normal((2, 64, 64), dtype=np.float32)
    spun = load_session(path, threads=2).run(None, {"a": a, "b": b})[0]
    monkeypatch.setenv(SPIN_ENV, "0")
    plain = load_session(path, threads=2).run(None, {"a": a, "b": b})[0]
    np.testing.assert_allclose(spun, plain, rtol=1e-5, atol=1e-5)
