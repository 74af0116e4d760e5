"""Bundle contract: atomic writes, structural checks on open, hash checks on verify."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edge_sel.runtime.bundle import FORMAT_VERSION, Bundle
from edge_sel.runtime.bundle_writer import BundleWriter
from edge_sel.runtime.errors import BundleError


def _copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(root, fn):
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_open_and_verify(bert_bi_bundle):
    b = Bundle.open(bert_bi_bundle, verify=True)
    assert b.scoring == "bi_encoder" and len(b.layers) == 3
    emb = b.array("embed")
    assert isinstance(emb, np.memmap) and emb.shape[1] == b.dims["hidden"]


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        Bundle.open(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(tmp_path)


def test_missing_file(bert_bi_bundle, tmp_path):
    root = _copy(bert_bi_bundle, tmp_path)
    (root / "layers" / "layer_001.onnx.data").unlink()
    with pytest.raises(BundleError, match="layer_001.onnx.data"):
        Bundle.open(root)


def test_truncated_file_size_mismatch(bert_bi_bundle, tmp_path):
    root = _copy(bert_bi_bundle, tmp_path)
    p = root / "embed" / "tokens.bin"
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(BundleError, match="size"):
        Bundle.open(root)


def test_hash_mismatch_found_on_open(bert_bi_bundle, tmp_path):
    root = _copy(bert_bi_bundle, tmp_path)
    p = root / "layers" / "layer_000.onnx.data"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    Bundle.open(root, verify=False)  # the explicit opt-out checks sizes only, and they still match
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(root)  # a copy has no valid stamp: the first open hashes every file
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(root, verify=True)


def test_newer_format_version(bert_bi_bundle, tmp_path):
    root = _copy(bert_bi_bundle, tmp_path)
    _edit_manifest(root, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match="newer"):
        Bundle.open(root)


@pytest.mark.parametrize("evil", ["../../etc/passwd", "/etc/passwd", "layers/../../x"])
def test_path_traversal_refused(bert_bi_bundle, tmp_path, evil):
    root = _copy(bert_bi_bundle, tmp_path)

    def edit(m):
        m["layers"][0]["file"] = evil
        m["files"][evil] = {"size": 1, "sha256": "0"}

    _edit_manifest(root, edit)
    with pytest.raises(BundleError, match="escapes|outside"):
        Bundle.open(root)


def test_not_json(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(tmp_path)


def test_writer_interrupted_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with BundleWriter(target) as w:
            w.write_array("embed/tokens.bin", np.zeros((4, 2), np.float32))
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_keeps_old_bundle_on_failure(bert_bi_bundle, tmp_path):
    root = _copy(bert_bi_bundle, tmp_path)
    before = (root / "manifest.json").read_text()
    with pytest.raises(RuntimeError):
        with BundleWriter(root, overwrite=True):
            raise RuntimeError("export failed half way")
    assert (root / "manifest.json").read_text() == before
    with pytest.raises(BundleError, match="already exists"):
        BundleWriter(root)


def test_export_failure_leaves_no_bundle(tmp_path):
    from edge_sel.export import export
    from tiny_models import make_bert

    model = make_bert(tmp_path / "hf")
    with pytest.raises(Exception):
        export(model, tmp_path / "out", scoring="yes_no")  # invalid scoring for BERT
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ---- integrity: manifest digest, graph references, the verification stamp ---------------------------------------
def _no_hashing(monkeypatch):
    """Make any hashing of a bundle file fail loudly: what runs afterwards must not hash."""
    import edge_sel.runtime.bundle as mod

    def refuse(*a, **k):
        raise AssertionError("a bundle file was hashed")

    monkeypatch.setattr(mod, "sha256_file", refuse)
    monkeypatch.setattr(mod.hashlib, "sha256", lambda data=b"": _Sha(data))


class _Sha:
    """hashlib.sha256 stand-in that allows hashing only small inputs (the manifest, a path)."""

    def __init__(self, data):
        import hashlib

        self.h = hashlib.new("sha256")
        self.update(data)

    def update(self, data):
        assert len(data) < 200_000, "a bundle file was hashed"
        self.h.update(data)

    def hexdigest(self):
        return self.h.hexdigest()


def test_writer_records_digest_and_stamp_so_the_next_open_does_not_hash(bert_bi_bundle, tmp_path, monkeypatch):
    from edge_sel.export.passes.drop_layers import rewrite_without
    from edge_sel.runtime.bundle import DIGEST, STAMP

    root = rewrite_without(Bundle.open(_copy(bert_bi_bundle, tmp_path)), [1], {"top10_overlap": 1.0})
    assert (root / DIGEST).is_file() and (root / STAMP).is_file()
    assert "manifest.json" in (root / DIGEST).read_text()
    assert STAMP not in Bundle.open(root).spec.files and DIGEST not in Bundle.open(root).spec.files
    _no_hashing(monkeypatch)
    Bundle.open(root)  # stamped by the writer: only stat calls


def test_any_change_of_a_listed_file_is_caught_before_it_runs(bert_ce_bundle, tmp_path, monkeypatch):
    """A same-size change with the modification time put back is still caught (ctime / inode in the stamp)."""
    root = _copy(bert_ce_bundle, tmp_path)
    Bundle.open(root)  # first open: verifies and stamps
    Bundle.open(root)
    p = root / "embed" / "tokens.bin"
    st = p.stat()
    p.write_bytes(bytes(st.st_size))  # zeroed weights of the right size: every score would be 0.0
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BundleError, match="tokens.bin: sha256"):
        Bundle.open(root)


def test_swapped_layer_graph_is_caught(bert_ce_bundle, tmp_path):
    root = _copy(bert_ce_bundle, tmp_path)
    for name in ("layer_000.onnx", "layer_000.onnx.data"):
        shutil.copy(root / "layers" / name.replace("000", "001"), root / "layers" / name)
    with pytest.raises(BundleError, match="layer_000.onnx"):
        Bundle.open(root)


def test_edited_manifest_is_caught_by_its_digest(bert_ce_bundle, tmp_path):
    """Swapping two layers' entries keeps every file's hash valid: only the manifest's digest sees it."""
    root = _copy(bert_ce_bundle, tmp_path)

    def swap(m):
        a, b = m["layers"][0], m["layers"][1]
        a["file"], b["file"], a["weights"], b["weights"] = b["file"], a["file"], b["weights"], a["weights"]

    _edit_manifest(root, swap)
    with pytest.raises(BundleError, match="does not match its digest"):
        Bundle.open(root)
    out = subprocess.run([sys.executable, "-m", "edge_sel.cli", "verify", str(root)], capture_output=True, text=True)
    assert out.returncode == 2 and "digest" in out.stderr + out.stdout


