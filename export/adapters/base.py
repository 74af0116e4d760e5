"""The adapter contract: everything one model family knows, for every task it supports.

The export pipeline (:mod:`edge_sel.export.pipeline`) knows no family. It calls, in this order:

1. ``default_scoring(config)`` when the caller named no scoring (``config``: the model's ``config.json`` as a dict);
2. ``load(resolved, scoring, seed)`` -> ``(torch_model, hf_tokenizer)`` in float32 eval mode;
3. ``rerank_graphs(...)`` or ``generate_graphs(...)`` -> :class:`BundleGraphs`: the embedding table and arrays, one
   :class:`LayerGraphs` per layer (torch modules with the bundle's fixed I/O names), the head, dims and ``layer_io``;
   the pipeline writes them as ONNX through :class:`edge_sel.runtime.bundle_writer.BundleWriter`;
4. ``manifest_extras(model, tokenizer, task, scoring)`` -> the family's manifest fields (embedding rule, pooling,
   prompt, token ids, chat template, stop ids, ...);
5. with ``verify=True``: ``reference_scores(...)`` (rerank) or ``reference_logits(...)`` (generate), the torch
   model's output on exactly the token ids the runtime built, compared with the staged bundle's.

``model_types`` (``config.json``'s ``model_type`` values), ``tasks`` and ``scorings`` say what the adapter accepts.
Adding a family = one module here with an :class:`Adapter` subclass and one line in ``adapters/__init__.py``.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Load a model without transformers' chatter: its warnings about weights an adapter leaves out on purpose (a
    bi-encoder's pooler), the legacy-tokenizer notice and the GGUF loader's tqdm bar. The export prints its own
    progress, and an adapter says in one line what the user must know (a seeded, untrained head)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf is None:
        with contextlib.suppress(ImportError):  # transformers without GGUF support: nothing to quieten
            import transformers.modeling_gguf_pytorch_utils as gguf
    bar = getattr(gguf, "tqdm", None)
    if bar is not None:  # a plain tqdm (not transformers' switchable one): disabled for this load only
        gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf.tqdm = bar
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@dataclass
class GraphSpec:
    """A torch module to export plus its sample inputs and the names / dynamic axes of its I/O."""

    module: Any
    sample_inputs: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


@dataclass
class LayerGraphs:
    """One layer: ``graph`` becomes ``layers/layer_NNN.onnx``; ``qkv`` (split layers: the runtime owns the K/V between
    the two graphs) becomes ``layers/layer_NNN_qkv.onnx``, listed in ``extra_graphs``."""

    graph: GraphSpec
    qkv: GraphSpec | None = None


class GraphRewrite(Protocol):
    """An ONNX rewrite of the written layer graphs (e.g. the rerank form of split layers)."""

    def rewrite(self, graph: Path, qkv: Path | None) -> None:
        """Rewrite one layer's graph files in place (a file whose pattern is not recognised stays as exported)."""

    def layer_io(self, io: dict[str, Any]) -> dict[str, Any]:
        """The manifest's ``layer_io`` once every layer has been written."""


@dataclass
class BundleGraphs:
    """What an adapter hands the pipeline for one task."""

    dims: dict[str, int]
    max_length: int
    embed: np.ndarray
    arrays: dict[str, np.ndarray]
    layers: list[LayerGraphs]
    head: GraphSpec
    layer_io: dict[str, Any]
    head_external: bool = False  # the head's weights in ``head.onnx.data`` (a full-vocabulary LM head is large)
    rewrite: GraphRewrite | None = None  # applied to each layer's files as they are written


class Adapter:
    family: str = ""
    model_types: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("rerank",)
    scorings: tuple[str, ...] = ()
    gguf: bool = False  # GGUF files load through this adapter (transformers' GGUF reader)

    def default_scoring(self, config: dict) -> str:
        return self.scorings[0]

    def load(self, resolved, scoring: str, seed: int):
        """Return ``(torch_model, hf_tokenizer)`` in float32 eval mode; ``seed`` seeds freshly initialised heads."""
        raise NotImplementedError

    def rerank_graphs(self, model, tokenizer, scoring: str, max_length: int | None, prefix_reuse: bool | None = None,
                      resolved_path=None) -> BundleGraphs:
        raise NotImplementedError

    def generate_graphs(self, model, tokenizer, max_length: int | None) -> BundleGraphs:
        raise NotImplementedError(f"{self.family} models do not generate")

    def manifest_extras(self, model, tokenizer, task: str, scoring: str) -> dict[str, Any]:
        return {}

    def reference_scores(self, model, tokenizer, scoring: str, doc_ids: list[np.ndarray],
                         doc_types: list[np.ndarray] | None, query_ids: np.ndarray | None = None) -> np.ndarray:
        """Scores of the full torch model on exactly the token ids the runtime builds (for ``verify``)."""
        raise NotImplementedError

    def reference_logits(self, model, prompt_ids: list[int], new_ids: list[int]) -> np.ndarray:
        """The torch model's next-token logits after the prompt and after each of ``new_ids`` (for ``verify``)."""
        raise NotImplementedError(f"{self.family} models do not generate")
