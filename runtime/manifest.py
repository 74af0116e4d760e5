"""The bundle manifest, typed: parsed and validated once, then read as frozen dataclasses.

Over ~400 lines because it is the whole format contract (every field, its type, range and default) in one place.

``Manifest.parse(raw_json_dict, where)`` checks every field's type, range and allowed values and raises
:class:`BundleError` naming the field (``…/manifest.json: layers[3].weights: expected a string or null, got 7``).
Attribute names mirror the JSON keys (``m["model"]["scoring"]`` is ``spec.model.scoring``); optional fields get
their defaults here, so readers never ``.get`` with a fallback. Keys this version does not know are kept
(``unknown``) and written back by :meth:`Node.to_dict`, which reproduces the parsed JSON. Passes that rewrite a
manifest use :meth:`Node.replace` (validated) or ``dataclasses.replace``. ``docs/BUNDLE.md`` specifies the format.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any, Mapping

from .errors import BundleError

FORMAT = "edge-sel-bundle"
FORMAT_VERSION = 2            # the newest version this runtime reads (it writes the oldest that holds a bundle)
MIN_FORMAT_VERSION = 1        # the oldest version this runtime still reads
# Version 2 adds stored weight formats other than float32 (``weights``, an encoded ``embed``): a version-1 reader
# would misread them, so such bundles say 2; float32 bundles keep writing 1 (see :func:`required_version`).
MANIFEST = "manifest.json"
EMPTY_POS = 2**40             # key position of an empty KV-cache slot: never <= any query position, so always masked


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("edge-sel")
    except (ImportError, PackageNotFoundError):
        return "unknown"


CREATED_BY = f"edge_sel {_package_version()}"

TASKS = ("rerank", "generate")
SCORINGS = ("yes_no", "cross_encoder", "bi_encoder", "lm")   # "lm": generate bundles (full-vocabulary head)
TASK_SCORINGS = {"rerank": ("yes_no", "cross_encoder", "bi_encoder"), "generate": ("lm",)}
# raw arrays are little-endian; object, string and structured dtypes are never accepted (bytes are not pointers)
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
EMBEDDING_RULES = ("gather", "bert")
POOLINGS = ("cls", "mean", "last")
SCORE_RULES = ("logit", "cosine", "yes_minus_no_logit")
FINAL_LAYER_OUTPUTS = ("all_tokens", "first_token")
SCHEDULE_METHODS = ("probe", "head", "cosine")
SCHEDULE_RULES = ("margin", "rank", "spread")
GRAPH_FORMATS = ("onnx", "ort")  # ort: onnxruntime's flatbuffer format (mobile and minimal builds), weights inside
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")   # how a bundle stores its weights (``weights.format``)
TABLE_BITS = (4, 8)                                   # an encoded raw array's value width
SCALE_DTYPES = ("float16", "float32")                 # an encoded raw array's scales and mins
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ---- reading JSON values with errors that name the field ---------------------------------------------------------
class _Reader:
    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, msg: str):
        raise BundleError(f"{self.where}: {path}: {msg}")

    def obj(self, v, path: str) -> dict:
        if not isinstance(v, dict):
            self.fail(path, f"expected an object, got {_show(v)}")
        return v

    def str(self, v, path: str, optional: bool = False, choices: tuple | None = None, nonempty: bool = True):
        if v is None and optional:
            return None
        if not isinstance(v, str):
            self.fail(path, f"expected a string{' or null' if optional else ''}, got {_show(v)}")
        if nonempty and not v:
            self.fail(path, "expected a non-empty string, got ''")
        if choices is not None and v not in choices:
            self.fail(path, f"{v!r} is not one of {', '.join(choices)}")
        return v

    def int(self, v, path: str, lo: int | None = None, hi: int | None = None, optional: bool = False):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(path, f"expected an integer{' or null' if optional else ''}, got {_show(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            self.fail(path, f"expected an integer {rng}, got {v}")
        return v

    def float(self, v, path: str, positive: bool = False, optional: bool = False):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(path, f"expected a finite number{' or null' if optional else ''}, got {_show(v)}")
        if positive and v <= 0:
            self.fail(path, f"expected a positive number, got {v}")
        return float(v) if isinstance(v, float) else v

    def bool(self, v, path: str):
        if not isinstance(v, bool):
            self.fail(path, f"expected true or false, got {_show(v)}")
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
            self.fail(path, f"expected a{' non-empty' if nonempty else ''} list, got {_show(v)}")
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


def _show(v) -> str:
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
def _json(kind, default=dataclasses.MISSING, **opts):
    """A field :meth:`Node.read` fills from the JSON key of its name, with ``kind``: a :class:`_Reader` method
    (``opts`` are its options; ``"list"`` takes ``of=`` the item's method, ``nonempty=`` and the item's options)
    or a :class:`Node` class. ``default`` is also the JSON's value when the key is absent; a None default makes
    the field optional (null or absent)."""
    return field(default=default, metadata={"json": (kind, opts)})


_SAY_NULL = ("str", "int", "float", "path", "fraction")  # readers that accept null themselves ("... or null")


def _read_field(r: _Reader, d: dict, p: str, f: dataclasses.Field):
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

    A field declared with :func:`_json` is read by the generic :meth:`read`; the others (values checked against
    each other) by the class's :meth:`_read_first`, before the declared ones."""

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
        return cls.read(_Reader(str(where)), d, path or cls.__name__)

    @classmethod
    def read(cls, r: _Reader, v, p: str) -> "Node":
        d = r.obj(v, p)
        return cls(**cls._read_declared(r, d, p, cls._read_first(r, d, p)), **cls._base(d))

    @classmethod
    def _read_first(cls, r: _Reader, d: dict, p: str) -> dict[str, Any]:
        """The fields that are not declared with :func:`_json`, read and checked against each other."""
        return {}

    @classmethod
    def _read_declared(cls, r: _Reader, d: dict, p: str, done: dict[str, Any], names: tuple = ()) -> dict[str, Any]:
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