def test_graph_loading_an_unlisted_data_file_is_refused(bert_ce_bundle, tmp_path):
    """A graph pointing its external data at a file the manifest does not list (here: a copy of its own weights), with
    the manifest and its digest rewritten consistently, is refused when the hashes are verified."""
    onnx = pytest.importorskip("onnx")
    from edge_sel.runtime.bundle import sha256_file, write_manifest

    root = _copy(bert_ce_bundle, tmp_path)
    shutil.copy(root / "layers" / "layer_000.onnx.data", root / "layers" / "hidden.bin")
    g = onnx.load(str(root / "layers" / "layer_000.onnx"), load_external_data=False)
    for init in g.graph.initializer:
        for e in init.external_data:
            if e.key == "location":
                e.value = "hidden.bin"
    onnx.save(g, str(root / "layers" / "layer_000.onnx"))
    m = json.loads((root / "manifest.json").read_text())
    f = root / "layers" / "layer_000.onnx"
    m["files"]["layers/layer_000.onnx"] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    write_manifest(root, m)
    with pytest.raises(BundleError, match="hidden.bin.*not a file listed"):
        Bundle.open(root)


def test_stamp_falls_back_to_the_home_when_the_bundle_is_not_writable(bert_bi_bundle, tmp_path, monkeypatch):
    from edge_sel.runtime.bundle import STAMP

    monkeypatch.setenv("EDGE_SEL_HOME", str(tmp_path / "home"))
    root = _copy(bert_bi_bundle, tmp_path)
    (root / STAMP).unlink(missing_ok=True)
    (root / STAMP).mkdir()  # the stamp cannot be written there (a directory is in the way)
    Bundle.open(root)
    assert list((tmp_path / "home" / "verified").glob("*.json"))
    _no_hashing(monkeypatch)
    Bundle.open(root)


def test_open_verify_argument(bert_bi_bundle):
    with pytest.raises(ValueError, match="verify"):
        Bundle.open(bert_bi_bundle, verify="sometimes")
