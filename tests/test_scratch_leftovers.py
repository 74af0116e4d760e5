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


def _generate_cmd(bundle, prompt_file, n_new):
    return [sys.executable, "-m", "edge_sel.cli", "generate", str(bundle), "--prompt-file", str(prompt_file),
            "--kv-budget", "0.2", "--policy", "mpcache_recall", "-n", str(n_new)]


def _cold_dirs(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("edge_sel-cold-"))


def _ours(root):
    """What edge_sel left in a temp folder (other libraries may keep their own files there)."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith("edge_sel-"))


def _start_recalling_generate(bundle, prompt_file, tmp):
    """A recalling generate in its own process, returned once its cold store holds evicted K/V (None if it ended first)."""
    proc = subprocess.Popen(_generate_cmd(bundle, prompt_file, 400), env={**os.environ, "TMPDIR": str(tmp)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        mine = [n for n in _cold_dirs(tmp) if n.startswith(f"edge_sel-cold-{proc.pid}-")]
        if mine and any(os.path.getsize(p) for p in (tmp / mine[0]).iterdir()):
            return proc
        time.sleep(0.005)
    proc.communicate()
    return None


def _recalling_generate_with_cold_store(bundle, tmp_path):
    """A recalling generate (in a subprocess, temp dir ``tmp_path/tmp``) caught once its cold store holds data."""
    from gen_tiny import long_text

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(long_text(12000))
    proc = _start_recalling_generate(bundle, prompt, tmp)
    assert proc is not None, "the generate call ended before its cold store was seen"
    return proc, tmp


def test_a_killed_recalling_generate_leaves_nothing_the_next_run_does_not_remove(gen_llama_bundle, tmp_path):
    from gen_tiny import long_text

    proc, tmp = _recalling_generate_with_cold_store(gen_llama_bundle, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _cold_dirs(tmp)
    assert left and left[0].startswith(f"edge_sel-cold-{proc.pid}-") and any((tmp / left[0]).iterdir())

    short = tmp_path / "short.txt"
    short.write_text(long_text(3000))
    out = subprocess.run(_generate_cmd(gen_llama_bundle, short, 2), env={**os.environ, "TMPDIR": str(tmp)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert _ours(tmp) == []  # the dead run's folder swept, this run's own removed


def test_sigterm_during_a_recalling_generate_removes_its_cold_store(gen_llama_bundle, tmp_path):
    proc, tmp = _recalling_generate_with_cold_store(gen_llama_bundle, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "edge-sel: interrupted"
    assert _ours(tmp) == []  # handled like Ctrl-C: the call's cleanup ran
