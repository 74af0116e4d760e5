"""edge_sel.export — the torch side: turn a Hugging Face / GGUF model into a bundle (DESIGN §2).

``export(model, out, task="rerank")`` resolves the model (packaged name, local directory, GGUF file
or local HF-cache id), splits it with the family adapter, writes embedding arrays, per-layer ONNX
graphs with external weights, the scoring head and the tokenizer into a staging directory, checks
the bundle against the torch model when ``verify=True``, and renames it into place.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_sel.runtime.bundle import Bundle, BundleWriter
from edge_sel.runtime.errors import EdgeSelError, InputError
from edge_sel.export.sources import resolve

from .adapters import adapter_for
from .graphs import export_graph

VERIFY_TOLERANCE = 1e-3


class ExportVerificationError(EdgeSelError):
    """The exported bundle's scores differ from the torch model's by more than the tolerance."""


def _model_type(resolved) -> str:
    if resolved.kind == "gguf":
        return "llama"  # GGUF decoders load through transformers' llama-family path
    import json

    return json.loads((resolved.path / "config.json").read_text())["model_type"]


def _default_scoring(resolved, model_type: str) -> str:
    if resolved.packaged is not None:
        return resolved.packaged.default_scoring
    if model_type in ("llama", "qwen2", "qwen3", "mistral"):
        return "yes_no"
    import json

    archs = json.loads((resolved.path / "config.json").read_text()).get("architectures") or []
    return "cross_encoder" if any("SequenceClassification" in a for a in archs) else "bi_encoder"


def export(model: str | os.PathLike, out: str | os.PathLike, task: str = "rerank", scoring: str | None = None,
           max_length: int | None = None, verify: bool = False, overwrite: bool = False, seed: int = 0,
           fetch_missing: bool = True, progress: Callable[[str, int, int], None] | None = None,
           drop_layers: int | str | None = None, calibrate: bool = False, prefix_reuse: bool | None = None) -> Path:
    """Export ``model`` to a bundle directory ``out`` and return its path.

    task: ``"rerank"`` or ``"generate"`` (Llama-family decoders; see :mod:`edge_sel.export.generate`).
    scoring: ``"yes_no"`` (decoders), ``"cross_encoder"`` or ``"bi_encoder"`` (BERT family); default from the model.
    verify: run sample queries through torch and the bundle; fail if scores differ by > 1e-3.
    seed: seeds any freshly initialised head weights (e.g. a classifier on a plain encoder).
    drop_layers: rerank bundles: drop N layers (or ``"auto"``) after export, see :mod:`edge_sel.export.passes.drop_layers`.
    calibrate: rerank bundles: calibrate early-ranking pruning after export (after dropping layers), see
    :mod:`edge_sel.export.passes.calibrate`.
    prefix_reuse: yes/no (decoder) rerankers: split layer graphs so the instruction + query prefix is computed
    once per query (default True for decoders; see :mod:`edge_sel.export.prefix_layers`).
    """
    if task not in ("rerank", "generate"):
        raise InputError(f"task {task!r} is not supported (supported: rerank, generate)")
    resolved = resolve(model, fetch_missing=fetch_missing)
    model_type = _model_type(resolved)
    adapter = adapter_for(model_type)
    if task == "generate":
        from .generate import export_generate

        if adapter.family != "llama":
            raise InputError(f"task 'generate' needs a decoder (llama, qwen2, qwen3, mistral); {model_type!r} is not one")
        return export_generate(resolved, adapter, model_type, out, max_length=max_length, verify=verify,
                               overwrite=overwrite, seed=seed, say=progress, verify_tolerance=VERIFY_TOLERANCE)
    scoring = scoring or _default_scoring(resolved, model_type)
    if scoring not in adapter.scorings:
        raise InputError(f"scoring {scoring!r} is not available for {adapter.family} models (choose from {', '.join(adapter.scorings)})")
    say = progress or (lambda stage, i, n: None)

    t0 = time.perf_counter()
    say("load", 0, 1)
    torch_model, tokenizer = adapter.load(resolved, scoring, seed)
    say("load", 1, 1)
    split = adapter.split(torch_model, tokenizer, scoring, max_length,
                          resolved_path=resolved.path if resolved.kind == "hf_dir" else None)
    if drop_layers is not None and drop_layers != "auto" and not 0 <= int(drop_layers) < len(split.layers):
        raise InputError(f"--drop-layers {drop_layers}: the model has {len(split.layers)} layers; "
                         f"between 0 and {len(split.layers) - 1} can be dropped (at least one must stay)")

    with BundleWriter(out, overwrite=overwrite) as w:
        tokenizer.backend_tokenizer.save(str(w.file("tokenizer.json")))
        embed = w.write_array("embed/tokens.bin", split.embed.astype(np.float32))
        arrays = {name: w.write_array(f"embed/{name}.bin", arr.astype(np.float32)) for name, arr in split.arrays.items()}
        layers = []
        n = len(split.layers)
        extra_graphs, layer_io = {}, {"inputs": split.layers[0].input_names, "outputs": split.layers[0].output_names}
        if scoring == "yes_no" and prefix_reuse is not False:
            from .prefix_layers import write_split_layers

            layers, extra_graphs, layer_io = write_split_layers(w, torch_model, say)
        for i, spec in enumerate(split.layers if not layers else []):
            say("layers", i, n)
            rel = f"layers/layer_{i:03d}.onnx"
            data = export_graph(spec, w.file(rel))
            layers.append({"index": i, "source_index": i, "file": rel, "weights": f"layers/{data}" if data else None})
        say("layers", n, n)
        export_graph(split.head, w.file("head.onnx"), external=False)
        manifest: dict[str, Any] = {
            "created_by": "edge_sel 0.1.0",
            "model": {"name": resolved.name, "source": str(resolved.spec), "family": split.family,
                      "model_type": model_type, "scoring": scoring, "task": task},
            "dims": split.dims,
            "dtype": "float32",
            "max_length": int(split.max_length),
            "embed": embed,
            "arrays": arrays,
            "layers": layers,
            "layer_io": layer_io,
            "extra_graphs": extra_graphs,
            "head": {"file": "head.onnx", "inputs": split.head.input_names, "outputs": split.head.output_names},
            "tokenizer": {"file": "tokenizer.json"},
            "dropped_layers": [],
            "schedule": None,
            "export": {"seed": seed, "seconds": None, "verified_max_abs_diff": None},
            **split.extras,
        }
        # verification runs on the staged bundle, so a failing export never reaches `out`
        if verify:
            say("verify", 0, 1)
            staged = _stage_manifest(w, manifest)
            diff = verify_bundle(staged, adapter, torch_model, split)
            manifest["export"]["verified_max_abs_diff"] = diff
            if diff > VERIFY_TOLERANCE:
                raise ExportVerificationError(
                    f"bundle scores differ from the torch model by {diff:.2e} (> {VERIFY_TOLERANCE:g}); export not written")
            say("verify", 1, 1)
        manifest["export"]["seconds"] = round(time.perf_counter() - t0, 2)
        path = w.commit(manifest)
    if drop_layers not in (None, 0):
        from .passes.drop_layers import drop_layers as _drop

        _drop(path, drop_layers, say=say)
    if calibrate:
        from edge_sel.export.passes.calibrate import calibrate as _calibrate

        say("calibrate", 0, 1)
        _calibrate(path, "builtin", progress=lambda i, n: say("calibrate", i, n))
    return path


def _stage_manifest(w: BundleWriter, manifest: dict) -> Bundle:
    """Write a provisional manifest into the staging directory and open it (hashes are rewritten at commit)."""
    import json

    from edge_sel.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file

    files = {}
    for p in sorted(w.staging.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(w.staging).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    (w.staging / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}))
    return Bundle.open(w.staging)


def sample_texts() -> tuple[list[str], list[str]]:
    from edge_sel.export.textdata import docstring_pairs

    pairs = docstring_pairs(limit=40)
    queries = [q for q, _ in pairs[:3]]
    docs = [d for _, d in pairs[:12]]
    return queries, docs


def verify_bundle(bundle: Bundle, adapter, torch_model, split) -> float:
    """Largest |score difference| between the bundle (edge_sel runtime) and torch over sample queries."""
    from edge_sel.runtime import Reranker

    queries, docs = sample_texts()
    rr = Reranker(bundle, pruning="off")
    worst = 0.0
    for q in queries:
        enc = rr.encoder.encode(q, docs)
        mine = rr.score_encoded(enc)
        ref = adapter.reference_scores(torch_model, enc.doc_ids, enc.doc_types, split, query_ids=enc.query_ids)
        worst = max(worst, float(np.max(np.abs(mine - ref))))
    rr.close()
    return worst


__all__ = ["export", "verify_bundle", "ExportVerificationError", "VERIFY_TOLERANCE"]


# `edge_sel.export` is both this subpackage and the public function `edge_sel.export(model, out, ...)`:
# importing the subpackage rebinds the attribute on `edge_sel`, so make the module itself callable.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
