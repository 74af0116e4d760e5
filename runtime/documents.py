"""Read a documents file: plain text (one document per non-empty line) or JSONL with a ``text`` field."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError


def read_documents(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise InputError(f"documents file not found: {p}")
    try:
        raw = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. `iconv -t UTF-8`") from None
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror}") from None
    lines = [ln for ln in raw.splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"{p} holds no documents (empty file)")
    jsonl = p.suffix.lower() in (".jsonl", ".ndjson") or lines[0].lstrip().startswith("{")
    if not jsonl:
        return [ln.strip() for ln in lines]
    docs = []
    for n, ln in enumerate(lines, 1):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: line {n} is not valid JSON ({e.msg}); JSONL files need one object per line with a 'text' field") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError(f"{p}: line {n} has no string 'text' field")
        docs.append(obj["text"])
    return docs
