"""The bundle: the one thing that crosses from export to runtime (DESIGN §2).

A directory holding ``manifest.json`` plus the files it lists (each with size and sha256):
the embedding table as a raw little-endian array (memory-mapped at run time), one ONNX graph per
kept layer with external weights, a small scoring head graph, ``tokenizer.json``. Nothing in a
bundle is executed (no pickle); opening one checks schema, version, paths and sizes, and
:meth:`Bundle.verify` checks every hash.

This module is torch-free: the runtime opens bundles with it and the exporter writes them with
:class:`BundleWriter` (staged in a temporary directory, renamed into place when complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import BundleError

FORMAT = "edge-sel-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCORINGS = ("yes_no", "cross_encoder", "bi_encoder", "lm")  # "lm": generate bundles (full-vocabulary head)
TASKS = ("rerank", "generate")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safe_relpath(root: Path, rel: str, what: str) -> Path:
    """Resolve ``rel`` inside ``root``; refuse absolute paths, ``..`` and symlinks that escape."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{root / MANIFEST}: {what} has an empty or non-string path {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or rel.startswith("~"):
        raise BundleError(f"{root / MANIFEST}: {what} path {rel!r} escapes the bundle directory (refused)")
    full = (root / rel).resolve()
    if root.resolve() not in full.parents and full != root.resolve():
        raise BundleError(f"{root / MANIFEST}: {what} path {rel!r} resolves outside the bundle directory (refused)")
    return full


@dataclass
class ArraySpec:
    file: str
    dtype: str
    shape: tuple[int, ...]


