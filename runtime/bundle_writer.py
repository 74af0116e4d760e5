"""Writing a bundle atomically: stage every file in a sibling directory, hash them into the manifest, rename into place.

Whatever happens (an exception, SIGTERM, a full disk), the target is either the old bundle or the complete new one;
a folder that is not a bundle is never replaced. Every exporter and bundle-rewriting pass writes through
:class:`BundleWriter`; reading is :mod:`edge_sel.runtime.bundle`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import RESERVED, STAMP, Bundle, is_bundle, sha256_file, write_manifest
from .errors import BundleError
from .manifest import CREATED_BY, FORMAT, MANIFEST, Manifest, required_version
from .siblings import backup_path, staging_dir, sweep

__all__ = ["BundleWriter"]


class BundleWriter:
    """Stage a bundle in a sibling directory; :meth:`commit` writes the manifest (sizes and hashes of every staged
    file) and renames it into place, replacing only an existing bundle. On error or interruption the target is left as
    it was; siblings of writers that died are tidied by the next writer (:mod:`edge_sel.runtime.siblings`).

    >>> with BundleWriter(out, overwrite=True) as w:
    ...     write files under w.staging ...
    ...     w.commit(manifest)
    """

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = Path(target).expanduser().absolute()
        self.overwrite = overwrite
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BundleError(f"cannot create {self.target.parent}: {e.strerror}") from None
        sweep(self.target.parent, is_bundle)  # siblings left by dead writers; may restore a stranded target
        self.check_target(self.target, overwrite)
        self.staging = staging_dir(self.target)
        self.committed = False
        self.backup: Path | None = None

    @staticmethod
    def check_target(target: str | os.PathLike, overwrite: bool) -> None:
        """Refuse a target that exists, unless ``overwrite`` and it is an edge_sel bundle: anything else there (a
        folder of the user's files, a file) is never replaced."""
        target = Path(target).expanduser()
        if not os.path.lexists(target):
            return
        if not overwrite:
            raise BundleError(f"{target} already exists; pass overwrite=True / --force to replace it")
        if not is_bundle(target):
            raise BundleError(f"{target} exists and is not an edge_sel bundle (no valid {MANIFEST}); "
                              "--force only replaces a bundle, so choose another output path")

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            if self.backup is not None and not os.path.lexists(self.target):
                os.replace(self.backup, self.target)  # interrupted between the two renames: put the old one back
            shutil.rmtree(self.staging, ignore_errors=True)

    def file(self, rel: str) -> Path:
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def link_from(self, src: "Bundle", rels) -> None:
        """Hard-link the files ``rels`` of ``src`` into the staged bundle (copied where linking is impossible). A file
        rewritten later in staging must be replaced (a new inode, ``os.replace``), never written through the link."""
        for rel in rels:
            dst = self.file(rel)
            try:
                os.link(src.path(rel), dst)
            except OSError:
                shutil.copy2(src.path(rel), dst)

    def write_array(self, rel: str, array: np.ndarray) -> dict[str, Any]:
        arr = np.ascontiguousarray(array)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        arr.tofile(self.file(rel))
        return {"file": rel, "dtype": arr.dtype.name, "shape": list(arr.shape)}

    def commit(self, manifest: dict[str, Any] | Manifest) -> Path:
        """Hash every staged file, write the manifest (``format``, ``format_version``, ``created_by`` and ``files`` are
        filled in) and its digest, check the staged bundle, rename it into place and stamp it as verified."""
        if isinstance(manifest, Manifest):
            manifest = manifest.to_dict()
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(self.staging.rglob("*")):
            rel = p.relative_to(self.staging).as_posix()
            if p.is_file() and rel not in RESERVED:
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {"format": FORMAT, "created_by": CREATED_BY, **manifest, "files": files}
        manifest["format_version"] = required_version(manifest)  # the oldest that holds it, whatever a pass carried
        (self.staging / STAMP).unlink(missing_ok=True)
        write_manifest(self.staging, manifest)
        Bundle.open(self.staging, verify=False).check_graph_data()  # structural self-check before it becomes visible
        if os.path.lexists(self.target):
            self.check_target(self.target, self.overwrite)  # it may have changed since the writer started
            self.backup = backup_path(self.target)
            os.replace(self.target, self.backup)
        os.replace(self.staging, self.target)
        self.committed = True
        if self.backup is not None:
            shutil.rmtree(self.backup, ignore_errors=True)
        # this writer hashed every file itself: stamp the bundle as verified (after the old bundle is gone, since
        # removing it changes the ctime of files the new one shares through hard links)
        Bundle.open(self.target, verify=False).mark_verified()
        return self.target
