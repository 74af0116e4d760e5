"""The files a bundle lists (size and SHA-256 digest) and the record of the export that wrote them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .node import Node, json_field as _json, show as _show


_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class ExportInfo(Node):
    seed: int | None = _json("int", None)
    seconds: float | None = _json("float", None)
    verified_max_abs_diff: float | None = _json("float", None)


@dataclass(frozen=True, kw_only=True)
class FileEntry(Node):
    size: int = _json("int", lo=0)
    sha256: str

    @classmethod
    def _read_first(cls, r, d, p):
        digest = r.str(d.get("sha256"), f"{p}.sha256")
        if not _SHA256.fullmatch(digest):
            r.fail(f"{p}.sha256", f"expected 64 lowercase hex digits, got {_show(digest)}")
        return {"sha256": digest}
