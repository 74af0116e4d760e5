"""The adapter contract: how one model family is split into embedding arrays, per-layer graphs and a head.

Adding a family = one new module here with an :class:`Adapter` subclass and one line in
``adapters/__init__.py``. Each adapter produces torch modules with the bundle's fixed I/O names
(see ``LAYER_IO`` / ``HEAD_IO``); the exporter turns them into ONNX with external weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class GraphSpec:
    """A torch module to export plus its sample inputs and the names / dynamic axes of its I/O."""

    module: Any
    sample_inputs: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


@dataclass
class SplitModel:
    family: str
    scoring: str
    dims: dict[str, int]
    max_length: int
    embed: np.ndarray
    arrays: dict[str, np.ndarray]
    layers: list[GraphSpec]
    head: GraphSpec
    extras: dict[str, Any] = field(default_factory=dict)  # manifest fields: embedding rule, prompt, pooling, tokens


class Adapter:
    family: str = ""
    model_types: tuple[str, ...] = ()
    scorings: tuple[str, ...] = ()

    def load(self, resolved, scoring: str, seed: int):
        """Return ``(torch_model, hf_tokenizer)`` in float32 eval mode."""
        raise NotImplementedError

    def split(self, model, tokenizer, scoring: str, max_length: int | None) -> SplitModel:
        raise NotImplementedError

    def reference_scores(self, model, batch_ids: list[np.ndarray], batch_types: list[np.ndarray] | None,
                         split: SplitModel, query_ids: np.ndarray | None = None) -> np.ndarray:
        """Scores of the full torch model on exactly the token ids the runtime builds (for ``--verify``)."""
        raise NotImplementedError
