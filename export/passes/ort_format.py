"""Convert a bundle's graphs to the ORT format, for onnxruntime's mobile and minimal builds.

Minimal builds (``--minimal_build``) read only ORT-format models and contain only the operators their build
configuration lists. This pass runs onnxruntime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``,
optimization style ``Fixed``: the graph optimizations are applied once here, the NCHWc layout transform left out so
the files run on ARM too) over every graph of the bundle — layers, qkv graphs, head — and writes the operator
configuration a reduced build takes (``--include_ops_by_config``) into the bundle. Each graph's ``file`` then names its
``.ort`` file (weights inside: ORT files hold their initializers), ``graph_format`` is ``"ort"`` and ``ort`` records the
configuration file and the operator set. onnxruntime loads ``.ort`` files by path like ``.onnx`` ones, so every
runtime built on it (the Python one, the Node package) runs either form unchanged.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Callable

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.bundle_writer import BundleWriter
from edge_sel.runtime.errors import InputError

from ..staging import link_files
from .rewrite import rewriting

CONFIG = "ort/required_operators.config"
LEVELS = ("basic", "extended", "all")


def parse_operator_config(text: str) -> dict[str, list[str]]:
    """``{"<domain>;<opset>": [operators]}`` from a required-operators configuration (``domain;opset;op1,op2``)."""
    ops: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, names = line.split(";", 2)
        ops[f"{domain};{opset}"] = sorted(set(ops.get(f"{domain};{opset}", [])) | set(names.split(",")))
    return ops


def _convert(src: Bundle, graphs: list, work: Path, level: str) -> Path:
    """Convert the graphs (each ``file`` + ``weights``) under ``work/onnx`` into ``work/ort``; returns the config."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    tree = work / "onnx"
    for g in graphs:
        for rel in (g.file, g.weights):
            if rel:
                dst = tree / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    try:
                        os.link(src.path(rel), dst)
                    except OSError:
                        shutil.copyfile(src.path(rel), dst)
    old = os.environ.get("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL")
    os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = level  # the converter's own knob for the level
    log = io.StringIO()
    chatty = logging.getLogger("ort_format_model.utils")  # the converter's progress lines
    level_before = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(log):
            convert_onnx_models_to_ort(tree, output_dir=work / "ort", optimization_styles=[OptimizationStyle.Fixed])
    except Exception as e:  # the converter raises whatever onnxruntime raised: name the bundle
        raise InputError(f"{src.root}: onnxruntime could not convert the graphs to ORT format ({e})") from None
    finally:
        chatty.setLevel(level_before)
        if old is None:
            os.environ.pop("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", None)
        else:
            os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = old
    configs = sorted((work / "ort").glob("required_operators*.config"))
    if not configs:
        raise InputError(f"{src.root}: the ORT converter wrote no operator configuration")
    return configs[0]


def _ort_name(rel: str, level: str) -> str:
    """Where the converter put the ORT file of ``rel`` (it marks a level other than ``all`` in the name)."""
    p = PurePosixPath(rel)
    return p.with_suffix(("" if level == "all" else f".{level}") + ".ort").as_posix()


def convert_to_ort(path: str | os.PathLike, out: str | os.PathLike | None = None, level: str = "all", force: bool = False,
                   say: Callable[[str], None] | None = None) -> Path:
    """Rewrite the bundle at ``path`` with ORT-format graphs (in place when ``out`` is None, else a copy at ``out``);
    returns the bundle's path. ``level``: onnxruntime graph optimization level applied before saving."""
    say = say or (lambda msg: None)
    if level not in LEVELS:
        raise InputError(f"unknown optimization level {level!r}; choose one of {', '.join(LEVELS)}")
    src = Bundle.open(path, verify=True)
    spec = src.spec
    if spec.graph_format == "ort":
        raise InputError(f"{src.root} already holds ORT-format graphs")
    if spec.fused is not None:  # refused before any work: the writer's validation named its own staging directory
        raise InputError(f"{src.root} has a fused graph ({spec.fused.file}), which reads the ONNX graphs' weight files "
                         "that an ORT-format bundle does not keep; convert the bundle without it (before `edge-sel fuse`, "
                         "or exported without --fused)")
    graphs = [*spec.layers, *spec.extra_graphs.values(), spec.head]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edge_sel-ort-") as tmp:
        say(f"converting {len(graphs)} graphs to ORT format")
        config = _convert(src, graphs, Path(tmp), level)
        ops = parse_operator_config(config.read_text(encoding="utf-8"))
        old = {f for g in graphs for f in (g.file, g.weights) if f}
        moved = {g.file: _ort_name(g.file, level) for g in graphs}

        def place(w: BundleWriter) -> None:
            for rel, new in moved.items():
                shutil.copyfile(Path(tmp) / "ort" / new, w.file(new))
            shutil.copyfile(config, w.file(CONFIG))

        # a plain manifest: the writer's commit lists the staged files (the .ort ones) before validating it
        new = spec.to_dict()
        new["layers"] = [{**x, "file": moved[x["file"]], "weights": None} for x in new["layers"]]
        new["extra_graphs"] = {k: {**g, "file": moved[g["file"]], "weights": None} for k, g in new.get("extra_graphs", {}).items()}
        new["head"] = {**new["head"], "file": moved[new["head"]["file"]], "weights": None}
        if new.get("weights"):  # a quantized bundle's per-graph facts follow their graphs to the .ort names
            new["weights"] = {**new["weights"], "tensors": {moved.get(k, k): v for k, v in new["weights"]["tensors"].items()}}
        new["graph_format"] = "ort"
        new["ort"] = {"required_operators": CONFIG, "optimization_level": level, "optimization_style": "Fixed",
                      "onnxruntime": _ort_version(), "operators": ops, "seconds": round(time.perf_counter() - t0, 2)}
        if out is None:
            with rewriting(src, leave_out=old) as w:
                place(w)
                w.commit(new)
            return src.root
        with BundleWriter(out, overwrite=force) as w:
            link_files(src, w, [rel for rel in spec.files if rel not in old])
            place(w)
            return w.commit(new)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