# ---- the parts -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ModelInfo(Node):
    scoring: str
    task: str
    name: str | None = _json("str", None, nonempty=False)
    source: str | None = _json("str", None, nonempty=False)
    family: str | None = _json("str", None, nonempty=False)
    model_type: str | None = _json("str", None, nonempty=False)

    @classmethod
    def _read_first(cls, r, d, p):
        task = r.str(d.get("task"), f"{p}.task", choices=TASKS)
        scoring = r.str(d.get("scoring"), f"{p}.scoring", choices=SCORINGS)
        if scoring not in TASK_SCORINGS[task]:
            r.fail(f"{p}.scoring", f"{scoring!r} is not a scoring of task {task!r} (one of {', '.join(TASK_SCORINGS[task])})")
        return {"scoring": scoring, "task": task}


@dataclass(frozen=True, kw_only=True)
class Dims(Node):
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    num_layers: int | None = _json("int", None, lo=1)
    intermediate: int | None = _json("int", None, lo=1)
    vocab: int | None = _json("int", None, lo=1)

    def _implied(self) -> dict[str, Any]:
        return {"kv_heads": self.heads, "head_dim": self.hidden // self.heads}

    @classmethod
    def _read_first(cls, r, d, p):
        hidden = r.int(d.get("hidden"), f"{p}.hidden", lo=1)
        heads = r.int(d.get("heads"), f"{p}.heads", lo=1)
        kv_heads = r.int(d.get("kv_heads", heads), f"{p}.kv_heads", lo=1)
        head_dim = r.int(d.get("head_dim", hidden // heads), f"{p}.head_dim", lo=1)
        if heads % kv_heads:
            r.fail(f"{p}.kv_heads", f"{kv_heads} does not divide heads ({heads})")
        return {"hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


@dataclass(frozen=True, kw_only=True)
class RawArray(Node):
    """A raw little-endian C-order array file (memory-mapped by the runtime)."""

    file: str = _json("path")
    dtype: str = _json("str", choices=DTYPES)
    shape: tuple[int, ...] = _json("list", of="int", lo=0, nonempty=True)

    @property
    def nbytes(self) -> int:
        import numpy as np

        return int(math.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, kw_only=True)
class TableEncoding(Node):
    """A 2-D array stored as block-quantized values (the embedding table at 8 or 4 bits). Row ``r``'s columns
    ``[j*block_size, (j+1)*block_size)`` share ``scales[r, j]`` and, when present, ``mins[r, j]``:
    ``x = q * scale + min``; without mins ``x = q * scale`` (8 bits, ``q`` int8), ``x = (q - 128) * scale`` (8 bits
    stored as uint8) or ``x = (q - 8) * scale`` (4 bits, ``q`` in 0..15). 4-bit values are packed two per byte, the
    even column in the low nibble."""

    bits: int = _json("int", lo=1)
    block_size: int = _json("int", lo=1)
    shape: tuple[int, ...] = _json("list", of="int", lo=1, nonempty=True)   # the decoded array's shape [rows, cols]
    scales: RawArray = _json(RawArray)
    mins: RawArray | None = _json(RawArray, None)
    source: str | None = _json("str", None)   # where the blocks came from: "requantized", "gguf:Q8_0", ...

    def check(self, r: "_Reader", p: str, stored: RawArray) -> None:
        if self.bits not in TABLE_BITS:
            r.fail(f"{p}.bits", f"{self.bits} is not one of {', '.join(map(str, TABLE_BITS))}")
        if len(self.shape) != 2:
            r.fail(f"{p}.shape", f"expected [rows, cols], got {list(self.shape)}")
        rows, cols = self.shape
        if cols % self.block_size or (self.bits == 4 and self.block_size % 2):
            r.fail(f"{p}.block_size", f"{self.block_size} does not divide the {cols} columns into whole (even, at 4 bits) blocks")
        want = ("int8", [rows, cols]) if self.bits == 8 else ("uint8", [rows, cols // 2])
        if self.bits == 8 and (stored.dtype, list(stored.shape)) == ("uint8", [rows, cols]):
            want = ("uint8", [rows, cols])  # 8-bit codes with zero point 128 (MatMulNBits' layout)
        if (stored.dtype, list(stored.shape)) != want:
            r.fail(f"{p}", f"{self.bits}-bit values need a {want[0]} array of shape {want[1]}, got {stored.dtype} {list(stored.shape)}")
        for name, a in (("scales", self.scales), ("mins", self.mins)):
            if a is None:
                continue
            if a.dtype not in SCALE_DTYPES or list(a.shape) != [rows, cols // self.block_size]:
                r.fail(f"{p}.{name}", f"expected {' or '.join(SCALE_DTYPES)} of shape {[rows, cols // self.block_size]}, "
                                      f"got {a.dtype} {list(a.shape)}")


@dataclass(frozen=True, kw_only=True)
class ArraySpec(RawArray):
    """A raw array; ``encoding`` (format version 2, ``embed`` only): stored block-quantized, see :class:`TableEncoding`."""

    encoding: TableEncoding | None = _json(TableEncoding, None)

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape of the values a reader gets (the decoded shape of an encoded array)."""
        return tuple(self.encoding.shape) if self.encoding is not None else tuple(self.shape)

    def parts(self) -> list[RawArray]:
        """Every raw file this array is stored in (values, then scales and mins)."""
        e = self.encoding
        return [self] + ([] if e is None else [a for a in (e.scales, e.mins) if a is not None])


@dataclass(frozen=True, kw_only=True)
class LayerSpec(Node):
    """One kept layer: its graph (``file``, external weights ``weights``), its position in the source model
    (``source_index``) and, for split layers, the key of its qkv graph in ``extra_graphs``."""

    index: int
    source_index: int
    file: str = _json("path")
    weights: str | None = _json("path", None)
    qkv: str | None = _json("str", None)

    def _implied(self) -> dict[str, Any]:
        return {"source_index": self.index}

    @classmethod
    def read(cls, r: _Reader, v, p: str, position: int) -> "LayerSpec":
        d = r.obj(v, p)
        index = r.int(d.get("index", position), f"{p}.index", lo=0)
        if index != position:
            r.fail(f"{p}.index", f"expected {position} (the layer's position in the list), got {index}")
        first = {"index": index, "source_index": r.int(d.get("source_index", index), f"{p}.source_index", lo=0)}
        return cls(**cls._read_declared(r, d, p, first), **cls._base(d))


@dataclass(frozen=True, kw_only=True)
class GraphFile(Node):
    """An ONNX graph file and its external-data file (``weights``, null when the weights are inline)."""

    file: str = _json("path")
    weights: str | None = _json("path", None)


def _names(r: _Reader, v, p: str) -> tuple[str, ...]:
    return r.list(v, p, lambda x, q: r.str(x, q), nonempty=True)


@dataclass(frozen=True, kw_only=True)
class GraphIO(Node):
    inputs: tuple[str, ...] = _json("list", of="str", nonempty=True)
    outputs: tuple[str, ...] = _json("list", of="str", nonempty=True)


@dataclass(frozen=True, kw_only=True)
class HeadSpec(GraphFile):
    inputs: tuple[str, ...] | None = _json("list", None, of="str", nonempty=True)
    outputs: tuple[str, ...] | None = _json("list", None, of="str", nonempty=True)

    @classmethod
    def _read_first(cls, r, d, p):
        return cls._read_declared(r, d, p, {}, names=("inputs", "outputs"))  # the I/O names before the graph file


@dataclass(frozen=True, kw_only=True)
class LayerIO(Node):
    """The layer graphs' I/O names. One graph per layer: ``inputs``/``outputs``. Split layers (decoders): ``qkv`` and
    ``attn`` graphs, ``empty_pos`` (key position of an empty slot), and for rerank bundles the fused-graph markers."""

    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None
    qkv: GraphIO | None = None
    attn: GraphIO | None = None
    empty_pos: int | None = None
    prefix_reuse: bool = _json("bool", False)
    attn_core: str | None = _json("str", None)
    qkv_rotary: str | None = _json("str", None)
    rerank_form: int = _json("int", 0, lo=0)

    @property
    def split(self) -> bool:
        return self.qkv is not None

    def _implied(self) -> dict[str, Any]:
        if self.split:
            return {"inputs": None, "outputs": None, "empty_pos": EMPTY_POS}
        return {"inputs": ("hidden", "mask"), "outputs": ("hidden_out",)}

    @classmethod
    def _read_first(cls, r, d, p):
        qkv = None if d.get("qkv") is None else GraphIO.read(r, d["qkv"], f"{p}.qkv")
        attn = None if d.get("attn") is None else GraphIO.read(r, d["attn"], f"{p}.attn")
        if (qkv is None) != (attn is None):
            r.fail(f"{p}.{'attn' if attn is None else 'qkv'}", "split layers need both 'qkv' and 'attn'")
        plain = qkv is None
        return {"inputs": _names(r, d["inputs"], f"{p}.inputs") if "inputs" in d else (("hidden", "mask") if plain else None),
                "outputs": _names(r, d["outputs"], f"{p}.outputs") if "outputs" in d else (("hidden_out",) if plain else None),
                "qkv": qkv, "attn": attn,
                "empty_pos": r.int(d.get("empty_pos", None if plain else EMPTY_POS), f"{p}.empty_pos", lo=1, optional=plain)}


@dataclass(frozen=True, kw_only=True)
class EmbeddingRule(Node):
    """``gather``: rows of ``embed``. ``bert``: + position (offset by ``position_offset``) and token-type rows, then
    LayerNorm(``ln_weight``, ``ln_bias``, ``layer_norm_eps``)."""

    rule: str = "gather"
    layer_norm_eps: float | None = None
    position_offset: int = _json("int", 0, lo=0)

    @classmethod
    def _read_first(cls, r, d, p):
        rule = r.str(d.get("rule", "gather"), f"{p}.rule", choices=EMBEDDING_RULES)
        eps = r.float(d.get("layer_norm_eps"), f"{p}.layer_norm_eps", positive=True, optional=rule != "bert")
        return {"rule": rule, "layer_norm_eps": eps}


@dataclass(frozen=True, kw_only=True)
class PromptSpec(Node):
    """Yes/no reranking prompt: ``prefix`` (with ``{instruction}`` and ``{query}``) + document + ``suffix``."""

    prefix: str = _json("str", nonempty=False)
    suffix: str = _json("str", nonempty=False)
    instruction: str = _json("str", "", nonempty=False)


@dataclass(frozen=True, kw_only=True)
class TokenIds(Node):
    yes: int = _json("int", lo=0)
    no: int = _json("int", lo=0)


@dataclass(frozen=True, kw_only=True)
class ChatSpec(Node):
    """The chat template rendered around the user text: ``before`` + text + ``after`` (with a system prompt:
    ``system_before`` + system + ``system_between`` + text + ``after``); ``template``: the original Jinja source."""

    before: str = _json("str", nonempty=False)
    after: str = _json("str", nonempty=False)
    template: str | None = _json("str", None, nonempty=False)
    system_before: str | None = _json("str", None, nonempty=False)
    system_between: str | None = _json("str", None, nonempty=False)

    @classmethod
    def _read_first(cls, r, d, p):
        s = cls._read_declared(r, d, p, {}, names=("template", "system_before", "system_between"))
        if (s["system_before"] is None) != (s["system_between"] is None):
            r.fail(f"{p}.system_between", "system_before and system_between come together")
        return s


@dataclass(frozen=True, kw_only=True)
class ScheduleLayer(Node):
    layer: int
    margin: float | None = None
    keep: float | None = None
    spread: float | None = None     # rule "spread": margin in units of the query's score spread near the K-th best


@dataclass(frozen=True, kw_only=True)
class Agreement(Node):
    """How a calibrated schedule did on its calibration data (simulated)."""

    layer_work_saved: float | None = _json("fraction", None)
    topk_recall: float | None = _json("fraction", None)
    topk_identical: float | None = _json("fraction", None)


def _free(r: _Reader, d: dict, key: str, p: str):
    """:meth:`_Reader.free`; null when absent."""
    return None if d.get(key) is None else r.free(d[key], f"{p}.{key}" if p else key)


@dataclass(frozen=True, kw_only=True)
class DropCost(Node):
    """What dropping layers cost, measured on calibration text against the full bundle."""

    top10_overlap: float | None = _json("fraction", None)
    top10_identical: float | None = _json("fraction", None)
    threshold: float | None = _json("float", None)
    requested: int | str | None = None            # a number of layers or "auto"
    block_influence: Mapping[str, float] | None = _json("free", None)   # source index -> influence of the dropped block
    calibration: Mapping[str, Any] | None = _json("free", None)

    @classmethod
    def _read_first(cls, r, d, p):
        req = d.get("requested")
        if req is not None and req != "auto":
            r.int(req, f"{p}.requested", lo=0)
        return {"requested": req}


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec(Node):
    """Early-ranking pruning schedule written by calibration; ``layers[i].layer`` is a position in ``layers``."""

    method: str
    top_k: int
    layers: tuple[ScheduleLayer, ...]
    version: int = 1
    rule: str = "margin"
    floor: int | None = None
    cluster_gap: float = 0.0
    safety: float = 1.0
    probe: str | None = None
    source_layers: tuple[int, ...] | None = None
    calibration: Mapping[str, Any] | None = None     # what it was calibrated on (data, queries, candidates, seed, seconds)
    agreement: Agreement | None = None
    per_layer: tuple[Mapping[str, Any], ...] | None = None  # per layer: spearman / top-k overlap with the final scores
    shadow: Mapping[str, Any] | None = None          # shadow mode's counts when it last tightened this schedule

    @classmethod
    def read(cls, r: _Reader, v, p: str) -> "ScheduleSpec":
        d = r.obj(v, p)
        rule = r.str(d.get("rule", "margin"), f"{p}.rule", choices=SCHEDULE_RULES)

        def layer(x, q):
            e = r.obj(x, q)
            if rule == "rank":
                keep = r.float(e.get("keep"), f"{q}.keep", positive=True)
                if keep > 1:
                    r.fail(f"{q}.keep", f"expected a fraction in (0, 1], got {keep}")
                return ScheduleLayer(layer=r.int(e.get("layer"), f"{q}.layer", lo=0), keep=keep, **ScheduleLayer._base(e))
            key = "spread" if rule == "spread" else "margin"
            margin = r.float(e.get(key), f"{q}.{key}")
            if margin < 0:
                r.fail(f"{q}.{key}", f"expected a number >= 0, got {margin}")
            return ScheduleLayer(layer=r.int(e.get("layer"), f"{q}.layer", lo=0), **{key: margin}, **ScheduleLayer._base(e))

        src = d.get("source_layers")
        return cls(method=r.str(d.get("method", "head"), f"{p}.method", choices=SCHEDULE_METHODS),
                   top_k=r.int(d.get("top_k"), f"{p}.top_k", lo=1), layers=r.list(d.get("layers"), f"{p}.layers", layer),
                   version=r.int(d.get("version", 1), f"{p}.version", lo=1), rule=rule,
                   floor=r.int(d.get("floor"), f"{p}.floor", lo=0, optional=True),
                   cluster_gap=r.float(d.get("cluster_gap", 0.0), f"{p}.cluster_gap"),
                   safety=r.float(d.get("safety", 1.0), f"{p}.safety", positive=True),
                   probe=r.str(d.get("probe"), f"{p}.probe", optional=True),
                   source_layers=None if src is None else r.list(src, f"{p}.source_layers", lambda x, q: r.int(x, q, lo=0)),
                   calibration=_free(r, d, "calibration", p), shadow=_free(r, d, "shadow", p),
                   agreement=None if d.get("agreement") is None else Agreement.read(r, d["agreement"], f"{p}.agreement"),
                   per_layer=None if d.get("per_layer") is None else r.list(d["per_layer"], f"{p}.per_layer",
                                                                          lambda x, q: freeze(r.obj(x, q))),
                   **cls._base(d))


@dataclass(frozen=True, kw_only=True)
class QuantAgreement(Node):
    """A quantized bundle's scores against its float source on the builtin calibration data."""

    data: str | None = _json("str", None)
    queries: int | None = _json("int", None, lo=0)
    candidates: int | None = _json("int", None, lo=0)
    max_abs_score_diff: float | None = _json("float", None)
    top10_overlap: float | None = _json("fraction", None)
    top10_identical: float | None = _json("fraction", None)


@dataclass(frozen=True, kw_only=True)
class Quantization(Node):
    method: str = _json("str")
    weights: str = _json("str")
    per_channel: bool = _json("bool", False)
    ops: tuple[str, ...] = _json("list", (), of="str")
    source_bytes: int | None = _json("int", None, lo=0)
    seconds: float | None = _json("float", None)
    agreement: QuantAgreement | None = _json(QuantAgreement, None)


COREML_PRECISIONS = ("float16", "float32")


@dataclass(frozen=True, kw_only=True)
class CoreMLStage(Node):
    """One CoreML ML Program package (a directory) standing for the ONNX graph ``graph``, with that graph's I/O names."""

    package: str = _json("path")
    graph: str = _json("path")
    inputs: tuple[str, ...] = _json("list", of="str", nonempty=True)
    outputs: tuple[str, ...] = _json("list", of="str", nonempty=True)
    weight_bytes: int | None = _json("int", None, lo=0)


@dataclass(frozen=True, kw_only=True)
class CoreMLPackages(Node):
    """``edge-sel export --format coreml``: a CoreML package per streamed stage (key: ``layer_NNN``, ``qkv_NNN``, ``head``)."""

    stages: Mapping[str, CoreMLStage]
    precision: str = _json("str", choices=COREML_PRECISIONS)
    minimum_deployment_target: str = _json("str")
    converter: str | None = _json("str", None)
    empty_pos: int = _json("int", 2**31 - 1, lo=1)

    @classmethod
    def _read_first(cls, r, d, p):
        raw = r.obj(d.get("stages"), f"{p}.stages")
        if not raw:
            r.fail(f"{p}.stages", "expected at least one stage")
        return {"stages": MappingProxyType({r.str(k, f"{p}.stages key"): CoreMLStage.read(r, v, f"{p}.stages.{k}")
                                            for k, v in raw.items()})}


@dataclass(frozen=True, kw_only=True)
class OrtInfo(Node):
    """ORT-format graphs: the operator configuration a reduced onnxruntime build takes (``--include_ops_by_config``),
    how the graphs were optimized before saving, and the operator set (``{"domain;opset": [ops]}``, informational)."""

    required_operators: str = _json("path")
    optimization_level: str | None = _json("str", None)
    optimization_style: str | None = _json("str", None)
    onnxruntime: str | None = _json("str", None)
    operators: Mapping[str, Any] | None = _json("free", None)
    seconds: float | None = _json("float", None)


@dataclass(frozen=True, kw_only=True)
class FusedGraph(Node):
    """A fused rerank graph (``edge-sel fuse``): the whole early-ranking call in one ONNX file, composed from the
    bundle's graphs, reading its weights as external data from the bundle files ``reads``; ``schedule`` is the
    schedule compiled into it (null: no pruning) and ``top_k`` the K it protects."""

    file: str = _json("path")
    inputs: tuple[str, ...] = _json("list", of="str", nonempty=True)
    outputs: tuple[str, ...] = _json("list", of="str", nonempty=True)
    reads: tuple[str, ...] = _json("list", (), of="path")
    top_k: int | None = _json("int", None, lo=1)
    schedule: Mapping[str, Any] | None = _json("free", None)
    groups: int | None = _json("int", None, lo=1)
    onnxruntime: str | None = _json("str", None)
    seconds: float | None = _json("float", None)


@dataclass(frozen=True, kw_only=True)
class TensorFormat(Node):
    """How one file's weights are stored: ``format`` (fp32/fp16/int8/int4), ``block_size`` (int8/int4: values sharing
    one scale), ``accuracy_level`` (``MatMulNBits``' compute precision: 0 = float activations, 4 = int8 activations),
    ``count`` (matrices stored so), ``source`` (``export``, ``requantized``, ``gguf:Q4_0``/``gguf:Q4_1``/``gguf:Q8_0`` =
    the GGUF's own blocks repacked, never dequantized; ``+requantized`` when some matrices of the file were not found
    in it), ``max_abs_diff`` (GGUF blocks: largest |stored weight - the ``gguf`` package's dequantization|)."""

    format: str = _json("str", choices=WEIGHT_FORMATS)
    block_size: int | None = _json("int", None, lo=1)
    accuracy_level: int | None = _json("int", None, lo=0, hi=4)
    count: int | None = _json("int", None, lo=0)
    source: str | None = _json("str", None)
    max_abs_diff: float | None = _json("float", None)


@dataclass(frozen=True, kw_only=True)
class WeightsSpec(TensorFormat):
    """The bundle's weight format (format version 2 when not fp32): the default ``format`` and, per file (a graph file
    or the embedding table's file), the format its tensors are stored in (``tensors``)."""

    tensors: Mapping[str, TensorFormat] = field(default_factory=lambda: MappingProxyType({}))
    seconds: float | None = _json("float", None)
    agreement: QuantAgreement | None = _json(QuantAgreement, None)   # rerank: scores against the float32 source

    @classmethod
    def _read_first(cls, r, d, p):
        raw = r.obj(d.get("tensors", {}), f"{p}.tensors")
        return {"tensors": MappingProxyType({r.path(k, f"{p}.tensors key"): TensorFormat.read(r, v, f"{p}.tensors[{k!r}]")
                                             for k, v in raw.items()})}


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


@dataclass(frozen=True, kw_only=True)
class Manifest(Node):
    """The whole manifest. ``Manifest.parse(json_dict, where)`` validates; attributes mirror the JSON keys."""

    format: str
    format_version: int
    model: ModelInfo
    dims: Dims
    max_length: int
    embed: ArraySpec
    layers: tuple[LayerSpec, ...]
    head: HeadSpec
    tokenizer: GraphFile            # ``file``: a Hugging Face ``tokenizer.json`` (``weights`` unused)
    files: Mapping[str, FileEntry]
    created_by: str | None = None
    dtype: str = "float32"
    arrays: Mapping[str, ArraySpec] = field(default_factory=lambda: MappingProxyType({}))
    layer_io: LayerIO = field(default_factory=lambda: LayerIO(inputs=("hidden", "mask"), outputs=("hidden_out",)))
    extra_graphs: Mapping[str, GraphFile] = field(default_factory=lambda: MappingProxyType({}))
    dropped_layers: tuple[int, ...] = ()
    drop_cost: DropCost | None = None
    schedule: ScheduleSpec | None = None
    export: ExportInfo | None = None
    quantization: Quantization | None = None
    weights: WeightsSpec | None = None
    coreml: CoreMLPackages | None = None
    graph_format: str = "onnx"
    ort: OrtInfo | None = None
    fused: FusedGraph | None = None
    embedding: EmbeddingRule = field(default_factory=EmbeddingRule)
    pooling: str = "cls"
    score_rule: str | None = None
    final_layer_output: str = "all_tokens"
    pad_id: int = 0
    prompt: PromptSpec | None = None
    token_ids: TokenIds | None = None
    eos_ids: tuple[int, ...] = ()
    chat: ChatSpec | None = None
    stop_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    add_bos: bool = False
    rope_theta: float | None = None
    rms_norm_eps: float | None = None

    # ---- derived views -------------------------------------------------------------------------------------------
    @property
    def scoring(self) -> str:
        return self.model.scoring

    @property
    def task(self) -> str:
        return self.model.task

    def array_spec(self, name: str) -> ArraySpec | None:
        """``embed`` or one of ``arrays``; None when the bundle has no such array."""
        return self.embed if name == "embed" else self.arrays.get(name)

    def qkv_graph(self, i: int) -> GraphFile:
        """Layer ``i``'s qkv graph (split layers only)."""
        return self.extra_graphs[self.layers[i].qkv]

    def referenced(self) -> list[tuple[str, str]]:
        """Every file the manifest points at, with what it is: ``[(path, description)]``."""
        refs = [(self.tokenizer.file, "tokenizer"), (self.head.file, "head")]
        refs += [(a.file, "embed" if i == 0 else "embed blocks") for i, a in enumerate(self.embed.parts())]
        if self.head.weights:
            refs.append((self.head.weights, "head weights"))
        refs += [(a.file, f"array {name}") for name, a in self.arrays.items()]
        for layer in self.layers:
            refs.append((layer.file, f"layer {layer.index}"))
            if layer.weights:
                refs.append((layer.weights, f"layer {layer.index} weights"))
        for name, g in self.extra_graphs.items():
            refs.append((g.file, f"graph {name}"))
            if g.weights:
                refs.append((g.weights, f"graph {name} weights"))
        if self.coreml is not None:  # a package is a directory: its manifest file stands for it
            refs += [(f"{s.package}/Manifest.json", f"CoreML package {k}") for k, s in self.coreml.stages.items()]
        if self.ort is not None:
            refs.append((self.ort.required_operators, "ORT operator configuration"))
        if self.fused is not None:  # its external data must be listed files, as every graph's
            refs += [(self.fused.file, "fused graph")] + [(rel, "fused graph data") for rel in self.fused.reads]
        return refs

    def layer_weight_bytes(self, i: int) -> int:
        """Bytes of layer ``i``'s graph and weights files (its qkv graph not included)."""
        layer = self.layers[i]
        return sum(self.files[f].size for f in (layer.file, layer.weights) if f)

    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def coreml_summary(self) -> dict[str, Any]:
        """The CoreML packages: how many, their precision, bytes on disk and of weights."""
        c = self.coreml
        prefixes = tuple(s.package + "/" for s in c.stages.values())
        return {"packages": len(c.stages), "precision": c.precision,
                "bytes": sum(f.size for rel, f in self.files.items() if rel.startswith(prefixes)),
                "weight_bytes": sum(s.weight_bytes or 0 for s in c.stages.values())}

    # ---- parsing -------------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, d: Any, where: str = MANIFEST) -> "Manifest":
        """Validate the JSON object ``d`` (``where`` names it in errors) and return the typed manifest."""
        r = _Reader(str(where))
        if not isinstance(d, dict):
            r.fail("(top level)", f"expected an object, got {_show(d)}")
        if d.get("format") != FORMAT:
            r.fail("format", f"not an edge_sel manifest (format={_show(d.get('format'))}, expected {FORMAT!r})")
        version = d.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            r.fail("format_version", f"bundle format version {version} is newer than this edge_sel understands "
                                     f"(max {FORMAT_VERSION}); upgrade edge_sel or re-export the bundle")
        r.int(version, "format_version", lo=MIN_FORMAT_VERSION, hi=FORMAT_VERSION)
        for key in ("model", "dims", "max_length", "embed", "layers", "head", "tokenizer", "files"):
            if key not in d:
                r.fail(key, "required field missing")

        def mapping(v, p, read):
            return MappingProxyType({r.str(k, f"{p} key"): read(r, x, f"{p}.{k}") for k, x in r.obj(v, p).items()})

        def opt(key, read):
            return None if d.get(key) is None else read(r, d[key], key)

        def ids(key):
            return r.list(d.get(key, []), key, lambda x, q: r.int(x, q, lo=0))

        layers_raw = d["layers"]
        if not isinstance(layers_raw, list) or not layers_raw:
            r.fail("layers", f"expected a non-empty list (the bundle has no layers), got {_show(layers_raw)}")
        m = cls(
            format=FORMAT, format_version=version,
            created_by=r.str(d.get("created_by"), "created_by", optional=True, nonempty=False),
            model=ModelInfo.read(r, d["model"], "model"),
            dims=Dims.read(r, d["dims"], "dims"),
            dtype=r.str(d.get("dtype", "float32"), "dtype", choices=DTYPES),
            max_length=r.int(d["max_length"], "max_length", lo=1),
            embed=ArraySpec.read(r, d["embed"], "embed"),
            arrays=mapping(d.get("arrays", {}), "arrays", ArraySpec.read),
            layers=tuple(LayerSpec.read(r, x, f"layers[{i}]", i) for i, x in enumerate(layers_raw)),
            layer_io=LayerIO.read(r, d.get("layer_io", {}), "layer_io"),
            extra_graphs=mapping(d.get("extra_graphs", {}), "extra_graphs", GraphFile.read),
            head=HeadSpec.read(r, d["head"], "head"),
            tokenizer=GraphFile.read(r, d["tokenizer"], "tokenizer"),
            dropped_layers=ids("dropped_layers"),
            drop_cost=opt("drop_cost", DropCost.read),
            schedule=opt("schedule", ScheduleSpec.read),
            export=opt("export", ExportInfo.read),
            quantization=opt("quantization", Quantization.read),
            weights=opt("weights", WeightsSpec.read),
            coreml=opt("coreml", CoreMLPackages.read),
            graph_format=r.str(d.get("graph_format", "onnx"), "graph_format", choices=GRAPH_FORMATS),
            ort=opt("ort", OrtInfo.read),
            fused=opt("fused", FusedGraph.read),
            embedding=EmbeddingRule.read(r, d.get("embedding", {}), "embedding"),
            pooling=r.str(d.get("pooling", "cls"), "pooling", choices=POOLINGS),
            score_rule=r.str(d.get("score_rule"), "score_rule", optional=True, choices=SCORE_RULES),
            final_layer_output=r.str(d.get("final_layer_output", "all_tokens"), "final_layer_output", choices=FINAL_LAYER_OUTPUTS),
            pad_id=r.int(d.get("pad_id", 0), "pad_id", lo=0),
            prompt=opt("prompt", PromptSpec.read),
            token_ids=opt("token_ids", TokenIds.read),
            eos_ids=ids("eos_ids"),
            chat=opt("chat", ChatSpec.read),
            stop_ids=ids("stop_ids"),
            bos_id=r.int(d.get("bos_id"), "bos_id", lo=0, optional=True),
            add_bos=r.bool(d.get("add_bos", False), "add_bos"),
            rope_theta=r.float(d.get("rope_theta"), "rope_theta", positive=True, optional=True),
            rms_norm_eps=r.float(d.get("rms_norm_eps"), "rms_norm_eps", positive=True, optional=True),
            files=MappingProxyType({r.path(k, "files key"): FileEntry.read(r, x, f"files[{k!r}]")
                                    for k, x in r.obj(d["files"], "files").items()}),
            **cls._base(d),
        )
        m._check(r)
        return m

    def _check(self, r: _Reader) -> None:
        """Cross-field rules: what each task and scoring needs, and that files and arrays agree."""
        if self.embed.encoding is not None:
            self.embed.encoding.check(r, "embed.encoding", self.embed)
        shape = self.embed.logical_shape
        if len(shape) != 2 or shape[1] != self.dims.hidden:
            r.fail("embed.shape", f"expected [rows, dims.hidden={self.dims.hidden}], got {list(shape)}")
        for name, a in self.arrays.items():
            if a.encoding is not None:
                r.fail(f"arrays.{name}.encoding", "only the embedding table may be stored encoded")
        if self.weights is not None:
            for rel in self.weights.tensors:
                if rel not in self.files:
                    r.fail("weights.tensors", f"names {rel!r}, which is not listed in 'files'")
        if self.format_version < required_version(self):
            r.fail("format_version", f"weights stored as {self.weights.format if self.weights else 'encoded arrays'} "
                                     f"need format version {required_version(self)}, the bundle says {self.format_version}")
        split = [layer.qkv is not None for layer in self.layers]
        if any(split) and not all(split):
            r.fail(f"layers[{split.index(not split[0])}].qkv", "either every layer has a qkv graph or none has")
        for i, layer in enumerate(self.layers):
            if layer.qkv is not None and layer.qkv not in self.extra_graphs:
                r.fail(f"layers[{i}].qkv", f"names {layer.qkv!r}, which is not in extra_graphs")
        if all(split) != self.layer_io.split:
            r.fail("layer_io", "split layers (qkv graphs) need layer_io.qkv and layer_io.attn, and only they have them")
        if self.task == "generate" and not all(split):
            r.fail("layers[0].qkv", "generate bundles need split layers (a qkv graph per layer)")
        if self.fused is not None and (self.task != "rerank" or not self.fused.file.endswith(".onnx")):
            r.fail("fused.file", "a fused graph is an .onnx file of a rerank bundle")
        if self.fused is not None and self.graph_format != "onnx":
            r.fail("fused", "an ORT-format bundle cannot hold a fused graph (it reads the ONNX graphs' weight files, which "
                            "conversion removes); convert a bundle exported without --fused")
        if (self.graph_format == "ort") != (self.ort is not None):
            r.fail("ort", "graph_format 'ort' and the 'ort' object come together")
        if self.scoring == "yes_no" and self.prompt is None:
            r.fail("prompt", "yes/no scoring needs the prompt (prefix, suffix)")
        if self.prompt is not None:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.prompt.prefix) if f is not None}
            if "query" not in fields or not fields <= {"query", "instruction"}:
                r.fail("prompt.prefix", f"expected the placeholders {{query}} and optionally {{instruction}}, got {sorted(fields)}")
        n_source = len(self.layers) + len(self.dropped_layers)
        if self.dims.num_layers is not None and self.dims.num_layers != n_source:
            r.fail("dims.num_layers", f"expected {n_source} (layers + dropped_layers), got {self.dims.num_layers}")
        rows = self.embed.shape[0]
        if self.dims.vocab is not None and self.dims.vocab != rows:
            r.fail("dims.vocab", f"expected the embedding table's {rows} rows, got {self.dims.vocab}")
        named_ids = [("pad_id", self.pad_id), ("bos_id", self.bos_id), *((f"stop_ids[{i}]", t) for i, t in enumerate(self.stop_ids)),
                     *((f"eos_ids[{i}]", t) for i, t in enumerate(self.eos_ids))]
        if self.token_ids is not None:
            named_ids += [("token_ids.yes", self.token_ids.yes), ("token_ids.no", self.token_ids.no)]
        for name, tid in named_ids:
            if tid is not None and tid >= rows:
                r.fail(name, f"token id {tid} is outside the embedding table's {rows} rows")
        if self.embedding.rule == "bert":
            for name in ("position", "ln_weight", "ln_bias"):
                if name not in self.arrays:
                    r.fail(f"arrays.{name}", "required by embedding rule 'bert'")
        s = self.schedule
        if s is not None:
            at = [e.layer for e in s.layers]
            if any(l >= len(self.layers) for l in at) or sorted(set(at)) != at:
                r.fail("schedule.layers", f"layer positions {at} must be strictly increasing and < {len(self.layers)}")
            if s.source_layers is not None and len(s.source_layers) != len(at):
                r.fail("schedule.source_layers", f"expected {len(at)} entries, got {len(s.source_layers)}")
            if s.method == "probe" and (s.probe is None or s.probe not in self.arrays):
                r.fail("schedule.probe", f"names array {s.probe!r}, which is not in arrays")
        if self.coreml is not None:
            graphs = {x.file for x in self.layers} | {g.file for g in self.extra_graphs.values()} | {self.head.file}
            for k, s in self.coreml.stages.items():
                if s.graph not in graphs:
                    r.fail(f"coreml.stages.{k}.graph", f"{s.graph!r} is not a graph of this bundle")
        for rel, what in self.referenced():
            if rel not in self.files:
                r.fail("files", f"{what} file {rel!r} is not listed in 'files'")
        embed_parts = [(f"embed{'' if i == 0 else '.encoding.' + ('scales' if i == 1 else 'mins')}", a)
                       for i, a in enumerate(self.embed.parts())]
        for name, a in [*embed_parts, *((f"arrays.{k}", v) for k, v in self.arrays.items())]:
            if a.nbytes != self.files[a.file].size:
                r.fail(f"{name}.shape", f"shape {list(a.shape)} {a.dtype} needs {a.nbytes} bytes, but files lists "
                                        f"{a.file!r} with {self.files[a.file].size}")


def required_version(m: "Manifest | dict[str, Any]") -> int:
    """The oldest format version that holds this manifest: 2 when weights are stored other than as float32 (an encoded
    embedding table, a ``weights`` format other than fp32), else 1 -- so float32 bundles stay readable by every
    version-1 reader, and a version-1 reader refuses the others instead of misreading them."""
    if isinstance(m, dict):
        w, embed = m.get("weights") or {}, m.get("embed") or {}
        fmt, encoded = w.get("format", "fp32"), embed.get("encoding") is not None
    else:
        fmt, encoded = (m.weights.format if m.weights else "fp32"), m.embed.encoding is not None
    return 2 if encoded or fmt != "fp32" else 1


def graph_entries(raw: dict[str, Any]) -> list[tuple[str, str | None, bool]]:
    """``(file, weights, is_head)`` of every graph a manifest being written names: layers, extra graphs, head."""
    graphs = [*raw["layers"], *raw.get("extra_graphs", {}).values()]
    return [(g["file"], g.get("weights"), False) for g in graphs] + [(raw["head"]["file"], raw["head"].get("weights"), True)]


def embed_entry(raw: dict[str, Any]) -> tuple[str, str, list[int]]:
    """The stored embedding table of a manifest being written: ``(file, dtype, shape)``."""
    e = raw["embed"]
    return e["file"], e["dtype"], list(e["shape"])


def embed_files(raw: dict[str, Any]) -> list[str]:
    """Every file the embedding table of a manifest being written is stored in: values, an encoding's scales and mins."""
    spec = raw["embed"]
    enc = spec.get("encoding") or {}
    return [spec["file"]] + [enc[k]["file"] for k in ("scales", "mins") if enc.get(k)]


def with_weights(raw: dict[str, Any], data: dict[str, str | None], embed: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the graphs' external-data paths ``data`` (graph file -> new weights path), the embedding table
    spec ``embed`` and the ``weights`` record: what a weight-format conversion changes."""
    def moved(g):
        return {**g, "weights": data[g["file"]]} if g["file"] in data and g.get("weights") else g

    return {**raw, "layers": [moved(g) for g in raw["layers"]],
            "extra_graphs": {k: moved(g) for k, g in raw.get("extra_graphs", {}).items()},
            "head": moved(raw["head"]), "embed": embed, "weights": weights,
            **({"fused": None} if raw.get("fused") else {})}  # a fused graph reads the old weights


def with_weights_facts(raw: dict[str, Any], **facts) -> dict[str, Any]:
    """``raw`` with ``facts`` (seconds, agreement) added to its ``weights`` record."""
    return {**raw, "weights": {**raw["weights"], **facts}}


# ---- the edits bundle passes make (they rewrite a stored manifest; the exporter writes whole new ones) ------------
WRITER_KEYS = ("format", "format_version", "files")  # set by BundleWriter.commit


def editable(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored manifest without the keys the bundle writer sets on commit, ready to be edited and committed."""
    return {k: v for k, v in raw.items() if k not in WRITER_KEYS}


def with_schedule(raw: dict[str, Any], schedule: dict[str, Any] | None, probe_name: str,
                  probe: dict[str, Any] | None) -> dict[str, Any]:
    """``raw`` with ``schedule`` stored and the array ``probe_name`` replaced by ``probe`` (or removed)."""
    arrays = {k: v for k, v in raw.get("arrays", {}).items() if k != probe_name}
    if probe is not None:
        arrays[probe_name] = probe
    stale = {"fused": None} if raw.get("fused") else {}  # a fused graph holds the schedule it was built with
    return {**raw, "arrays": arrays, "schedule": schedule, **stale}


def without_layers(raw: dict[str, Any], drop: set[int], cost: dict[str, Any], probe_name: str,
                   files: Any = ()) -> tuple[dict[str, Any], set[str]]:
    """``raw`` without the layers at positions ``drop`` (and their qkv graphs), recording them as dropped; the
    schedule and its probe go (their layer positions no longer hold), and so do CoreML packages (``files``: the
    bundle's listed files, to find the packages' contents). Returns the new manifest and the files it no longer
    references."""
    gone: set[str] = set()
    extra = dict(raw.get("extra_graphs", {}))
    kept, newly = [], []
    for pos, layer in enumerate(raw["layers"]):
        if pos not in drop:
            kept.append({**layer, "index": len(kept)})
            continue
        newly.append(layer.get("source_index", layer["index"]))
        gone.update(x for x in (layer["file"], layer.get("weights")) if x)
        if layer.get("qkv"):
            g = extra.pop(layer["qkv"])
            gone.update(x for x in (g["file"], g.get("weights")) if x)
    out = {**raw, "layers": kept, "extra_graphs": extra, "dropped_layers": sorted(list(raw.get("dropped_layers") or []) + newly),
           "drop_cost": cost}
    if len(raw["layers"]) - 1 in drop and raw.get("final_layer_output") == "first_token":
        out["final_layer_output"] = "all_tokens"  # the first-token graph was the last layer's; a full one ends it now
    if raw.get("schedule"):
        out["schedule"] = None
    if raw.get("coreml"):  # packages are per layer position: they go with the layers' renumbering
        pkgs = [s["package"] + "/" for s in raw["coreml"]["stages"].values()]
        gone.update(f for f in files if any(f.startswith(pk) for pk in pkgs))
        out["coreml"] = None
    if raw.get("fused"):  # compiled from the old layers
        gone.add(raw["fused"]["file"])
        out["fused"] = None
    probe = raw.get("arrays", {}).get(probe_name)
    if probe:
        gone.add(probe["file"])
        out["arrays"] = {k: v for k, v in raw["arrays"].items() if k != probe_name}
    return out, gone


__all__ = ["Manifest", "ModelInfo", "Dims", "ArraySpec", "LayerSpec", "GraphFile", "GraphIO", "HeadSpec", "LayerIO",
           "EmbeddingRule", "PromptSpec", "TokenIds", "ChatSpec", "ScheduleSpec", "ScheduleLayer", "Quantization",
           "ExportInfo", "CoreMLPackages", "FusedGraph", "CoreMLStage", "FileEntry", "RawArray", "TableEncoding", "TensorFormat", "WeightsSpec",
           "WEIGHT_FORMATS", "required_version", "graph_entries", "embed_entry", "embed_files", "with_weights",
           "with_weights_facts", "DropCost", "Agreement", "QuantAgreement", "FORMAT", "FORMAT_VERSION", "MIN_FORMAT_VERSION", "MANIFEST", "EMPTY_POS",
           "CREATED_BY", "DTYPES", "freeze", "thaw", "editable", "with_schedule", "without_layers"]
