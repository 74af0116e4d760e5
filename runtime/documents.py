"""Read a documents file: plain text (one document per non-empty line) or JSONL with a ``text`` field.

The rule: a ``.jsonl`` / ``.ndjson`` file is JSONL (every line an object with a non-blank string ``text``);
any other file is JSONL when every non-empty line parses as a JSON object (each then needs that ``text``),
otherwise plain text, so a text line that merely starts with ``{`` stays a document.

:class:`DocumentsFile` never holds the whole file: one pass up front checks every line (so a bad line is refused
before any model work), then the engine reads the documents again in order, batch by batch, as it consumes them.
A line may hold at most :data:`MAX_LINE_BYTES`, a file at most :data:`MAX_FILE_BYTES`. Input that cannot be read
twice (a pipe, ``/dev/stdin``; ``-`` names standard input) is copied while it is checked into an unnamed temporary
file, which the system removes even when the process is killed.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import InputError
from .units import format_size

MAX_LINE_BYTES = 1 << 20   # one document; a reranker reads at most its first max_length tokens (a few KiB of text)
MAX_FILE_BYTES = 4 << 30


class DocumentsFile:
    """The documents of a file, read as a stream: ``len()``, iteration in file order, :meth:`texts` for a few.

    >>> with DocumentsFile("docs.txt") as docs:
    ...     Reranker(bundle).rank("query", docs)
    """

    def __init__(self, path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES,
                 max_file_bytes: int = MAX_FILE_BYTES, spool_dir: str | os.PathLike | None = None):
        stdin = str(path) == "-"  # the usual name of standard input (`... | edge-sel rerank B -q Q -d -`)
        p = self.path = Path("<stdin>") if stdin else Path(path)
        self.max_line_bytes, self.max_file_bytes = int(max_line_bytes), int(max_file_bytes)
        if not stdin and p.is_dir():
            raise InputError(f"{p} is a folder; --documents takes a file (one document per line, or JSONL)")
        if not stdin and not p.exists():
            raise InputError(f"documents file not found: {p}")
        try:
            src = os.fdopen(os.dup(0), "rb") if stdin else open(p, "rb")  # a copy of fd 0: closing it leaves stdin
        except OSError as e:
            raise InputError(f"cannot read {p}: {e.strerror}") from None
        try:
            if stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                size = os.fstat(src.fileno()).st_size
                if size > self.max_file_bytes:
                    raise InputError(f"{p} is {format_size(size)}; a documents file may hold at most "
                                     f"{format_size(self.max_file_bytes)} (split it into several calls)")
                self._file, spool = src, None
            else:  # a pipe or device: read once, so keep a private copy for the later passes
                self._file = spool = tempfile.TemporaryFile(dir=spool_dir)
            self.jsonl, self.n = self._scan(src, spool)
        except BaseException:
            self.close()
            src.close()
            raise
        if spool is not None:
            src.close()

    # ---- reading -------------------------------------------------------------------------------
    def _lines(self, f: BinaryIO, spool: BinaryIO | None = None) -> Iterator[tuple[int, str]]:
        """``(file line number, line)`` for every non-blank line, checking length, size and encoding."""
        total, number = 0, 0
        while True:
            raw = f.readline(self.max_line_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > self.max_line_bytes and not raw.endswith(b"\n"):
                raise InputError(f"{self.path}: line {number} is longer than {format_size(self.max_line_bytes)}; "
                                 f"a document is one line of at most that size (a reranker reads only its first tokens)")
            if spool is not None:
                if total + len(raw) > self.max_file_bytes:
                    raise InputError(f"{self.path} holds more than {format_size(self.max_file_bytes)}; "
                                     f"a documents file may hold at most that (split it into several calls)")
                spool.write(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{self.path} is not UTF-8 text (byte {total + e.start}: {e.reason}); "
                                 f"convert it, e.g. `iconv -t UTF-8`") from None
            total += len(raw)
            for ln in text.splitlines():  # the same line breaks str.splitlines knows, as a whole-file read had
                if ln.strip():
                    yield number, ln

    def _scan(self, f: BinaryIO, spool: BinaryIO | None) -> tuple[bool, int]:
        """One pass: the file's kind (JSONL or plain text) and its number of documents; refuses a bad line."""
        forced = self.path.suffix.lower() in (".jsonl", ".ndjson")
        maybe_jsonl, first_error, n = True, None, 0
        for number, ln in self._lines(f, spool):
            if n == 0 and not forced and not ln.lstrip().startswith("{"):
                maybe_jsonl = False
            n += 1
            if maybe_jsonl:
                obj, error = _parse(self.path, number, ln)
                if forced and error is not None:
                    raise InputError(error)
                if not forced and not isinstance(obj, dict):
                    maybe_jsonl = False  # some line is not an object: the file is plain text
                elif first_error is None:
                    first_error = error
        if n == 0:
            raise InputError(f"{self.path} holds no documents (empty file)")
        if maybe_jsonl and first_error is not None:
            raise InputError(first_error)
        return maybe_jsonl, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[str]:
        self._file.seek(0)
        for _, ln in self._lines(self._file):
            yield json.loads(ln)["text"] if self.jsonl else ln.strip()

    def texts(self, indices) -> dict[int, str]:
        """The documents at ``indices`` (positions among the documents), read in one more pass."""
        want = set(int(i) for i in indices)
        out = {}
        for i, doc in enumerate(self):
            if i in want:
                out[i] = doc
                if len(out) == len(want):
                    break
        return out

    def close(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()
            self._file = None

    def __enter__(self) -> "DocumentsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse(p: Path, number: int, ln: str) -> tuple[object, str | None]:
    """The JSON value of a line and what is wrong with it as a JSONL document (None: nothing)."""
    try:
        obj = json.loads(ln)
    except json.JSONDecodeError as e:
        return None, f"{p}: line {number} is not valid JSON ({e.msg}); JSONL files need one object per line with a 'text' field"
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return obj, f"{p}: line {number} has no string 'text' field"
    if not obj["text"].strip():
        return obj, f"{p}: line {number} is an empty document (its 'text' is blank)"
    return obj, None


def read_documents(path: str | os.PathLike) -> list[str]:
    """Every document of a file as a list (small files; :class:`DocumentsFile` streams)."""
    with DocumentsFile(path) as docs:
        return list(docs)
