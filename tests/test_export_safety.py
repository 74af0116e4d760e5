"""Export never destroys what it does not own: ``--force`` replaces only a bundle and never the source model, an
interrupted or killed export leaves the previous bundle in place, and the next export tidies up after dead writers."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_sel.cli import main
from edge_sel.runtime.bundle import Bundle, is_bundle
from edge_sel.runtime.bundle_writer import BundleWriter
from edge_sel.runtime.errors import BundleError


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its bytes (a folder's complete content)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from tiny_models import make_bert

    return make_bert(tmp_path_factory.mktemp("safety") / "hf", cross_encoder=True)


@pytest.fixture
def bundle(model, tmp_path) -> Path:
    """A freshly exported bundle in its own folder (tests replace or move it)."""
    from edge_sel.export import export

    return export(model, tmp_path / "out" / "bundle")


def test_force_refuses_a_folder_of_user_files(model, tmp_path, capsys):
    user = tmp_path / "photos"
    (user / "2019").mkdir(parents=True)
    (user / "2019" / "beach.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (user / "notes.txt").write_text("keep me")
    before = snapshot(user)
    assert main(["export", str(model), "-o", str(user), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an edge_sel bundle" in err
    assert snapshot(user) == before and hidden(tmp_path) == []


def test_force_refuses_a_file(model, tmp_path, capsys):
    f = tmp_path / "report.pdf"
    f.write_bytes(b"%PDF-1.4 mine")
    assert main(["export", str(model), "-o", str(f), "--force"]) == 2
    assert "not an edge_sel bundle" in capsys.readouterr().err
    assert f.read_bytes() == b"%PDF-1.4 mine"


def test_force_refuses_a_folder_with_a_foreign_manifest(model, tmp_path):
    other = tmp_path / "web"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    assert main(["export", str(model), "-o", str(other), "--force"]) == 2
    assert (other / "manifest.json").read_text() == '{"name": "my web app", "icons": []}'


@pytest.mark.parametrize("where", ["model", "inside", "parent"])
@pytest.mark.parametrize("force", [True, False])
def test_the_source_model_is_never_a_target(model, where, force, capsys):
    out = {"model": model, "inside": model / "sub", "parent": model.parent}[where]
    before = snapshot(model.parent)
    t0 = time.perf_counter()
    assert main(["export", str(model), "-o", str(out)] + (["--force"] if force else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("edge-sel: error:")
    assert time.perf_counter() - t0 < 5  # refused before the model is loaded
    assert snapshot(model.parent) == before and not (model / "sub").exists()


def test_force_replaces_an_existing_bundle(model, bundle):
    (bundle / "stale-extra.txt").write_text("from the previous export")
    assert main(["export", str(model), "-o", str(bundle), "--force", "--seed", "3"]) == 0
    b = Bundle.open(bundle, verify=True)
    assert b.manifest["export"]["seed"] == 3 and not (bundle / "stale-extra.txt").exists()
    assert hidden(bundle.parent) == []


def test_without_force_an_existing_bundle_is_kept(model, bundle, capsys):
    before = snapshot(bundle)
    assert main(["export", str(model), "-o", str(bundle)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert snapshot(bundle) == before


def _export_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "edge_sel.cli", "export", str(model), "-o", str(out), "--force", "--verify",
            "--seed", "5"]


def _interrupted_export(model: Path, bundle: Path, interrupt, attempts: int = 3) -> tuple[int, str, dict]:
    """Run the export in a child and call ``interrupt(proc)`` once its staging directory exists; returns the exit code,
    stderr and the bundle's files just before that run. The staging window lasts seconds (graphs + --verify), but a fast
    machine can still finish first: then the new bundle is the previous one and it tries again. Skips if every attempt
    finished before the interrupt."""
    for _ in range(attempts):
        before = snapshot(bundle)
        proc = subprocess.Popen(_export_cmd(model, bundle), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(n.startswith(f".{bundle.name}.partial-{proc.pid}-") for n in os.listdir(bundle.parent)):
                interrupt(proc)
                break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            return proc.returncode, err, before
    pytest.skip(f"the export finished before it could be interrupted, {attempts} times")


def test_sigterm_during_export_keeps_the_previous_bundle(model, bundle):
    rc, err, before = _interrupted_export(model, bundle, lambda proc: proc.send_signal(signal.SIGTERM))
    assert rc in (130, 143), err
    assert err.strip().splitlines()[-1] == "edge-sel: interrupted"
    assert hidden(bundle.parent) == []  # no .partial-*, no .old-*
    assert snapshot(bundle) == before
    Bundle.open(bundle, verify=True)


def _sigterm_twice(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


def test_a_second_sigterm_does_not_interrupt_the_cleanup(model, bundle):
    rc, err, before = _interrupted_export(model, bundle, _sigterm_twice)
    assert rc == 143, err
    assert hidden(bundle.parent) == [] and snapshot(bundle) == before


def test_sigkill_leftovers_are_swept_by_the_next_export(model, bundle):
    parent = bundle.parent
    rc, _, _ = _interrupted_export(model, bundle, lambda proc: proc.kill())
    assert rc == -signal.SIGKILL
    assert any(".partial-" in n for n in hidden(parent))  # SIGKILL cannot be handled
    assert is_bundle(bundle)
    assert main(["export", str(model), "-o", str(parent / "second")]) == 0
    assert hidden(parent) == [] and is_bundle(bundle)


def test_a_stranded_previous_bundle_is_restored(model, bundle):
    """A writer that died between moving the old bundle aside and renaming the new one into place."""
    before = snapshot(bundle)
    stranded = bundle.parent / f".{bundle.name}.old-{dead_pid()}"
    os.replace(bundle, stranded)
    assert main(["export", str(model), "-o", str(bundle.parent / "another")]) == 0
    assert not stranded.exists() and snapshot(bundle) == before
    Bundle.open(bundle, verify=True)


def test_a_stranded_bundle_is_restored_before_a_writer_to_its_target_checks_it(bundle):
    before = snapshot(bundle)
    os.replace(bundle, bundle.parent / f".{bundle.name}.old-{dead_pid()}")
    with pytest.raises(BundleError, match="already exists"):
        BundleWriter(bundle)  # restored first, so it is not silently replaced without overwrite
    assert snapshot(bundle) == before and hidden(bundle.parent) == []


def test_sweep_removes_only_what_dead_writers_left(model, bundle):
    parent = bundle.parent
    dead, live = dead_pid(), os.getpid()

    def plant(name: str) -> Path:
        (parent / name).mkdir()
        (parent / name / "layer_000.onnx").write_bytes(b"half written")
        return parent / name

    dead_partial = plant(f".x.partial-{dead}-abc123")
    live_partial = plant(f".x.partial-{live}-abc123")
    no_pid = plant(".x.partial-k2j4h5l9")                 # no owner recorded: not ours to judge
    old_of_bundle = plant(f".{bundle.name}.old-{dead}")   # the target is a valid bundle: the backup is obsolete
    (parent / "mine").mkdir()
    (parent / "mine" / "a.txt").write_text("user data")
    old_of_user = plant(f".mine.old-{dead}")              # the target is not a bundle: left alone
    assert main(["export", str(model), "-o", str(parent / "second")]) == 0
    assert not dead_partial.exists() and not old_of_bundle.exists()
    assert live_partial.exists() and no_pid.exists() and old_of_user.exists()
    assert (parent / "mine" / "a.txt").read_text() == "user data"


def test_sigterm_is_handled_like_ctrl_c():
    code = ("import os, signal, sys, time\n"
            "import edge_sel.cli as cli\n"
            "cli.cmd_models = lambda args, console: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30))\n"
            "sys.exit(cli.main(['models', 'list']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 143 and res.stderr.strip() == "edge-sel: interrupted"
