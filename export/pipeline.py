"""The export pipeline, one for every task and family: resolve -> adapter -> graphs -> staged bundle -> verify -> commit.

``export(model, out, task=...)`` resolves the model (packaged name, local directory, GGUF file or local HF-cache id),
asks the family's adapter (:mod:`edge_sel.export.adapters`) for the task's graphs and manifest fields, writes the
tokenizer, embedding arrays, per-layer ONNX graphs with external weights and the head into a staging directory
(:class:`edge_sel.runtime.bundle_writer.BundleWriter`), checks the staged bundle against the torch model when
``verify=True``, and renames it into place. Rerank bundles may then go through the drop-layers and calibrate passes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_sel.runtime.bundle_writer import BundleWriter
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.manifest import CREATED_BY, embed_files, graph_entries

from .adapters import Adapter, BundleGraphs, adapter_for_model, model_config, model_type, model_types_for
from .adapters.base import quiet_transformers
from .graphs import export_graph
from .sources import resolve
from .staging import stage_manifest
from .verify import check, verify_generate, verify_rerank

TASKS = ("rerank", "generate")
FORMATS = ("onnx", "ort", "coreml")  # ort: graphs in ORT format; coreml: the ONNX bundle plus CoreML packages


def export(model: str | os.PathLike, out: str | os.PathLike, task: str = "rerank", scoring: str | None = None,
           max_length: int | None = None, verify: bool = False, overwrite: bool = False, seed: int = 0,
           fetch_missing: bool = True, progress: Callable[[str, int, int], None] | None = None,
           drop_layers: int | str | None = None, calibrate: bool = False, prefix_reuse: bool | None = None,
           format: str = "onnx", coreml_precision: str = "fp16", weights: str = "fp32") -> Path:
    """Export ``model`` to a bundle directory ``out`` and return its path.

    task: ``"rerank"`` or ``"generate"`` (decoders).
    scoring: rerank bundles: ``"yes_no"`` (decoders), ``"cross_encoder"`` or ``"bi_encoder"`` (BERT family);
    default from the model.
    verify: run sample queries (prompts) through torch and the staged bundle; fail if scores (logits) differ by > 1e-3.
    seed: seeds any freshly initialised head weights (e.g. a classifier on a plain encoder).
    drop_layers: rerank bundles: drop N layers (or ``"auto"``) after export, see :mod:`edge_sel.export.passes.drop_layers`.
    calibrate: rerank bundles: calibrate early-ranking pruning after export (after dropping layers), see
    :mod:`edge_sel.export.passes.calibrate`.
    prefix_reuse: yes/no (decoder) rerankers: split layer graphs so the instruction + query prefix is computed
    once per query (default True; see :mod:`edge_sel.export.prefix_layers`).
    format: ``"onnx"`` (default); ``"ort"``: the graphs converted to onnxruntime's ORT format last (for mobile and
    minimal builds, see :mod:`edge_sel.export.passes.ort_format`); ``"coreml"``: the ONNX bundle plus a CoreML ML
    Program package per layer, qkv graph and head, converted from torch (``coreml_precision`` ``"fp16"`` (default)
    or ``"fp32"``; see :mod:`edge_sel.export.coreml`).
    weights: ``fp32`` (default), ``fp16``, ``int8`` or ``int4``: how the graphs' matrices and the embedding table are
    stored (see :mod:`edge_sel.export.passes.weights`); ``verify`` checks the float32 graphs before conversion.
    """
    from .passes.weights import check_format

    check_format(weights)
    if task not in TASKS:
        raise InputError(f"task {task!r} is not supported (supported: {', '.join(TASKS)})")
    if format not in FORMATS:
        raise InputError(f"format {format!r} is not supported (supported: {', '.join(FORMATS)})")
    if format == "coreml":
        _check_coreml(coreml_precision, drop_layers)
    BundleWriter.check_target(out, overwrite)  # before anything is fetched or loaded
    resolved = resolve(model, fetch_missing=fetch_missing)
    _refuse_overlap(Path(out), resolved.path)
    mtype = model_type(resolved)
    adapter = adapter_for_model(resolved)
    if task not in adapter.tasks:
        raise InputError(f"task {task!r} needs a model of type {', '.join(model_types_for(task))}; {mtype!r} is not one")
    if task == "generate":
        scoring = "lm"
    else:
        scoring = scoring or (resolved.packaged.default_scoring if resolved.packaged is not None
                              else adapter.default_scoring(model_config(resolved)))
        if scoring not in adapter.scorings:
            raise InputError(f"scoring {scoring!r} is not available for {adapter.family} models "
                             f"(choose from {', '.join(adapter.scorings)})")
    say = progress or (lambda stage, i, n: None)

    t0 = time.perf_counter()
    say("load", 0, 1)
    with quiet_transformers():
        torch_model, tokenizer = adapter.load(resolved, scoring, seed)
    say("load", 1, 1)
    if task == "generate":
        graphs = adapter.generate_graphs(torch_model, tokenizer, max_length)
    else:
        graphs = adapter.rerank_graphs(torch_model, tokenizer, scoring, max_length, prefix_reuse=prefix_reuse,
                                       resolved_path=resolved.path if resolved.kind == "hf_dir" else None)
        n = len(graphs.layers)
        if drop_layers is not None and drop_layers != "auto" and not 0 <= int(drop_layers) < n:
            raise InputError(f"--drop-layers {drop_layers}: the model has {n} layers; "
                             f"between 0 and {n - 1} can be dropped (at least one must stay)")

    record = {"seed": seed, "seconds": None, "verified_max_abs_diff": None}  # the manifest's ``export`` field
    with BundleWriter(out, overwrite=overwrite) as w:
        tokenizer.backend_tokenizer.save(str(w.file("tokenizer.json")))
        graph_fields = write_graphs(w, graphs, say)
        manifest: dict[str, Any] = {
            "created_by": CREATED_BY,
            "model": {"name": resolved.name, "source": str(resolved.spec), "family": adapter.family,
                      "model_type": mtype, "scoring": scoring, "task": task},
            "dims": graphs.dims,
            "dtype": "float32",
            "max_length": int(graphs.max_length),
            **graph_fields,
            "tokenizer": {"file": "tokenizer.json"},
            "dropped_layers": [],
            "schedule": None,
            "export": record,
            **adapter.manifest_extras(torch_model, tokenizer, task, scoring),
            **_coreml_packages(w, graphs, format, coreml_precision, say),
        }
        if verify:  # on the staged bundle, so a failing export never reaches `out`
            say("verify", 0, 1)
            diff = _verify(stage_manifest(w, manifest), adapter, torch_model, tokenizer, task, scoring)
            record["verified_max_abs_diff"] = diff
            check(diff, "logits" if task == "generate" else "scores")
            say("verify", 1, 1)
        if weights != "fp32":
            manifest = _convert_weights(w, manifest, weights, task, graphs, say,
                                        resolved.path if resolved.kind == "gguf" else None)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        path = w.commit(manifest)
    if task == "rerank":
        _rerank_passes(path, drop_layers, calibrate, say)
    if format == "ort":  # last: the passes above rewrite ONNX graphs
        from .passes.ort_format import convert_to_ort

        say("ort", 0, 1)
        convert_to_ort(path)
        say("ort", 1, 1)
    return path


def _coreml_packages(w: BundleWriter, graphs: BundleGraphs, format: str, precision: str, say) -> dict[str, Any]:
    """The manifest's ``coreml`` field (the packages written into ``w``), or nothing for the other formats."""
    if format != "coreml":
        return {}
    from .coreml import write_packages

    return {"coreml": write_packages(w, graphs, precision, say)}


