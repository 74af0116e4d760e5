"""The bundle: the one thing that crosses from export to runtime.
A directory holding ``manifest.json`` plus the files it lists (each with size and sha256):
the embedding table as a raw little-endian array (memory-mapped at run time), one ONNX graph per
kept layer with external weights, a small scoring head graph, ``tokenizer.json``. Nothing in a
bundle is executed (no pickle). ``docs/BUNDLE.md`` specifies the format.

Integrity: ``manifest.json.sha256`` (``sha256sum`` format) covers the manifest's bytes, and the manifest
lists every other file's size and sha256. Opening a bundle parses and validates the manifest
(:class:`edge_sel.runtime.manifest.Manifest`, exposed as ``bundle.spec``) and checks paths and sizes; the
first open also verifies every hash and that each graph's external data is a listed file, then records a
stamp (the manifest's digest and every listed file's size, mtime, ctime and inode), so later opens only
compare ``stat`` results and a changed file is caught before anything runs (``verify=False`` opts out).

This module is torch-free: the runtime opens bundles with it; :mod:`edge_sel.runtime.bundle_writer` writes them
(staged in a temporary directory, renamed into place when complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import BundleError, InputError
from .home import home
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, SCORINGS, TASKS, Manifest, RawArray

__all__ = ["Bundle", "is_bundle", "sha256_file", "write_manifest", "FORMAT", "FORMAT_VERSION", "MANIFEST", "DIGEST",
           "STAMP", "SCORINGS", "TASKS"]

DIGEST = MANIFEST + ".sha256"   # "<sha256 of manifest.json's bytes>  manifest.json\n"
STAMP = ".verified"             # this machine's record of the last full verification (not part of the bundle)
RESERVED = (MANIFEST, DIGEST, STAMP)  # written by the writer itself, never listed in ``files``


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _digest_line(manifest_bytes: bytes) -> str:
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any] | Manifest) -> None:
    """Write ``manifest.json`` and its digest into the bundle directory ``root`` (each file replaced atomically).
    :meth:`edge_sel.runtime.bundle_writer.BundleWriter.commit` uses it in its staging directory, so a committed bundle appears complete or not at
    all; a rewrite in place that is interrupted between the two files leaves a bundle that refuses to open."""
    root = Path(root)
    raw = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    data = json.dumps(raw, indent=1).encode("utf-8")
    _atomic_write(root / MANIFEST, data)
    _atomic_write(root / DIGEST, _digest_line(data).encode("ascii"))


def _graph_data_refs(graph: bytes) -> list[str]:
    """External-data locations an ONNX file names. Each is a ``StringStringEntryProto`` with key ``location``
    (field 1, 8 bytes) followed by its value (field 2, length-delimited); a scan of the serialized graph finds them
    in initializers, constants and subgraphs alike without a protobuf library."""
    refs, key, i = [], b"\x0a\x08location\x12", 0
    while (i := graph.find(key, i)) >= 0:
        j, n, shift = i + len(key), 0, 0
        while j < len(graph):
            b = graph[j]
            n |= (b & 0x7F) << shift
            j += 1
            shift += 7
            if not b & 0x80:
                break
        refs.append(graph[j:j + n].decode("utf-8", "replace"))
        i = j + n
    return refs


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _inside(root: Path, rel: str, what: str) -> Path:
    """Resolve ``rel`` (already checked to be relative, without ``..``) inside ``root``; refuse symlinks that escape."""
    full = (root / rel).resolve()
    base = root.resolve()
    if base not in full.parents and full != base:
        raise BundleError(f"{root / MANIFEST}: {what} path {rel!r} resolves outside the bundle directory (refused)")
    return full


def read_manifest(root: Path) -> tuple[dict[str, Any], Manifest, bytes]:
    """Read and validate ``root/manifest.json``: the raw JSON object, its typed form and the file's bytes."""
    mpath = root / MANIFEST
    data = mpath.read_bytes()
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: manifest is not valid JSON ({e})") from None
    return raw, Manifest.parse(raw, str(mpath)), data


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory whose manifest parses as an edge_sel manifest (files are not checked)."""
    root = Path(path)
    try:
        return not root.is_symlink() and (root / MANIFEST).is_file() and bool(read_manifest(root))
    except (BundleError, OSError, ValueError):
        return False


class Bundle:
    """An opened, checked bundle: ``Bundle.open(path)``; ``verify()`` for hashes.

    ``spec`` is the typed manifest; ``manifest`` the raw JSON object (kept while readers move to ``spec``;
    assigning it re-validates and replaces ``spec``)."""

    def __init__(self, root: Path, manifest: dict[str, Any], spec: Manifest | None = None, manifest_bytes: bytes | None = None):
        self.root = root
        self._raw = manifest
        self.spec = spec if spec is not None else Manifest.parse(manifest, str(root / MANIFEST))
        self._manifest_bytes = manifest_bytes

    @property
    def manifest(self) -> dict[str, Any]:
        return self._raw

    @manifest.setter
    def manifest(self, raw: dict[str, Any]) -> None:
        self.spec = Manifest.parse(raw, str(self.root / MANIFEST))
        self._raw = raw
        self._manifest_bytes = None  # verify() reads the file again

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool | str = "once") -> "Bundle":
        """Open and check the bundle at ``path``. ``verify``: ``"once"`` (default) verifies every hash on the first
        open and whenever a listed file or the manifest changed since (else compares ``stat`` results only);
        ``True`` always verifies; ``False`` checks sizes only (the user's explicit opt-out)."""
        if verify not in (True, False, "once"):
            raise ValueError(f"verify must be True, False or 'once', got {verify!r}")
        root = Path(path).expanduser()
        if not root.exists():
            raise BundleError(f"bundle not found: {root} (export one with `edge-sel export MODEL -o {root}`)")
        if not root.is_dir():
            raise BundleError(f"{root} is not a bundle directory (expected a folder holding {MANIFEST})")
        if not (root / MANIFEST).is_file():
            raise BundleError(f"{root}: no {MANIFEST} — not an edge_sel bundle, or an export that did not finish")
        raw, spec, data = read_manifest(root)
        bundle = cls(root, raw, spec, data)
        bundle._check_files()
        if verify is True or (verify == "once" and not bundle._stamp_holds()):
            bundle.verify()
        return bundle

    def _check_files(self) -> None:
        """Every listed file exists inside the bundle with its listed size (the manifest already checked that every
        referenced file is listed and that the arrays' shapes match their sizes)."""
        for rel, info in self.spec.files.items():
            if rel in RESERVED:
                raise BundleError(f"{self.root / MANIFEST}: 'files' lists {rel!r}, a name the format reserves")
            full = _inside(self.root, rel, "file")
            if not full.is_file():
                raise BundleError(f"bundle file missing: {full} (listed in {self.root / MANIFEST}); re-export the bundle")
            size = full.stat().st_size
            if size != info.size:
                raise BundleError(f"bundle file {full}: size {size} bytes, manifest expects {info.size} (corrupt or truncated)")

    def _current_manifest_bytes(self) -> bytes:
        return self._manifest_bytes if self._manifest_bytes is not None else (self.root / MANIFEST).read_bytes()

    def verify(self, progress=None) -> None:
        """Check the manifest's digest, every file's sha256 and that each graph's external data is a listed file;
        raise :class:`BundleError` on the first problem. Records the stamp that lets later opens skip hashing."""
        data = self._current_manifest_bytes()
        digest = self.root / DIGEST
        if digest.is_file():  # bundles written before the digest existed have none: their files are still checked
            if digest.read_text(encoding="ascii", errors="replace").split()[:1] != [hashlib.sha256(data).hexdigest()]:
                raise BundleError(f"{self.root / MANIFEST}: does not match its digest in {DIGEST} (modified after it was "
                                  f"written, or a rewrite was interrupted); re-export the bundle")
        graphs = {g for g, _ in self._graph_files()}
        for rel, info in self.spec.files.items():
            full = self.root / rel
            if rel in graphs:
                blob = full.read_bytes()
                got = hashlib.sha256(blob).hexdigest()
            else:
                got = sha256_file(full)
            if got != info.sha256:
                raise BundleError(f"bundle file {full}: sha256 {got[:16]}… does not match manifest {info.sha256[:16]}… (corrupt or modified)")
            if rel in graphs:
                self._check_graph_refs(rel, blob)
            if progress:
                progress(rel)
        self._write_stamp(data)

    def check_graph_data(self) -> None:
        """Check, without hashing, that every graph's external data is a file the manifest lists (the writer runs it
        on a staged bundle before it becomes visible)."""
        for rel, _ in self._graph_files():
            self._check_graph_refs(rel, (self.root / rel).read_bytes())

    def mark_verified(self) -> None:
        """Record the verification stamp for the files as they are now (for a writer that hashed every file itself)."""
        self._write_stamp(self._current_manifest_bytes())

    def _graph_files(self) -> list[tuple[str, str]]:
        s = self.spec
        return [(rel, what) for rel, what in s.referenced() if rel.endswith(".onnx")]

    def _check_graph_refs(self, rel: str, blob: bytes) -> None:
        base = PurePosixPath(rel).parent
        for loc in _graph_data_refs(blob):
            target = posixpath.normpath((base / loc).as_posix())
            if PurePosixPath(loc).is_absolute() or target.startswith("../") or target not in self.spec.files:
                raise BundleError(f"bundle graph {self.root / rel} loads external data {loc!r}, which is not a file listed "
                                  f"in {MANIFEST} (refused)")

    # ---- the verification stamp ------------------------------------------------------------
    def _stamp_paths(self) -> list[Path]:
        """In the bundle; for a bundle this process cannot write, under the edge_sel home."""
        key = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:32]
        try:
            return [self.root / STAMP, home() / "verified" / f"{key}.json"]
        except InputError:  # no usable home: the stamp can only live in the bundle
            return [self.root / STAMP]

    def _stamp(self, manifest_bytes: bytes) -> dict[str, Any]:
        return {"manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                "files": {rel: _stat(self.root / rel) for rel in self.spec.files}}

    def _stamp_holds(self) -> bool:
        current = None
        for p in self._stamp_paths():
            try:
                recorded = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            current = current or self._stamp(self._current_manifest_bytes())
            if recorded == current:
                return True
        return False

    def _write_stamp(self, manifest_bytes: bytes) -> None:
        data = json.dumps(self._stamp(manifest_bytes)).encode("utf-8")
        for p in self._stamp_paths():
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(p, data)
                return
            except OSError:
                continue

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
        return self.map_raw(spec)

    def map_raw(self, spec: RawArray) -> np.ndarray:
        """Memory-map one raw array file (an array, or an encoded array's scales or mins) read-only, as stored."""
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
