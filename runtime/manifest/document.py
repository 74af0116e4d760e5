"""The whole manifest: the Manifest node, its cross-field rules, and the format's name and version rules."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .compiled import GRAPH_FORMATS, CoreMLPackages, FusedGraph, OrtInfo
from .files import ExportInfo, FileEntry
from .graphs import GraphFile, HeadSpec, LayerIO, LayerSpec
from .model import (FINAL_LAYER_OUTPUTS, POOLINGS, SCORE_RULES, ChatSpec, Dims, EmbeddingRule, ModelInfo, PromptSpec,
                    TokenIds)
from .node import MANIFEST, Node, Reader as _Reader, show as _show
from .schedule import DropCost, ScheduleSpec
from .weights import DTYPES, ArraySpec, Quantization, WeightsSpec


FORMAT = "edge-sel-bundle"
FORMAT_VERSION = 2            # the newest version this runtime reads (it writes the oldest that holds a bundle)
MIN_FORMAT_VERSION = 1        # the oldest version this runtime still reads
# Version 2 adds stored weight formats other than float32 (``weights``, an encoded ``embed``): a version-1 reader
# would misread them, so such bundles say 2; float32 bundles keep writing 1 (see :func:`required_version`).


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("edge-sel")
    except (ImportError, PackageNotFoundError):
        return "unknown"


CREATED_BY = f"edge_sel {_package_version()}"


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
