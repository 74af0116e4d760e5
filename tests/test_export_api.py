"""The export entry points: ``edge_sel.export_model`` (the one-line call), ``edge_sel.export`` (the subpackage) and the
pipeline's refusals, which name what the adapter registry supports."""

from __future__ import annotations

import json
import types

import pytest

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import InputError


def test_export_model_and_the_subpackage(tmp_path):
    import edge_sel
    import edge_sel.export
    from edge_sel.export import export
    from tiny_models import make_bert

    assert isinstance(edge_sel.export, types.ModuleType) and not callable(edge_sel.export)
    assert edge_sel.export.export is export
    out = edge_sel.export_model(make_bert(tmp_path / "hf", layers=1), tmp_path / "b", verify=True)
    b = Bundle.open(out, verify=True)
    assert b.spec.model.task == "rerank" and b.spec.scoring == "bi_encoder" and b.spec.model.family == "bert"
    assert b.spec.export.verified_max_abs_diff < 1e-3


def test_refusals_name_the_supported_choices(tmp_path):
    from edge_sel.export import export
    from tiny_models import make_bert

    hf = make_bert(tmp_path / "hf", layers=1)
    with pytest.raises(InputError, match="task 'generate' needs a model of type .*phi3.*'bert' is not one"):
        export(hf, tmp_path / "g", task="generate")
    with pytest.raises(InputError, match="scoring 'yes_no' is not available for bert models"):
        export(hf, tmp_path / "y", scoring="yes_no")
    with pytest.raises(InputError, match="task 'classify' is not supported"):
        export(hf, tmp_path / "c", task="classify")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(InputError, match="model type 'mamba' is not supported; supported: .*llama.*phi3"):
        export(hf, tmp_path / "m")
    assert not list(tmp_path.glob(".*partial*"))


def test_export_prints_edge_sel_lines_not_transformers_chatter(tmp_path, capfd, caplog):
    """A plain encoder (saved with its pooler) exported as a bi-encoder drops the pooler on purpose: transformers'
    "Some weights ... were not used" is noise. As a cross-encoder its classifier is new: one edge_sel line says so
    instead of transformers' "newly initialized ... TRAIN this model"."""
    from edge_sel.cli import main
    from tiny_models import make_bert

    hf = make_bert(tmp_path / "hf", layers=1)
    capfd.readouterr()
    assert main(["export", str(hf), "-o", str(tmp_path / "bi"), "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["scoring"] == "bi_encoder"
    assert "were not used" not in err and "Some weights" not in err, err
    assert main(["export", str(hf), "-o", str(tmp_path / "ce"), "--scoring", "cross_encoder", "--seed", "3", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["scoring"] == "cross_encoder"
    assert "newly initialized" not in err and "TRAIN" not in err, err
    assert "has no classifier: the cross-encoder head is initialised at random (seed 3)" in caplog.text
    from transformers.utils import logging as hf_logging

    assert hf_logging.get_verbosity() == hf_logging.WARNING  # transformers' own level is back after the load
