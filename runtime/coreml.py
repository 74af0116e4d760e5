"""The Core ML backend: a bundle's CoreML packages (``export --format coreml``) run by Core ML instead of onnxruntime.

The streaming engines open every stage through a backend (:class:`edge_sel.runtime.sessions.OnnxRuntimeBackend` by
default) and run what it returns as ``stage.run(output_names, feeds) -> [arrays]``, the onnxruntime session call. This
backend returns :class:`CoreMLSession` for the package standing for the requested ONNX graph, so the window, chunk and
budget logic of the engines is the same; only the planner's per-layer size becomes the packages' bytes.

Each package is compiled once per backend (``coremltools.models.utils.compile_model``, into a folder the backend owns)
and loaded as a ``CompiledMLModel`` with the compute units of the provider options (``MLComputeUnits``) every time the
stream loads it. Feeds follow the package's own contract (:class:`StageContract`, read from the package): integer
inputs become int32, with positions past int32 (the manifest's empty-slot position) set to the packages' empty
position; float inputs float32; every size inside the declared range.

Core ML predicts on macOS only; elsewhere opening a stage is refused with one line. coremltools imports torch and
transformers when they are installed (its optional-dependency probe): :func:`import_coremltools` hides them during
that import, so the runtime never loads them.
"""

from __future__ import annotations

import platform
import shutil
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import BundleError, InputError

# onnxruntime's CoreML provider option MLComputeUnits -> coremltools.ComputeUnit
COMPUTE_UNITS = {"CPUOnly": "CPU_ONLY", "CPUAndNeuralEngine": "CPU_AND_NE", "CPUAndGPU": "CPU_AND_GPU", "ALL": "ALL"}
INT32_MAX = 2**31 - 1
# what coremltools' import probes for (coremltools._deps) and the runtime must not load
HIDDEN_DURING_IMPORT = ("torch", "torchvision", "torchaudio", "torchao", "executorch", "transformers", "tensorflow")
_import_lock = threading.Lock()
_torch_hidden = False  # this process's coremltools was imported with torch hidden (its torch frontend off)


def import_coremltools():
    """coremltools without torch/transformers: when they are not loaded yet, they are hidden while coremltools
    imports (it then treats them as absent, which a runtime that only loads and predicts never needs)."""
    global _torch_hidden
    with _import_lock:
        if "coremltools" in sys.modules:
            return sys.modules["coremltools"]
        hidden = [m for m in HIDDEN_DURING_IMPORT if m not in sys.modules]
        for m in hidden:
            sys.modules[m] = None  # ``import m`` raises ImportError while this is set
        try:
            import logging
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                logging.getLogger("coremltools").setLevel(logging.ERROR)
                import coremltools
            _torch_hidden = "torch" in hidden
        except ImportError:
            raise InputError("the Core ML backend needs coremltools: pip install 'edge-sel[coreml]'") from None
        finally:
            for m in hidden:
                if m in sys.modules and sys.modules[m] is None:
                    del sys.modules[m]
        return coremltools


def forget_torchless_import() -> None:
    """Drop a coremltools imported by :func:`import_coremltools` with torch hidden, so that the next import (the
    export's, which converts from torch) loads it with its torch frontend."""
    global _torch_hidden
    with _import_lock:
        if _torch_hidden:
            for name in [m for m in sys.modules if m == "coremltools" or m.startswith("coremltools.")]:
                del sys.modules[name]
            _torch_hidden = False


def require_macos(system: str | None = None) -> None:
    system = platform.system() if system is None else system
    if system != "Darwin":
        raise InputError(f"Core ML runs on macOS only (this machine: {system or 'unknown'}): "
                         f"run this bundle with --provider cpu")


@dataclass(frozen=True)
class Port:
    """One input of a package: name, element type and the (lower, upper) bound of each axis (upper -1: unbounded)."""

    name: str
    dtype: str
    bounds: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class StageContract:
    """A package's inputs and outputs, read from the package itself (its model description)."""

    package: str
    inputs: tuple[Port, ...]
    outputs: tuple[str, ...]

    @classmethod
    def read(cls, package: Path) -> "StageContract":
        ct = import_coremltools()
        spec = ct.utils.load_spec(str(package))
        array = ct.proto.FeatureTypes_pb2.ArrayFeatureType
        ports = []
        for f in spec.description.input:
            a = f.type.multiArrayType
            if a.dataType not in (array.FLOAT32, array.INT32):
                raise BundleError(f"CoreML package {package}: input {f.name!r} has element type {a.dataType}, "
                                  f"expected float32 or int32")
            if a.HasField("shapeRange"):
                bounds = tuple((int(r.lowerBound), int(r.upperBound)) for r in a.shapeRange.sizeRanges)
            else:
                bounds = tuple((int(n), int(n)) for n in a.shape)
            ports.append(Port(f.name, "int32" if a.dataType == array.INT32 else "float32", bounds))
        return cls(str(package), tuple(ports), tuple(f.name for f in spec.description.output))

    def feeds(self, feeds: Mapping[str, Any], empty_pos: int = INT32_MAX) -> dict[str, np.ndarray]:
        """The engine's onnxruntime feeds as this package takes them (names, element types, sizes checked)."""
        names = {p.name for p in self.inputs}
        if set(feeds) != names:
            raise BundleError(f"CoreML package {self.package} takes inputs {sorted(names)}, the engine fed "
                              f"{sorted(feeds)}: re-export the bundle with --format coreml")
        out = {}
        for p in self.inputs:
            a = np.asarray(feeds[p.name])
            if p.dtype == "int32":  # positions; the empty slot's position is beyond int32
                a = np.minimum(a, empty_pos).astype(np.int32)
            else:
                a = a.astype(np.float32, copy=False)
            if a.ndim != len(p.bounds) or any(n < lo or (hi >= 0 and n > hi) for n, (lo, hi) in zip(a.shape, p.bounds)):
                raise BundleError(f"CoreML package {self.package}: input {p.name!r} of shape {tuple(a.shape)} is "
                                  f"outside the package's sizes {[list(b) for b in p.bounds]}")
            out[p.name] = np.ascontiguousarray(a)
        return out


