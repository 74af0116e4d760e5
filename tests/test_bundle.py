"""Bundle contract: atomic writes, structural checks on open, hash checks on verify."""

import json
import shutil

import numpy as np
import pytest

from edge_sel.runtime.bundle import FORMAT_VERSION, Bundle, BundleWriter
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


def test_hash_mismatch_found_by_verify(bert_bi_bundle, tmp_path):
    root = _copy(bert_bi_bundle, tmp_path)
    p = root / "layers" / "layer_000.onnx.data"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    Bundle.open(root)  # sizes still match: open is cheap and passes
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
