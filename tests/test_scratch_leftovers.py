"""Temporary folders of a killed call (spilled hidden states, the recall cold store) are removed by the next call
that makes one in the same place; a living process's folder is never touched."""

import os
import signal
import subprocess
import sys
import time

from edge_sel.runtime.scratch import owned_tempdir, sweep_dead


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sweep_removes_dead_owners_folders_only(tmp_path):
    dead = tmp_path / f"edge_sel-hidden-{_dead_pid()}-abc"
    alive = tmp_path / f"edge_sel-hidden-{os.getppid()}-abc"
    other_kind = tmp_path / f"edge_sel-cold-{_dead_pid()}-abc"
    unrelated = tmp_path / "edge_sel-hidden-notapid"
    for d in (dead, alive, other_kind, unrelated):
        d.mkdir()
        (d / "x.npy").write_bytes(b"0" * 10)
    mine = owned_tempdir("hidden", tmp_path)
    assert mine.name.startswith(f"edge_sel-hidden-{os.getpid()}-")
    assert not dead.exists()
    assert alive.exists() and other_kind.exists() and unrelated.exists()
    assert sweep_dead("cold", tmp_path) == [other_kind]


SPILLING_RERANK = r"""
import sys
from edge_sel import Reranker
docs = [f"document {i} about " + "numbers and words " * 12 for i in range(400)]
rr = Reranker(sys.argv[1], memory_budget="27MB", spill_dir=sys.argv[2])
for _ in range(50):
    rr.rank("numbers", docs, top_k=5)
"""


def test_a_killed_spilling_rerank_leaves_nothing_the_next_call_does_not_remove(llama_bundle, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SPILLING_RERANK, str(llama_bundle), str(spill)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(spill.iterdir()) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    left = list(spill.iterdir())
    assert left and left[0].name.startswith(f"edge_sel-hidden-{proc.pid}-")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left[0].exists()  # a killed process cannot clean up

    from edge_sel import Reranker

    rr = Reranker(llama_bundle, memory_budget="27MB", spill_dir=spill)
    rr.rank("numbers", [f"document {i} about " + "numbers and words " * 12 for i in range(400)], top_k=5)
    assert rr.last_stats["spill"]
    assert list(spill.iterdir()) == []  # the dead process's folder was swept, this call's own removed
