"""Execution providers: which onnxruntime backend runs a bundle's graphs, chosen from what this build offers.

``choose(request, available)`` is pure (the available list is a platform fact, passed in), so the choice is
tested for any machine. Names: ``"auto"`` (the first accelerator of :data:`AUTO_ORDER` that this build has, else
the CPU), a short name (``"cpu"``, ``"coreml"``, ``"cuda"``, ... :data:`SHORT_NAMES`) or onnxruntime's own
(``"CoreMLExecutionProvider"``). The CPU provider always comes last in the list handed to onnxruntime, so nodes
another provider cannot take fall back to it; :class:`Assignment` records which nodes did.

CoreML (onnxruntime's CoreML execution provider) compiles its share of a graph into an ML Program when the
session is created; the options below are the ones onnxruntime documents for it (``ModelFormat``,
``MLComputeUnits``, ...). Compiling happens per session, so a streamed layer pays it on every load: the
sessions' load time is counted and reported with the provider.

A bundle exported with ``--format coreml`` carries its own ML Program packages. For such a bundle the short name
``"coreml"`` selects the Core ML backend (:mod:`edge_sel.runtime.coreml`: the packages run by Core ML itself, macOS
only) instead of onnxruntime's CoreML provider; onnxruntime's full name ``"CoreMLExecutionProvider"`` still asks for
the provider. :attr:`ProviderChoice.backend` says which.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .errors import InputError

CPU = "CPUExecutionProvider"
COREML = "CoreMLExecutionProvider"
SHORT_NAMES = {
    "cpu": CPU,
    "coreml": COREML,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}
# "auto" takes the first of these the build has: the on-device accelerators this runtime is written for. Builds with
# a server GPU provider are asked for it by name (a 100 MB layer window is no reason to move every layer to a GPU).
AUTO_ORDER = (COREML,)
COREML_COMPUTE_UNITS = ("CPUOnly", "CPUAndNeuralEngine", "CPUAndGPU", "ALL")
COREML_FORMATS = ("MLProgram", "NeuralNetwork")


def coreml_options(compute_units: str = "ALL", model_format: str = "MLProgram", cache_dir: str | None = None,
                   static_shapes: bool = False) -> dict[str, str]:
    """onnxruntime CoreML provider options. ML Program (Core ML 5+, macOS 12+) runs float16 and float32 and more
    operators than the older NeuralNetwork format; shapes stay dynamic (the runtime batches and pads freely)."""
    if compute_units not in COREML_COMPUTE_UNITS:
        raise InputError(f"CoreML compute units {compute_units!r}: choose from {', '.join(COREML_COMPUTE_UNITS)}")
    if model_format not in COREML_FORMATS:
        raise InputError(f"CoreML model format {model_format!r}: choose from {', '.join(COREML_FORMATS)}")
    opts = {"ModelFormat": model_format, "MLComputeUnits": compute_units,
            "RequireStaticInputShapes": "1" if static_shapes else "0"}
    if cache_dir is not None:
        opts["ModelCacheDirectory"] = str(cache_dir)  # compiled models reused across sessions and processes
    return opts


DEFAULT_OPTIONS: Mapping[str, dict[str, str]] = {COREML: coreml_options()}


def short_name(provider: str) -> str:
    for short, full in SHORT_NAMES.items():
        if full == provider:
            return short
    return provider


@dataclass(frozen=True)
class ProviderChoice:
    """The providers handed to onnxruntime, in priority order (the CPU provider last), with their options."""

    requested: str
    providers: tuple[str, ...]
    options: tuple[dict[str, str], ...]
    backend: str = "onnxruntime"  # or "coreml": the bundle's CoreML packages run by Core ML (edge_sel.runtime.coreml)

    @property
    def name(self) -> str:
        """The provider that gets first pick of the nodes."""
        return self.providers[0]

    @property
    def cpu_only(self) -> bool:
        return self.providers == (CPU,)

    def for_session(self) -> list[tuple[str, dict[str, str]]]:
        return [(p, dict(o)) for p, o in zip(self.providers, self.options)]


def choose(request: str | None, available: Iterable[str], options: Mapping[str, Mapping[str, str]] | None = None,
           packages: bool = False, system: str | None = None) -> ProviderChoice:
    """The providers for ``request`` given the ``available`` ones (``onnxruntime.get_available_providers()``).

    A named provider this build lacks is refused (InputError, one line naming what is available); ``"auto"`` never
    fails. ``options``: per provider name, replacing :data:`DEFAULT_OPTIONS` for it. ``packages``: the bundle has
    CoreML packages, so ``"coreml"`` means the Core ML backend, which needs ``system`` (``platform.system()``) to be
    ``"Darwin"``. ``"auto"`` stays with onnxruntime: the packages' results are not yet checked against it on a Mac."""
    available = list(available)
    req = "auto" if request is None else str(request).strip()
    opts = {**DEFAULT_OPTIONS, **{k: dict(v) for k, v in (options or {}).items()}}
    if packages and req.lower() == "coreml":
        if system != "Darwin":
            raise InputError(f"provider {req!r}: this bundle's CoreML packages run on macOS only (this machine: "
                             f"{system or 'unknown'}); use --provider cpu")
        return ProviderChoice(req, (COREML,), (dict(opts[COREML]),), backend="coreml")
    if req == "auto":
        first = next((p for p in AUTO_ORDER if p in available), CPU)
    else:
        first = SHORT_NAMES.get(req.lower(), req)
        if first not in SHORT_NAMES.values() and first not in available:
            known = ", ".join(["auto", *SHORT_NAMES])
            raise InputError(f"provider {req!r} is not known: use one of {known}, or an onnxruntime provider name")
        if first not in available:
            have = ", ".join(short_name(p) for p in available if p != "AzureExecutionProvider") or "none"
            packaged = " and the bundle has no CoreML packages (export --format coreml)" if first == COREML else ""
            raise InputError(f"provider {req!r} ({first}) is not available in this onnxruntime build "
                             f"(available: {have}){packaged}; use --provider cpu or auto")
    chain = (first,) if first == CPU else (first, CPU)
    return ProviderChoice(req, chain, tuple(dict(opts.get(p, {})) for p in chain))


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve(provider: "str | ProviderChoice | None", packages: bool = False) -> ProviderChoice:
    """A :class:`ProviderChoice` for this machine (a choice passes through); ``packages``: see :func:`choose`."""
    if isinstance(provider, ProviderChoice):
        return provider
    import platform

    return choose(provider, available_providers(), packages=packages, system=platform.system())


