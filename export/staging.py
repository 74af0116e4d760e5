"""Staged bundles on the export side: open a bundle before it is committed, and carry unchanged files into a new one.

Everything that writes a bundle goes through :class:`edge_sel.runtime.bundle_writer.BundleWriter` (a staging directory
renamed into place by ``commit``), so a reader sees the old bundle or the new one, never a mixture. A pass that
rewrites a bundle in place stages the whole new bundle — unchanged files hard-linked, changed ones written anew —
and commits it over the old path.
"""

from __future__ import annotations

import json
from typing import Iterable

from edge_sel.runtime.bundle import Bundle, sha256_file
from edge_sel.runtime.bundle_writer import BundleWriter
from edge_sel.runtime.manifest import CREATED_BY, FORMAT, MANIFEST, Manifest, required_version


def stage_manifest(w: BundleWriter, manifest: dict | Manifest) -> Bundle:
    """Write a provisional manifest into the staging directory and open it (to verify or measure the staged bundle
    before it is committed; ``commit`` rewrites the manifest with the final file list and hashes)."""
    if isinstance(manifest, Manifest):
        manifest = manifest.to_dict()
    files = {}
    for p in sorted(w.staging.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(w.staging).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    staged = {"format": FORMAT, "created_by": CREATED_BY, **manifest, "files": files}
    staged["format_version"] = required_version(staged)
    (w.staging / MANIFEST).write_text(json.dumps(staged))
    return Bundle.open(w.staging)


def link_files(src: Bundle, w: BundleWriter, rels: Iterable[str]) -> None:
    """Hard-link the files ``rels`` of ``src`` into the staged bundle (:meth:`BundleWriter.link_from`)."""
    w.link_from(src, rels)