class Bundle:
    """An opened, structurally checked bundle. ``Bundle.open(path)``; ``verify()`` for hashes."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> "Bundle":
        root = Path(path).expanduser()
        if not root.exists():
            raise BundleError(f"bundle not found: {root} (export one with `edge-sel export MODEL -o {root}`)")
        if not root.is_dir():
            raise BundleError(f"{root} is not a bundle directory (expected a folder holding {MANIFEST})")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{root}: no {MANIFEST} — not an edge_sel bundle, or an export that did not finish")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{mpath}: manifest is not valid JSON ({e})") from None
        bundle = cls(root, manifest)
        bundle._check_schema()
        bundle._check_files()
        if verify:
            bundle.verify()
        return bundle

    def _check_schema(self) -> None:
        m, where = self.manifest, self.root / MANIFEST
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise BundleError(f"{where}: not an edge_sel manifest (format={m.get('format') if isinstance(m, dict) else None!r}, expected {FORMAT!r})")
        version = m.get("format_version")
        if not isinstance(version, int):
            raise BundleError(f"{where}: format_version missing or not an integer")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format version {version} is newer than this edge_sel understands "
                f"(max {FORMAT_VERSION}); upgrade edge_sel or re-export the bundle"
            )
        for key in ("model", "dims", "layers", "files", "tokenizer", "embed", "head"):
            if key not in m:
                raise BundleError(f"{where}: required field {key!r} missing")
        if m["model"].get("scoring") not in SCORINGS:
            raise BundleError(f"{where}: model.scoring is {m['model'].get('scoring')!r}, expected one of {SCORINGS}")
        if m["model"].get("task") not in TASKS:
            raise BundleError(f"{where}: model.task is {m['model'].get('task')!r}, expected one of {TASKS}")
        if not isinstance(m["layers"], list) or not m["layers"]:
            raise BundleError(f"{where}: bundle has no layers")

    def _referenced(self) -> list[tuple[str, str]]:
        m = self.manifest
        refs = [(m["tokenizer"]["file"], "tokenizer"), (m["embed"]["file"], "embed"), (m["head"]["file"], "head")]
        for name, spec in m.get("arrays", {}).items():
            refs.append((spec["file"], f"array {name}"))
        for layer in m["layers"]:
            refs.append((layer["file"], f"layer {layer['index']}"))
            if layer.get("weights"):
                refs.append((layer["weights"], f"layer {layer['index']} weights"))
        for name, spec in m.get("extra_graphs", {}).items():
            refs.append((spec["file"], f"graph {name}"))
            if spec.get("weights"):
                refs.append((spec["weights"], f"graph {name} weights"))
        return refs

    def _check_files(self) -> None:
        files = self.manifest["files"]
        if not isinstance(files, dict):
            raise BundleError(f"{self.root / MANIFEST}: 'files' must map paths to size/sha256")
        for rel, what in self._referenced():
            _safe_relpath(self.root, rel, what)
            if rel not in files:
                raise BundleError(f"{self.root / MANIFEST}: {what} file {rel!r} is not listed in 'files'")
        for rel, info in files.items():
            full = _safe_relpath(self.root, rel, "file")
            if not full.is_file():
                raise BundleError(f"bundle file missing: {full} (listed in {self.root / MANIFEST}); re-export the bundle")
            size = full.stat().st_size
            if size != info.get("size"):
                raise BundleError(f"bundle file {full}: size {size} bytes, manifest expects {info.get('size')} (corrupt or truncated)")

    def verify(self, progress=None) -> None:
        """Check every file's sha256 against the manifest; raise :class:`BundleError` on the first mismatch."""
        for rel, info in self.manifest["files"].items():
            full = self.root / rel
            digest = sha256_file(full)
            if digest != info.get("sha256"):
                raise BundleError(f"bundle file {full}: sha256 {digest[:16]}… does not match manifest {str(info.get('sha256'))[:16]}… (corrupt or modified)")
            if progress:
                progress(rel)

    # ---- accessors -----------------------------------------------------------------------
    @property
    def scoring(self) -> str:
        return self.manifest["model"]["scoring"]

    @property
    def task(self) -> str:
        return self.manifest["model"]["task"]

    @property
    def family(self) -> str:
        return self.manifest["model"]["family"]

    @property
    def dims(self) -> dict[str, int]:
        return self.manifest["dims"]

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.manifest["layers"]

    def path(self, rel: str) -> Path:
        return _safe_relpath(self.root, rel, "file")

    def layer_path(self, i: int) -> Path:
        return self.path(self.layers[i]["file"])

    def layer_weight_bytes(self, i: int) -> int:
        layer = self.layers[i]
        total = self.manifest["files"][layer["file"]]["size"]
        if layer.get("weights"):
            total += self.manifest["files"][layer["weights"]]["size"]
        return total

    def array(self, name: str) -> np.ndarray:
        """Memory-map an array listed in the manifest (``embed`` or one of ``arrays``); read-only."""
        spec = self.manifest["embed"] if name == "embed" else self.manifest.get("arrays", {}).get(name)
        if spec is None:
            raise BundleError(f"{self.root / MANIFEST}: no array named {name!r}")
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        shape = tuple(int(s) for s in spec["shape"])
        expected = int(np.prod(shape)) * dtype.itemsize
        full = self.path(spec["file"])
        if full.stat().st_size != expected:
            raise BundleError(f"{full}: {full.stat().st_size} bytes, but shape {shape} {dtype} needs {expected}")
        return np.memmap(full, dtype=dtype, mode="r", shape=shape)

    def has_array(self, name: str) -> bool:
        return name in self.manifest.get("arrays", {})

    def total_bytes(self) -> int:
        return sum(int(v["size"]) for v in self.manifest["files"].values())

    def __repr__(self) -> str:
        m = self.manifest["model"]
        return f"Bundle({str(self.root)!r}, {m.get('name')}, {m['scoring']}, {len(self.layers)} layers)"


class BundleWriter:
    """Stage a bundle in a temporary sibling directory; :meth:`commit` writes the manifest (with sizes and
    hashes of every staged file) and renames it into place. On error or interruption the staging
    directory is removed and the target path is left as it was.

    >>> with BundleWriter(out, overwrite=True) as w:
    ...     write files under w.staging ...
    ...     w.commit(manifest)
    """

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = Path(target).expanduser().absolute()
        self.overwrite = overwrite
        if self.target.exists() and not overwrite:
            raise BundleError(f"{self.target} already exists; pass overwrite=True / --force to replace it")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def file(self, rel: str) -> Path:
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_array(self, rel: str, array: np.ndarray) -> dict[str, Any]:
        arr = np.ascontiguousarray(array)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        arr.tofile(self.file(rel))
        return {"file": rel, "dtype": arr.dtype.name, "shape": list(arr.shape)}

    def commit(self, manifest: dict[str, Any]) -> Path:
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(self.staging.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.staging).as_posix()
                if rel == MANIFEST:
                    continue
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
        tmp_manifest = self.staging / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(tmp_manifest, self.staging / MANIFEST)
        Bundle.open(self.staging)  # structural self-check before it becomes visible
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.staging, self.target)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target
