"""Build and cache what the rerank benchmark's configurations load (torch side; runs in its own process).

* the edge_sel bundle, ``$EDGE_SEL_HOME/bundles/bench-<key>`` (exporter defaults, ``verify=True``);
* the peers' model: the exact weights edge_sel exported, loaded by edge_sel's adapter (GGUF
  dequantized to fp32, or a seeded classifier head on a plain encoder) and written with
  ``save_pretrained`` to ``$EDGE_SEL_HOME/peers/<key>/hf`` — the torch peer loads that directory;
* optimum's whole-model ONNX export of that directory (``optimum.exporters.onnx.main_export``,
  local files only) in ``$EDGE_SEL_HOME/peers/<key>/onnx`` — the optimum and bare-onnxruntime peers.

Each step writes into a temporary directory and renames it into place, so an interrupted run
never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from edge_sel.runtime.home import bundles_dir, home

OPTIMUM_TASK = {"yes_no": "text-generation", "cross_encoder": "text-classification", "bi_encoder": "feature-extraction"}


def cache_key(model: str, scoring: str, seed: int) -> str:
    from edge_sel.export.sources import PACKAGED

    if model in PACKAGED:
        base = model
    else:
        p = Path(model).expanduser().resolve()
        base = f"{p.stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
    return f"{base}-{scoring}" + (f"-seed{seed}" if scoring == "cross_encoder" else "")


def _atomic_dir(target: Path, build) -> Path:
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _upgrade(target: Path, log) -> None:
    """Bring a cached rerank bundle with split layers to the exporter's current rerank graph form (same weights, same
    scores within float rounding; see ``edge_sel.export.passes.upgrade.fuse_bundle_attention``) — cheaper than --rebuild."""
    from edge_sel.export.passes.upgrade import fuse_bundle_attention

    if fuse_bundle_attention(target):
        log(f"upgraded {target.name}: current rerank graph form (fused attention over KV heads, RotaryEmbedding)")


def ensure_bundle(model: str, scoring: str | None, seed: int = 0, rebuild: bool = False, log=print) -> Path:
    """The benchmark's own cached bundle, exported with the exporter's defaults (``--rebuild`` re-exports
    it, e.g. after the exporter changed)."""
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.errors import BundleError
    from edge_sel.export.sources import PACKAGED, resolve

    resolved = resolve(model, fetch_missing=True)
    scoring = scoring or (PACKAGED[model].default_scoring if model in PACKAGED else None)
    target = bundles_dir() / ("bench-" + cache_key(model, scoring or "auto", seed))
    if not rebuild:
        try:
            Bundle.open(target)
            _upgrade(target, log)
            return target
        except BundleError:
            pass
    from edge_sel.export import export

    log(f"exporting {model} ({scoring or 'default scoring'}) to {target} ({'rebuild' if rebuild else 'first run only'})")
    export(resolved.spec, target, scoring=scoring, seed=seed, verify=True, overwrite=True)
    return target


def ensure_peers(model: str, scoring: str, seed: int = 0, need_onnx: bool = True, log=print) -> dict[str, str]:
    """``{"peer_hf": dir, "peer_onnx_dir": dir, "peer_onnx": file}`` (ONNX entries only when ``need_onnx``)."""
    from edge_sel.export.adapters import adapter_for_model
    from edge_sel.export.sources import resolve

    root = home() / "peers" / cache_key(model, scoring, seed)
    resolved = resolve(model, fetch_missing=True)

    def save_hf(tmp: Path) -> None:
        log(f"writing the peers' Hugging Face copy of {model} to {root / 'hf'} (first run only)")
        adapter = adapter_for_model(resolved)  # the family the exporter would pick
        m, tok = adapter.load(resolved, scoring, seed)
        m.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "edge_sel_peer.json").write_text(json.dumps({"model": str(resolved.spec), "scoring": scoring, "seed": seed}))

    hf = _atomic_dir(root / "hf", save_hf)
    out = {"peer_hf": str(hf)}
    if not need_onnx:
        return out

    def export_onnx(tmp: Path) -> None:
        log(f"exporting {model} with optimum ({OPTIMUM_TASK[scoring]}) to {root / 'onnx'} (first run only)")
        from optimum.exporters.onnx import main_export

        main_export(str(hf), str(tmp), task=OPTIMUM_TASK[scoring], local_files_only=True, do_validation=False)

    onnx_dir = _atomic_dir(root / "onnx", export_onnx)
    out.update({"peer_onnx_dir": str(onnx_dir), "peer_onnx": str(onnx_dir / "model.onnx")})
    return out


def ensure_variant(base: Path, kind: str, top_k: int, log=print, drop: str = "auto") -> Path:
    """A copy of the benchmark bundle ``base`` with early ranking calibrated for ``top_k`` (``kind="calibrated"``),
    or with layers dropped (``--drop-layers auto``) and then calibrated (``kind="dropped"``); cached beside it.
    Calibration uses the builtin calibration text, disjoint from the benchmark's (runtime/calibrate.py)."""
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.errors import BundleError
    from edge_sel.export.passes.calibrate import calibrate

    if kind not in ("calibrated", "dropped"):
        raise ValueError(f"unknown bundle variant {kind!r}")
    target = base.parent / f"{base.name}-{f'drop{drop}-' if kind == 'dropped' else ''}cal{top_k}"
    try:
        Bundle.open(target)
        _upgrade(target, log)
        return target
    except BundleError:
        if target.exists():
            shutil.rmtree(target)

    def build(tmp: Path) -> None:
        shutil.rmtree(tmp)
        shutil.copytree(base, tmp)
        if kind == "dropped":
            from edge_sel.export.passes.drop_layers import drop_layers

            log(f"dropping layers ({drop}) from a copy of {base.name} (first run only)")
            res = drop_layers(tmp, drop if drop == "auto" else int(drop))
            log(f"  dropped layer positions {res['drop']}")
        log(f"calibrating early ranking (top-{top_k}) on a copy of {base.name} (first run only)")
        rep = calibrate(tmp, "builtin", top_k=top_k)
        log(f"  schedule: {rep.get('schedule')}")

    return _atomic_dir(target, build)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.prepare MODEL SCORING SEED NEED OUT.json [--bundle B|--rebuild] [--variants V] [--top-k K]``
    (used by the parent).

    NEED: ``onnx`` (HF copy + optimum export), ``hf`` (HF copy only) or ``none``; ``--bundle``: use it, don't
    export; ``--rebuild``: re-export the cached bundle; ``--variants calibrated,dropped``: also build the
    calibrated / layer-dropped copies of the bundle (``bundle_calibrated`` / ``bundle_dropped`` in OUT.json).
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m benchmarks.prepare")
    ap.add_argument("model")
    ap.add_argument("scoring")
    ap.add_argument("seed", type=int)
    ap.add_argument("need", choices=["onnx", "hf", "none"])
    ap.add_argument("out")
    ap.add_argument("--bundle")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--variants", default="")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--drop-layers", default="auto")
    a = ap.parse_args(argv)
    scoring = None if a.scoring == "default" else a.scoring
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    bundle = Path(a.bundle) if a.bundle else ensure_bundle(a.model, scoring, a.seed, rebuild=a.rebuild, log=log)
    from edge_sel.runtime.bundle import Bundle

    b = Bundle.open(bundle)
    exported = b.spec.export
    seed = exported.seed if exported is not None and exported.seed is not None else a.seed  # the head the bundle was exported with
    res = {"bundle": str(bundle), "scoring": b.scoring}
    for kind in [v for v in a.variants.split(",") if v]:
        res[f"bundle_{kind}"] = str(ensure_variant(Path(bundle), kind, a.top_k, log=log, drop=a.drop_layers))
    if a.need != "none":
        res.update(ensure_peers(a.model, b.scoring, seed, a.need == "onnx", log=log))
    Path(a.out).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
