"""Read a documents file: plain text (one document per non-empty line) or JSONL with a ``text`` field.

The rule: a ``.jsonl`` / ``.ndjson`` file is JSONL (every line an object with a non-blank string ``text``);
any other file is JSONL when every non-empty line parses as a JSON object (each then needs that ``text``),
otherwise plain text, so a text line that merely starts with ``{`` stays a document.
"""

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
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return _jsonl(p, lines)
    if lines[0].lstrip().startswith("{") and all(_is_object(ln) for ln in lines):
        return _jsonl(p, lines)
    return [ln.strip() for ln in lines]


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _jsonl(p: Path, lines: list[str]) -> list[str]:
    docs = []
    for n, ln in enumerate(lines, 1):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: line {n} is not valid JSON ({e.msg}); JSONL files need one object per line with a 'text' field") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError(f"{p}: line {n} has no string 'text' field")
        if not obj["text"].strip():
            raise InputError(f"{p}: line {n} is an empty document (its 'text' is blank)")
        docs.append(obj["text"])
    return docs
