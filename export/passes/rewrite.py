"""Rewriting a bundle in place through the staged writer (:class:`edge_sel.runtime.bundle_writer.BundleWriter`).

The new bundle is staged in a sibling directory — unchanged files hard-linked (copied where linking is
impossible), new files written — and renamed into place by the writer's commit, which hashes every file and
checks the result before it becomes visible. An interrupted pass leaves the bundle as it was.
"""

from __future__ import annotations

import contextlib
import json
from typing import Iterable, Iterator

from edge_sel.runtime.bundle import MANIFEST, Bundle
from edge_sel.runtime.bundle_writer import BundleWriter
from edge_sel.runtime.manifest import editable

from ..staging import link_files

def editable_manifest(bundle: Bundle) -> dict:
    """The bundle's manifest as stored, without the keys the writer sets on commit."""
    return editable(json.loads((bundle.root / MANIFEST).read_text(encoding="utf-8")))


@contextlib.contextmanager
def rewriting(bundle: Bundle, leave_out: Iterable[str] = ()) -> Iterator[BundleWriter]:
    """A writer staging ``bundle``'s files except ``leave_out``; the caller adds files and commits the manifest."""
    skip = set(leave_out)
    stored = bundle.spec.files
    with BundleWriter(bundle.root, overwrite=True) as w:
        link_files(bundle, w, [rel for rel in stored if rel not in skip])
        yield w
