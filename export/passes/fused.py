"""Add a fused graph to a rerank bundle: one ONNX file that runs the whole early-ranking call (``edge-sel fuse``,
``edge-sel export ... --fused``).

The graph is composed from the bundle's own graphs by :func:`edge_sel.export.fused_rerank.build_fused` with the
bundle's calibrated schedule compiled in (none: no pruning). It holds no weights: every initializer is external
data in a file the bundle already lists (layer weights, the raw embedding table, the probe), so the bundle grows by
the graph's structure only. The manifest's ``fused`` entry names the file, its I/O and the schedule it holds.
A pass that later changes the schedule, the layers or the weights removes the entry (it would no longer match).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.bundle_writer import BundleWriter
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.manifest import thaw
from edge_sel.runtime.rerank.schedule import Schedule

from ..fused_rerank import build_fused
from ..staging import link_files
from .rewrite import editable_manifest, rewriting

FUSED_FILE = "fused.onnx"   # in the bundle's root: its external-data locations are the bundle's own paths


def fused_entry(bundle: Bundle, schedule: Schedule | None, info: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The manifest's ``fused`` object."""
    import onnxruntime

    return {"file": FUSED_FILE, "inputs": info["inputs"], "outputs": info["outputs"], "reads": info["reads"],
            "top_k": int(schedule.top_k) if schedule is not None else None, "groups": info["groups"],
            "schedule": schedule.to_manifest() if schedule is not None else None,
            "onnxruntime": onnxruntime.__version__, "seconds": round(seconds, 2)}


def write_fused(bundle: Bundle, schedule: Schedule | None, target: Path) -> dict[str, Any]:
    """Write ``bundle``'s fused graph with ``schedule`` to ``target`` (a file in the bundle's root, or in a copy of
    it); returns the manifest entry."""
    t0 = time.perf_counter()
    model, info = build_fused(bundle, schedule)
    target.write_bytes(model.SerializeToString())
    return fused_entry(bundle, schedule, info, time.perf_counter() - t0)


def fuse_bundle(path: str | os.PathLike, out: str | os.PathLike | None = None, force: bool = False,
                pruning: bool = True) -> Path:
    """Add the fused graph to the bundle at ``path`` (in place when ``out`` is None, else to a copy at ``out``);
    returns the bundle's path. ``pruning=False`` fuses the whole model without the schedule."""
    src = Bundle.open(path, verify=True)
    stored = src.spec.schedule
    schedule = Schedule.from_manifest(thaw(stored)) if (pruning and stored is not None) else None
    if schedule is not None and not schedule.layers:
        schedule = None  # a calibrated schedule that prunes nowhere: nothing to compile in
    if src.task != "rerank":
        raise InputError(f"{src.root} is a {src.task!r} bundle; a fused graph ranks documents (export with --task rerank)")
    new = editable_manifest(src)
    old = {new["fused"]["file"]} if new.get("fused") else set()
    if out is None:
        with rewriting(src, leave_out=old) as w:
            new["fused"] = write_fused(src, schedule, w.file(FUSED_FILE))
            return w.commit(new)
    with BundleWriter(out, overwrite=force) as w:
        link_files(src, w, [rel for rel in src.spec.files if rel not in old])
        new["fused"] = write_fused(src, schedule, w.file(FUSED_FILE))
        return w.commit(new)