def _check_coreml(precision: str, drop_layers) -> None:
    from .coreml import PRECISIONS, coremltools

    if precision not in PRECISIONS:
        raise InputError(f"CoreML precision {precision!r} is not supported (supported: {', '.join(PRECISIONS)})")
    if drop_layers not in (None, 0):
        raise InputError("--format coreml cannot be combined with --drop-layers yet (the packages are converted "
                         "per layer before layers are dropped); export without it")
    try:
        coremltools()  # its quiet import: a bare one printed nine warnings (untested torch, macOS-only proxies)
    except ImportError:
        raise InputError("--format coreml needs coremltools: pip install 'edge-sel[coreml]'") from None


def _refuse_overlap(out: Path, source: Path) -> None:
    """The bundle may not be written at, inside or around the model it is exported from."""
    o, src = out.expanduser().resolve(), source.expanduser().resolve()
    if o == src or src in o.parents or o in src.parents:
        where = "is" if o == src else "is inside" if src in o.parents else "contains"
        raise InputError(f"output {out} {where} the source model {source}; choose an output path outside it")


def write_graphs(w: BundleWriter, graphs: BundleGraphs, say: Callable[[str, int, int], None]) -> dict[str, Any]:
    """Write the embedding arrays, every layer's graphs and the head into the staged bundle; returns their manifest
    fields (``embed``, ``arrays``, ``layers``, ``layer_io``, ``extra_graphs``, ``head``)."""
    embed = w.write_array("embed/tokens.bin", graphs.embed.astype(np.float32))
    arrays = {name: w.write_array(f"embed/{name}.bin", arr.astype(np.float32)) for name, arr in graphs.arrays.items()}
    layers, extra_graphs = [], {}
    n = len(graphs.layers)
    for i, layer in enumerate(graphs.layers):
        say("layers", i, n)
        rel = f"layers/layer_{i:03d}.onnx"
        data = export_graph(layer.graph, w.file(rel))
        entry = {"index": i, "source_index": i, "file": rel, "weights": f"layers/{data}" if data else None}
        qrel = None
        if layer.qkv is not None:
            qrel = f"layers/layer_{i:03d}_qkv.onnx"
            qdata = export_graph(layer.qkv, w.file(qrel))
            extra_graphs[f"qkv_{i:03d}"] = {"file": qrel, "weights": f"layers/{qdata}" if qdata else None}
            entry["qkv"] = f"qkv_{i:03d}"
        if graphs.rewrite is not None:
            graphs.rewrite.rewrite(w.file(rel), w.file(qrel) if qrel else None)
        layers.append(entry)
    say("layers", n, n)
    head = graphs.head
    hdata = export_graph(head, w.file("head.onnx"), external=graphs.head_external)
    layer_io = graphs.rewrite.layer_io(graphs.layer_io) if graphs.rewrite is not None else graphs.layer_io
    return {"embed": embed, "arrays": arrays, "layers": layers, "layer_io": layer_io, "extra_graphs": extra_graphs,
            "head": {"file": "head.onnx", **({"weights": hdata} if graphs.head_external else {}),
                     "inputs": head.input_names, "outputs": head.output_names}}