def check_name(provider: "str | ProviderChoice | None") -> None:
    """Refuse an unknown provider name before anything is opened (whether it is available depends on the bundle)."""
    if isinstance(provider, ProviderChoice) or provider is None:
        return
    req = str(provider).strip()
    if req != "auto" and req.lower() not in SHORT_NAMES and req not in SHORT_NAMES.values():
        choose(req, available_providers())  # raises "not known" unless this build has a provider of that name


@dataclass
class Assignment:
    """Which provider got which nodes, over every session an engine created, and what loading them cost."""

    choice: ProviderChoice
    sessions: int = 0
    load_s: float = 0.0
    nodes: dict[str, int] = field(default_factory=dict)        # provider -> nodes assigned
    fallback_ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes the CPU ran instead
    graphs: set = field(default_factory=set)                    # graphs counted in nodes (a reloaded layer once)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_load(self, seconds: float, graph: str) -> None:
        """Count one load of ``graph`` by a backend that assigns no nodes (the Core ML backend: the whole package)."""
        with self._lock:
            self.sessions += 1
            self.load_s += seconds
            self.graphs.add(graph)

    def record(self, session, seconds: float, graph: str) -> None:
        """Count one session's load and, the first time ``graph`` loads, its node assignment (onnxruntime's
        ``get_provider_graph_assignment_info``)."""
        if graph in self.graphs:
            with self._lock:
                self.sessions += 1
                self.load_s += seconds
            return
        try:
            subgraphs = [(sg.ep_name, [n.op_type for n in sg.get_nodes()]) for sg in session.get_provider_graph_assignment_info()]
        except Exception:  # older onnxruntime, or recording not enabled: the load time still counts
            subgraphs = []
        with self._lock:  # layers load on the stream's loader thread
            self.sessions += 1
            self.load_s += seconds
            self.graphs.add(graph)
            for ep, ops in subgraphs:
                self.nodes[ep] = self.nodes.get(ep, 0) + len(ops)
                if ep == CPU and not self.choice.cpu_only:
                    for op in ops:
                        self.fallback_ops[op] = self.fallback_ops.get(op, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"provider": short_name(self.choice.name), "backend": self.choice.backend,
                "providers": [short_name(p) for p in self.choice.providers],
                "provider_options": {short_name(p): o for p, o in zip(self.choice.providers, self.choice.options) if o},
                "graphs": len(self.graphs), "sessions_loaded": self.sessions, "session_load_s": round(self.load_s, 4),
                "nodes_by_provider": {short_name(k): v for k, v in sorted(self.nodes.items())},
                "cpu_fallback_nodes": sum(self.fallback_ops.values()),
                "cpu_fallback_ops": dict(sorted(self.fallback_ops.items()))}
