"""The bundle: the one thing that crosses from export to runtime.

A directory holding ``manifest.json`` plus the files it lists (each with size and sha256):
the embedding table as a raw little-endian array (memory-mapped at run time), one ONNX graph per
kept layer with external weights, a small scoring head graph, ``tokenizer.json``. Nothing in a
bundle is executed (no pickle); opening one parses and validates the manifest
(:class:`edge_sel.runtime.manifest.Manifest`, exposed as ``bundle.spec``) and checks paths and sizes;
:meth:`Bundle.verify` checks every hash. ``docs/BUNDLE.md`` specifies the format.

This module is torch-free: the runtime opens bundles with it and the exporter writes them with
:class:`BundleWriter` (staged in a temporary directory, renamed into place when complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError
from .manifest import CREATED_BY, FORMAT, FORMAT_VERSION, MANIFEST, SCORINGS, TASKS, Manifest

__all__ = ["Bundle", "BundleWriter", "sha256_file", "FORMAT", "FORMAT_VERSION", "MANIFEST", "SCORINGS", "TASKS"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _inside(root: Path, rel: str, what: str) -> Path:
    """Resolve ``rel`` (already checked to be relative, without ``..``) inside ``root``; refuse symlinks that escape."""
    full = (root / rel).resolve()
    base = root.resolve()
    if base not in full.parents and full != base:
        raise BundleError(f"{root / MANIFEST}: {what} path {rel!r} resolves outside the bundle directory (refused)")
    return full


def read_manifest(root: Path) -> tuple[dict[str, Any], Manifest]:
    """Read and validate ``root/manifest.json``: the raw JSON object and its typed form."""
    mpath = root / MANIFEST
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: manifest is not valid JSON ({e})") from None
    return raw, Manifest.parse(raw, str(mpath))


class Bundle:
    """An opened, checked bundle: ``Bundle.open(path)``; ``verify()`` for hashes.

    ``spec`` is the typed manifest; ``manifest`` the raw JSON object (kept while readers move to ``spec``;
    assigning it re-validates and replaces ``spec``)."""

    def __init__(self, root: Path, manifest: dict[str, Any], spec: Manifest | None = None):
        self.root = root
        self._raw = manifest
        self.spec = spec if spec is not None else Manifest.parse(manifest, str(root / MANIFEST))

    @property
    def manifest(self) -> dict[str, Any]:
        return self._raw

    @manifest.setter
    def manifest(self, raw: dict[str, Any]) -> None:
        self.spec = Manifest.parse(raw, str(self.root / MANIFEST))
        self._raw = raw

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> "Bundle":
        root = Path(path).expanduser()
        if not root.exists():
            raise BundleError(f"bundle not found: {root} (export one with `edge-sel export MODEL -o {root}`)")
        if not root.is_dir():
            raise BundleError(f"{root} is not a bundle directory (expected a folder holding {MANIFEST})")
        if not (root / MANIFEST).is_file():
            raise BundleError(f"{root}: no {MANIFEST} — not an edge_sel bundle, or an export that did not finish")
        raw, spec = read_manifest(root)
        bundle = cls(root, raw, spec)
        bundle._check_files()
        if verify:
            bundle.verify()
        return bundle

    def _check_files(self) -> None:
        """Every listed file exists inside the bundle with its listed size (the manifest already checked that every
        referenced file is listed and that the arrays' shapes match their sizes)."""
        for rel, info in self.spec.files.items():
            full = _inside(self.root, rel, "file")
            if not full.is_file():
                raise BundleError(f"bundle file missing: {full} (listed in {self.root / MANIFEST}); re-export the bundle")
            size = full.stat().st_size
            if size != info.size:
                raise BundleError(f"bundle file {full}: size {size} bytes, manifest expects {info.size} (corrupt or truncated)")

    def verify(self, progress=None) -> None:
        """Check every file's sha256 against the manifest; raise :class:`BundleError` on the first mismatch."""
        for rel, info in self.spec.files.items():
            full = self.root / rel
            digest = sha256_file(full)
            if digest != info.sha256:
                raise BundleError(f"bundle file {full}: sha256 {digest[:16]}… does not match manifest {info.sha256[:16]}… (corrupt or modified)")
            if progress:
                progress(rel)

    # ---- accessors -----------------------------------------------------------------------
    @property
    def scoring(self) -> str:
        return self.spec.model.scoring

    @property
    def task(self) -> str:
        return self.spec.model.task

    @property
    def family(self) -> str | None:
        return self.spec.model.family

    @property
    def dims(self) -> dict[str, int]:
        """The raw ``dims`` object (typed: ``spec.dims``)."""
        return self._raw["dims"]

    @property
    def max_length(self) -> int:
        return self.spec.max_length

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The raw ``layers`` list (typed: ``spec.layers``)."""
        return self._raw["layers"]

    def path(self, rel: str) -> Path:
        if not isinstance(rel, str) or not rel:
            raise BundleError(f"{self.root / MANIFEST}: empty or non-string path {rel!r}")
        if rel not in self.spec.files and rel != MANIFEST:
            raise BundleError(f"{self.root / MANIFEST}: file {rel!r} is not listed in 'files' (refused)")
        return _inside(self.root, rel, "file")

    def layer_path(self, i: int) -> Path:
        return self.path(self.spec.layers[i].file)

    def layer_weight_bytes(self, i: int) -> int:
        return self.spec.layer_weight_bytes(i)

    def array(self, name: str) -> np.ndarray:
        """Memory-map an array listed in the manifest (``embed`` or one of ``arrays``); read-only. Its dtype is from the
        manifest's allow-list and its size was checked against the shape at open."""
        spec = self.spec.array_spec(name)
        if spec is None:
            raise BundleError(f"{self.root / MANIFEST}: no array named {name!r}")
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        full = self.path(spec.file)
        if full.stat().st_size != spec.nbytes:
            raise BundleError(f"{full}: {full.stat().st_size} bytes, but shape {list(spec.shape)} {spec.dtype} needs {spec.nbytes}")
        return np.memmap(full, dtype=dtype, mode="r", shape=spec.shape)

    def has_array(self, name: str) -> bool:
        return name in self.spec.arrays

    def total_bytes(self) -> int:
        return self.spec.total_bytes()

    def __repr__(self) -> str:
        m = self.spec.model
        return f"Bundle({str(self.root)!r}, {m.name}, {m.scoring}, {len(self.spec.layers)} layers)"


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

    def commit(self, manifest: dict[str, Any] | Manifest) -> Path:
        """Hash every staged file, write the manifest (``format``, ``format_version``, ``created_by`` and ``files`` are
        filled in), check the staged bundle and rename it into place."""
        if isinstance(manifest, Manifest):
            manifest = manifest.to_dict()
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(self.staging.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.staging).as_posix()
                if rel == MANIFEST:
                    continue
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": CREATED_BY, **manifest, "files": files}
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