def _convert_weights(w: BundleWriter, manifest: dict[str, Any], weights: str, task: str, graphs: BundleGraphs,
                     say: Callable[[str, int, int], None], gguf: Path | None = None) -> dict[str, Any]:
    """The staged float32 graphs and table rewritten in place in the ``weights`` format; from a GGUF, the table and
    every MatMul weight stored there as Q8_0 / Q4_0 / Q4_1 keep the file's own blocks
    (:mod:`edge_sel.export.gguf_blocks`)."""
    from .gguf_blocks import RowIndex, table_blocks, warn
    from .passes.weights import convert_files

    say("weights", 0, 1)
    quantized = gguf is not None and weights in ("int8", "int4")
    blocks = table_blocks(gguf) if quantized else None
    index = RowIndex.build(gguf) if quantized else None
    warn(index.warning() if index else None)
    new, replaced = convert_files(lambda rel: w.staging / rel, w, manifest, weights, task, table=graphs.embed,
                                  say=lambda msg: None, table_blocks=blocks, gguf=index)
    still = {f for g in graph_entries(new) for f in g[:2] if f} | set(embed_files(new))
    for rel in replaced - still:
        (w.staging / rel).unlink(missing_ok=True)  # the float32 table the encoded one replaces
    say("weights", 1, 1)
    return new


def _verify(staged, adapter: Adapter, model, tokenizer, task: str, scoring: str) -> float:
    if task == "generate":
        return verify_generate(staged, adapter, model)
    return verify_rerank(staged, adapter, model, tokenizer, scoring)


def _rerank_passes(path: Path, drop_layers, calibrate: bool, say) -> None:
    if drop_layers not in (None, 0):
        from .passes.drop_layers import drop_layers as drop

        drop(path, drop_layers, say=say)
    if calibrate:
        from .passes.calibrate import calibrate as calibrate_bundle

        say("calibrate", 0, 1)
        calibrate_bundle(path, "builtin", progress=lambda i, n, *_: say("calibrate", i, n))
