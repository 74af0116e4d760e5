"""The graph files: the kept layers, their I/O names (one graph or split qkv/attn graphs), extra graphs and the head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .node import Node, Reader as _Reader, json_field as _json


EMPTY_POS = 2**40             # key position of an empty KV-cache slot: never <= any query position, so always masked


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