class CoreMLSession:
    """A loaded package, called like an onnxruntime session."""

    def __init__(self, model, contract: StageContract, empty_pos: int):
        self.model = model
        self.contract = contract
        self.empty_pos = empty_pos

    def run(self, output_names, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        result = self.model.predict(self.contract.feeds(feeds, self.empty_pos))
        names = self.contract.outputs if output_names is None else output_names
        return [np.asarray(result[n], dtype=np.float32) for n in names]


class CoreMLBackend:
    """Opens a bundle's stages from its CoreML packages (the stage standing for each ONNX graph, by graph path)."""

    name = "coreml"

    def __init__(self, bundle, providers=None, compute_units: str | None = None):
        packages = bundle.spec.coreml
        if packages is None:
            raise BundleError(f"{bundle.root} has no CoreML packages: export it with --format coreml, "
                              f"or run it with --provider cpu")
        self.bundle = bundle
        self.providers = providers  # an Assignment: counts the loads and their time
        if compute_units is None:
            opts = providers.choice.options[0] if providers is not None and providers.choice.options else {}
            compute_units = opts.get("MLComputeUnits", "ALL")
        if compute_units not in COMPUTE_UNITS:
            raise InputError(f"CoreML compute units {compute_units!r}: choose from {', '.join(COMPUTE_UNITS)}")
        self.compute_units = compute_units
        self.empty_pos = int(packages.empty_pos)
        self.stages = {s.graph: s for s in packages.stages.values()}
        self._contracts: dict[str, StageContract] = {}
        self._compiled: dict[str, Path] = {}
        self._folder: Path | None = None
        self._lock = threading.Lock()

    # ---- which package, how big ------------------------------------------------------------------
    def stage_for(self, path) -> Any:
        """The manifest's CoreML stage standing for the bundle file ``path`` (an ONNX graph)."""
        try:
            rel = Path(path).resolve().relative_to(self.bundle.root.resolve()).as_posix()
        except ValueError:
            rel = str(path)
        stage = self.stages.get(rel)
        if stage is None:
            raise BundleError(f"{self.bundle.root}: no CoreML package stands for {rel} (re-export with --format coreml)")
        return stage

    def package_bytes(self, graph: str) -> int:
        """Bytes of the package standing for ``graph`` (every file of it, as listed in the manifest)."""
        prefix = self.stage_for(self.bundle.root / graph).package + "/"
        return sum(f.size for rel, f in self.bundle.spec.files.items() if rel.startswith(prefix))

    def layer_bytes(self) -> int:
        """The largest layer's packages (with its qkv package, for split layers): what the planner counts per layer."""
        spec = self.bundle.spec
        sizes = []
        for i, layer in enumerate(spec.layers):
            n = self.package_bytes(layer.file)
            if layer.qkv is not None:
                n += self.package_bytes(spec.qkv_graph(i).file)
            sizes.append(n)
        return max(sizes)

    def head_bytes(self) -> int:
        return self.package_bytes(self.bundle.spec.head.file)

    def contract(self, path) -> StageContract:
        stage = self.stage_for(path)
        with self._lock:
            if stage.package not in self._contracts:
                self._contracts[stage.package] = StageContract.read(self.bundle.path(f"{stage.package}/Manifest.json").parent)
            return self._contracts[stage.package]

    # ---- loading ---------------------------------------------------------------------------------
    def open(self, path, threads: int | None = None, optimize: str = "all", mem_pattern: bool = True,
             prepack: bool = False) -> CoreMLSession:
        """Load the package standing for graph ``path`` (``threads``/``optimize``/``mem_pattern``/``prepack`` are onnxruntime's)."""
        require_macos()
        ct = import_coremltools()
        stage, contract = self.stage_for(path), self.contract(path)
        t = time.perf_counter()
        compiled = self._compile(ct, stage.package)
        try:
            units = getattr(ct.ComputeUnit, COMPUTE_UNITS[self.compute_units])
            model = ct.models.CompiledMLModel(str(compiled), compute_units=units)
        except Exception as e:  # Core ML's own errors: name the package
            raise BundleError(f"Core ML cannot load {stage.package}: {e}") from None
        if self.providers is not None:
            self.providers.record_load(time.perf_counter() - t, stage.graph)
        return CoreMLSession(model, contract, self.empty_pos)

    def _compile(self, ct, package: str) -> Path:
        """Compile ``package`` once (Core ML loads compiled models; an ``.mlpackage`` would be compiled per load)."""
        with self._lock:
            if package not in self._compiled:
                if self._folder is None:
                    from .scratch import owned_tempdir

                    self._folder = owned_tempdir("coreml")
                    weakref.finalize(self, shutil.rmtree, self._folder, True)
                dest = self._folder / (Path(package).stem + ".mlmodelc")
                src = self.bundle.path(f"{package}/Manifest.json").parent
                try:
                    self._compiled[package] = Path(ct.models.utils.compile_model(str(src), str(dest)))
                except Exception as e:
                    raise BundleError(f"Core ML cannot compile {package}: {e}") from None
            return self._compiled[package]

    def plan_sizes(self) -> tuple[int, int]:
        """(largest layer, head) bytes for the memory planner."""
        return self.layer_bytes(), self.head_bytes()

    def close(self) -> None:
        with self._lock:
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None
            self._compiled.clear()
