"""Manifest nodes: JSON read with errors naming the field, into frozen typed nodes that write the same JSON back."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import BundleError


MANIFEST = "manifest.json"


# ---- reading JSON values with errors that name the field ---------------------------------------------------------
class Reader:
    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, msg: str):
        raise BundleError(f"{self.where}: {path}: {msg}")

    def obj(self, v, path: str) -> dict:
        if not isinstance(v, dict):
            self.fail(path, f"expected an object, got {show(v)}")
        return v

    def str(self, v, path: str, optional: bool = False, choices: tuple | None = None, nonempty: bool = True):
        if v is None and optional:
            return None
        if not isinstance(v, str):
            self.fail(path, f"expected a string{' or null' if optional else ''}, got {show(v)}")
        if nonempty and not v:
            self.fail(path, "expected a non-empty string, got ''")
        if choices is not None and v not in choices:
            self.fail(path, f"{v!r} is not one of {', '.join(choices)}")
        return v

    def int(self, v, path: str, lo: int | None = None, hi: int | None = None, optional: bool = False):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(path, f"expected an integer{' or null' if optional else ''}, got {show(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            self.fail(path, f"expected an integer {rng}, got {v}")
        return v

    def float(self, v, path: str, positive: bool = False, optional: bool = False):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(path, f"expected a finite number{' or null' if optional else ''}, got {show(v)}")
        if positive and v <= 0:
            self.fail(path, f"expected a positive number, got {v}")
        return float(v) if isinstance(v, float) else v

    def bool(self, v, path: str):
        if not isinstance(v, bool):
            self.fail(path, f"expected true or false, got {show(v)}")
        return v

    def fraction(self, v, path: str, optional: bool = False):
        v = self.float(v, path, optional=optional)
        if v is not None and not 0 <= v <= 1:
            self.fail(path, f"expected a fraction in [0, 1], got {v}")
        return v

    def free(self, v, path: str):
        """A free-form JSON object (facts for people, not read by the runtime), frozen."""
        return freeze(self.obj(v, path))

    def list(self, v, path: str, item, nonempty: bool = False) -> tuple:
        if not isinstance(v, list) or (nonempty and not v):
            self.fail(path, f"expected a{' non-empty' if nonempty else ''} list, got {show(v)}")
        return tuple(item(x, f"{path}[{i}]") for i, x in enumerate(v))

    def path(self, v, path: str, optional: bool = False):
        """A file path inside the bundle: relative, POSIX, no ``..``, no ``~``, no backslash."""
        if v is None and optional:
            return None
        rel = self.str(v, path, optional=optional)
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or "\\" in rel or rel.startswith("~") or "\x00" in rel:
            self.fail(path, f"path {rel!r} escapes the bundle directory (refused)")
        return rel


def show(v) -> str:
    if isinstance(v, (dict, list)):
        return f"{'an object' if isinstance(v, dict) else 'a list'} {str(v)[:60]}"
    return repr(v) if not isinstance(v, str) else repr(v[:60])


def freeze(v):
    """Free-form JSON as read-only values (objects -> mappingproxy, lists -> tuples)."""
    if isinstance(v, dict):
        return MappingProxyType({k: freeze(x) for k, x in v.items()})
    if isinstance(v, list):
        return tuple(freeze(x) for x in v)
    return v


def thaw(v):
    """Back to plain JSON values (also turns typed nodes into their dicts)."""
    if isinstance(v, Node):
        return v.to_dict()
    if isinstance(v, Mapping):
        return {k: thaw(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [thaw(x) for x in v]
    return v


# ---- the node base: JSON round trip ------------------------------------------------------------------------------
def json_field(kind, default=dataclasses.MISSING, **opts):
    """A field :meth:`Node.read` fills from the JSON key of its name, with ``kind``: a :class:`Reader` method
    (``opts`` are its options; ``"list"`` takes ``of=`` the item's method, ``nonempty=`` and the item's options)
    or a :class:`Node` class. ``default`` is also the JSON's value when the key is absent; a None default makes
    the field optional (null or absent)."""
    return field(default=default, metadata={"json": (kind, opts)})


_SAY_NULL = ("str", "int", "float", "path", "fraction")  # readers that accept null themselves ("... or null")


def _read_field(r: Reader, d: dict, p: str, f: dataclasses.Field):
    kind, opts = f.metadata["json"]
    key, q = f.name, f"{p}.{f.name}"
    if f.default is None:
        if kind in _SAY_NULL:
            opts = {**opts, "optional": True}
        elif d.get(key) is None:
            return None
    v = d.get(key, None if f.default is dataclasses.MISSING else thaw(f.default))
    if isinstance(kind, type):
        return kind.read(r, v, q)
    if kind == "list":
        item = {k: x for k, x in opts.items() if k not in ("of", "nonempty")}
        read_item = getattr(r, opts["of"])
        return r.list(v, q, lambda x, iq: read_item(x, iq, **item), nonempty=opts.get("nonempty", False))
    return getattr(r, kind)(v, q, **opts)


@dataclass(frozen=True, kw_only=True)
class Node:
    """A manifest object. ``unknown``: keys this version does not know (kept and written back); ``_keys``: keys the
    parsed JSON held, so that defaults filled in at parse time are not written back where the JSON had none.

    A field declared with :func:`json_field` is read by the generic :meth:`read`; the others (values checked
    against each other) by the class's :meth:`_read_first`, before the declared ones."""

    unknown: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)
    _keys: frozenset = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        implied = self._implied()
        for f in dataclasses.fields(self):
            if f.name in ("unknown", "_keys"):
                continue
            v = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            default = implied.get(f.name, default)
            if f.name in self._keys or default is dataclasses.MISSING or v != default:
                out[f.name] = thaw(v)
        out.update(thaw(self.unknown))
        return out

    def replace(self, **changes) -> "Node":
        """A copy with ``changes`` (typed nodes or plain JSON values), parsed and validated again."""
        d = self.to_dict()
        d.update({k: thaw(v) for k, v in changes.items()})
        return type(self).parse(d, type(self).__name__)

    @classmethod
    def parse(cls, d: Any, where: str = MANIFEST, path: str = "") -> "Node":
        """Validate the JSON object ``d`` as this part; errors name ``where`` and the field ``path`` (e.g. "schedule")."""
        return cls.read(Reader(str(where)), d, path or cls.__name__)

    @classmethod
    def read(cls, r: Reader, v, p: str) -> "Node":
        d = r.obj(v, p)
        return cls(**cls._read_declared(r, d, p, cls._read_first(r, d, p)), **cls._base(d))

    @classmethod
    def _read_first(cls, r: Reader, d: dict, p: str) -> dict[str, Any]:
        """The fields that are not declared with :func:`json_field`, read and checked against each other."""
        return {}

    @classmethod
    def _read_declared(cls, r: Reader, d: dict, p: str, done: dict[str, Any], names: tuple = ()) -> dict[str, Any]:
        """``done`` + the declared fields not in it (only ``names`` when given), in declaration order."""
        out = dict(done)
        for f in dataclasses.fields(cls):
            if "json" in f.metadata and f.name not in done and (not names or f.name in names):
                out[f.name] = _read_field(r, d, p, f)
        return out

    def _implied(self) -> dict[str, Any]:
        """Defaults that depend on other fields (written back only when they differ)."""
        return {}

    @classmethod
    def _base(cls, d: dict) -> dict:
        known = {f.name for f in dataclasses.fields(cls)} - {"unknown", "_keys"}  # the JSON keys are the field names
        return {"unknown": freeze({k: v for k, v in d.items() if k not in known}), "_keys": frozenset(d)}
